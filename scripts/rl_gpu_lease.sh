#!/bin/bash
# DMDR on one short GPU lease (one GPU, about 8 minutes), from the repository root:
#   OUT=DIR bash scripts/rl_gpu_lease.sh
# On the CPU (docs/rl.md) 240 student updates of 16 samples leave the training reward flat
# for every RL term. This runs the same recipe, configs/shapes/dmdr.yaml from the shipped
# shapes-turbo, with BATCH prompts x 4 samples per update in bf16:
#   1. DMDR with RL term RL (default awr) at λ = LAMBDA (default 1) until RL_END seconds after
#      the start (SIGINT at the limit: the run saves the step in flight);
#   2. its DMD-only control (λ = 0) for exactly as many trainer steps;
#   3. both students judged at 8 NFE on the held-out prompts, seeds 0-431 and 432-863
#      (EVAL_IMAGES images per prompt, default 4);
#   4. into OUT: both students' transformers cut into 15 MB parts (join them with cat), the
#      runs' configs, metrics and evaluations in pack.tgz, and the whole log, gpu.log.
# Packages the machine lacks come as wheels in .whl/ (scripts/lease_env.sh).
# EXTRA appends overrides to both runs. A CPU rehearsal (about 5 minutes): RL_END=100
# BATCH=1 EVAL_IMAGES=2 EXTRA="train.precision=fp32 train.log_every=5".
set -u -o pipefail
OUT=${OUT:-runs/lease-out}
RL=${RL:-awr}
LAMBDA=${LAMBDA:-1}
BATCH=${BATCH:-32}
RL_END=${RL_END:-240}
EVAL_IMAGES=${EVAL_IMAGES:-4}
EXTRA=${EXTRA:-}
. scripts/lease_env.sh
mkdir -p runs/pack
python3 -c "import torch, diffusers; print('torch', torch.__version__, '| cuda', torch.cuda.is_available() and \
torch.cuda.get_device_name(), '| diffusers', diffusers.__version__)" 2>&1 | tee -a "$L"
COMMON="train.batch_size=$BATCH train.precision=bf16 train.ckpt_every=0 train.log_every=25 $EXTRA"

# pack RUN NAME: export RUN's EMA student, its transformer into $OUT as NAME.part-*, and RUN's
# config and metrics into runs/pack as NAME_*.
pack() {
  python3 -m zimagekit.cli.rl export "runs/$1" "runs/export/$1" 2>&1 | tail -1 | tee -a "$L"
  local weights=runs/export/$1/transformer/diffusion_pytorch_model.safetensors
  sha256sum "$weights" | tee -a "$L"
  split -b 15M "$weights" "$OUT/$2.part-"
  cp "runs/$1/metrics.csv" "runs/pack/$2_metrics.csv"
  cp "runs/$1/config.yaml" "runs/pack/$2_config.yaml"
}

# judge NAME FOLDER OFFSET: the held-out evaluation at 8 NFE into runs/pack/eval-NAME.
judge() {
  log "evaluate $1 (seed offset $3)"
  python3 -m zimagekit.shapes.teacher evaluate "$2" --steps 8 --cfg-scale 0 --images-per-prompt "$EVAL_IMAGES" \
    --seed-offset "$3" --out "runs/pack/eval-$1" 2>&1 | tee -a "$L"
}

for run in lease-dmdr lease-control; do
  [ -e "runs/$run" ] && { log "runs/$run exists from an earlier lease; move it away first"; exit 1; }
done
LIMIT=$(( RL_END - $(el) ))
[ "$LIMIT" -ge 10 ] || { log "RL_END=$RL_END leaves no time to train"; exit 1; }
log "DMDR, rl $RL, λ = $LAMBDA, until ${RL_END}s"
timeout -s INT "$LIMIT" python3 -m zimagekit.cli.rl --config configs/shapes/dmdr.yaml \
  run.name=lease-dmdr dmdr.rl="$RL" dmdr.rl_weight="$LAMBDA" train.steps=100000 $COMMON 2>&1 | tee -a "$L"
STATUS=${PIPESTATUS[0]}
[ "$STATUS" = 0 ] || [ "$STATUS" = 124 ] || { log "the DMDR run failed (exit $STATUS)"; exit 1; }
STEPS=$(sed 's/step_0*//' runs/lease-dmdr/checkpoints/latest 2>/dev/null)
[ -n "$STEPS" ] || { log "the DMDR run left no checkpoint"; exit 1; }
log "DMDR stopped at trainer step $STEPS; export"
pack lease-dmdr dmdr

log "control: DMD alone for $STEPS trainer steps"
python3 -m zimagekit.cli.rl --config configs/shapes/dmdr.yaml run.name=lease-control dmdr.rl_weight=0 \
  train.steps="$STEPS" $COMMON 2>&1 | tee -a "$L"
[ "${PIPESTATUS[0]}" = 0 ] || { log "the control run failed"; exit 1; }
pack lease-control control
tar czf "$OUT/pack.tgz" -C runs pack  # again after the evaluations, in case they run out of time

for name in dmdr control; do
  judge "$name" "runs/export/lease-$name" 0
  judge "$name-seeds2" "runs/export/lease-$name" 432
done
tar czf "$OUT/pack.tgz" -C runs pack
log "done"
