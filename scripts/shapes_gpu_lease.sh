#!/bin/bash
# The shapes recipe for one short GPU lease (one GPU, ~9 minutes), run from the repository
# root:   OUT=DIR bash scripts/shapes_gpu_lease.sh
#   1. a 60-step probe of configs/shapes/teacher_gpu.yaml (it also encodes the latent cache)
#      measures samples/s; the teacher run gets the train.steps that end its cosine decay by
#      TEACH_END seconds after the start;
#   2. the teacher, warm-started from the shipped one, exported to runs/export/shapes-teacher;
#   3. the distillation guidance: the teacher judged at w = 0 / 1 / 2 / 3 (PICK_STEPS Euler
#      steps, 1 image per held-out prompt); W is the best (W set in the environment skips it);
#   4. configs/shapes/distill_gpu.yaml (guidance W) until DIST_END, exported to
#      runs/export/shapes-turbo;
#   5. the evaluations of the shipped table (held-out prompts, 4 images each): teacher at 50
#      steps with w = 0 and w = W, teacher at 8 steps without CFG, student at 8 steps;
#   6. into OUT: both transformers' safetensors cut into 15 MB parts (join them with cat), the
#      runs' configs, metrics and evaluations in pack.tgz, and the whole log, gpu.log.
# Packages the machine lacks come as wheels in .whl/ (scripts/lease_env.sh).
# EXTRA_T and EXTRA_D append overrides to the teacher and distill runs, EVAL_IMAGES and
# PICK_STEPS shrink the evaluations. A CPU rehearsal (4 minutes): TEACH_END=90 DIST_END=160
# EXTRA_T="data.count=600 train.batch_size=8 train.precision=fp32 data.cache_dir=/tmp/c"
# EXTRA_D="train.batch_size=4 train.precision=fp32 data.count=200" EVAL_IMAGES=1 PICK_STEPS=2.
set -u -o pipefail
OUT=${OUT:-runs/lease-out}
TEACH_END=${TEACH_END:-360}
DIST_END=${DIST_END:-495}
EXTRA_T=${EXTRA_T:-}
EXTRA_D=${EXTRA_D:-}
EVAL_IMAGES=${EVAL_IMAGES:-4}
PICK_STEPS=${PICK_STEPS:-25}
. scripts/lease_env.sh
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, '| cuda', torch.cuda.is_available() and \
torch.cuda.get_device_name(), '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)" 2>&1 | tee -a "$L"
T=zimagekit.shapes.teacher
R=zimagekit.cli.train
D=zimagekit.cli.distill
mkdir -p runs/pack

# pack MODULE RUN EXPORT NAME: export RUN's EMA model to EXPORT, its transformer into $OUT
# as NAME.part-*, and RUN's config and metrics into runs/pack as NAME_*.
pack() {
  python3 -m "$1" export "runs/$2" "runs/export/$3" 2>&1 | tail -1 | tee -a "$L"
  local weights=runs/export/$3/transformer/diffusion_pytorch_model.safetensors
  sha256sum "$weights" | tee -a "$L"
  split -b 15M "$weights" "$OUT/$4.part-"
  cp "runs/$2/metrics.csv" "runs/pack/$4_metrics.csv"
  cp "runs/$2/config.yaml" "runs/pack/$4_config.yaml"
}

# judge NAME FOLDER STEPS W IMAGES: the held-out evaluation into runs/pack/eval-NAME.
judge() {
  log "evaluate $1: $3 steps, w = $4, $5 images per prompt"
  python3 -m $T evaluate "$2" --steps "$3" --cfg-scale "$4" --images-per-prompt "$5" --out "runs/pack/eval-$1" 2>&1 \
    | tee -a "$L"
}

log "probe (encodes the latent cache first)"
python3 -m $R train --config configs/shapes/teacher_gpu.yaml run.name=probe train.steps=60 train.log_every=20 \
  train.ckpt_every=0 optim.warmup_steps=10 $EXTRA_T 2>&1 | tee -a "$L" || { log "probe failed"; exit 1; }
RATE=$(grep -o '[0-9.]* samples/s' "$L" | tail -1 | cut -d' ' -f1)
BATCH=$(grep -o 'batch_size: [0-9]*' runs/probe/config.yaml | cut -d' ' -f2)
LEFT=$(( TEACH_END - $(el) - 25 ))  # 25 s: start-up and checkpoints
N=$(python3 -c "print(max(100, int($RATE / $BATCH * $LEFT * 0.9)))")
log "rate $RATE samples/s at batch $BATCH, $LEFT s left: train.steps=$N"
rm -rf runs/probe

log "teacher: $N steps"
timeout -s INT $(( TEACH_END - $(el) + 15 )) python3 -m $R train --config configs/shapes/teacher_gpu.yaml \
  train.steps="$N" $EXTRA_T 2>&1 | tee -a "$L"
log "teacher exit $?; export"
pack $R shapes-teacher-gpu shapes-teacher teacher

if [ -z "${W:-}" ]; then
  for w in 0 1 2 3; do judge "pick-w$w" runs/export/shapes-teacher "$PICK_STEPS" $w 1; done
  W=$(python3 -c "import json; print(max((0, 1, 2, 3), key=lambda w: json.load(open(f'runs/pack/eval-pick-w{w}/metrics.json'))['overall']))")
fi
log "distill, w = $W"
timeout -s INT $(( DIST_END - $(el) )) python3 -m $D train --config configs/shapes/distill_gpu.yaml \
  distill.guidance_scale="$W" $EXTRA_D 2>&1 | tee -a "$L"
log "distill exit $? (124: stopped by its time limit); export"
pack $D shapes-distill-gpu shapes-turbo student
cp -r runs/export/shapes-turbo/model_index.json runs/export/shapes-turbo/scheduler runs/pack/
cp runs/export/shapes-turbo/transformer/config.json runs/pack/student_transformer_config.json
tar czf "$OUT/pack.tgz" -C runs pack  # again after the evaluations, in case they run out of time

judge student runs/export/shapes-turbo 8 0 "$EVAL_IMAGES"
judge teacher-50-w0 runs/export/shapes-teacher 50 0 "$EVAL_IMAGES"
[ "$W" != 0 ] && judge "teacher-50-w$W" runs/export/shapes-teacher 50 "$W" "$EVAL_IMAGES"
judge teacher-8-w0 runs/export/shapes-teacher 8 0 "$EVAL_IMAGES"
tar czf "$OUT/pack.tgz" -C runs pack
log "done"
