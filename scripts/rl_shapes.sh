#!/usr/bin/env bash
# The shapes-world RL runs behind docs/rl.md, in the order they ran, and their held-out
# evaluations (108 prompts x 4 images, fixed seeds). CPU, fp32, one thread per run.
# Each stage is skipped when its output exists, so the script resumes where it stopped.
# Every run starts from dmdr.student, the shipped shapes-turbo, unless it says otherwise. The
# rows of docs/rl.md up to control_long started from the one of commit 033939c (docs/rl.md says
# how to rerun from it); awr, awr_w3, awr_alone and control_long2 start from the export of
# control_long (the shapes-turbo of commit 5db67df); awr2 and every stage after it start from the
# export of awr_w3, runs/export/shapes-dmdr-awr-w3, whose transformer is byte-identical to the
# shapes-turbo of commit 478e188 (so a copy of that folder stands in for it, as it did for the
# -rerun and -s1 rows). The plots stage always redraws.
#   bash scripts/rl_shapes.sh            # everything
#   STAGES="dmdr control" bash scripts/rl_shapes.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
STAGES=${STAGES:-"baselines dmdr control dmdr_w2 hack hack_dm flow_grpo dpo dmdr_refl dmdr_dpo seeds2 dmdr_long control_long awr control_long2 awr_w3 awr_alone seeds34 seen curves awr2 control_b16 awr2_long awr_g8 control_b16_long seeds56 awr_g8_long rerun g8_curves g8_seed1 control_b16_seed1 plots"}
out=docs/rl

evaluate() {  # evaluate NAME FOLDER STEPS W [--seed-offset N | --prompts seen]
  local name=$1 folder=$2 steps=$3 w=$4; shift 4
  [ -f "$out/$name/metrics.json" ] || python -m zimagekit shapes teacher evaluate "$folder" --steps "$steps" \
      --cfg-scale "$w" --images-per-prompt 4 --out "$out/$name" "$@"
}
long_run() {  # long_run ROW RUN [overrides...]: 240 student updates, resumable, judged on both seed sets;
  # all six checkpoints kept for the curves stage
  local row=$1 run=$2; shift 2
  [ -d "runs/export/$run" ] || { python -m zimagekit rl --config configs/shapes/dmdr.yaml "run.name=$run" \
      train.steps=1200 train.ckpt_every=200 train.keep_last_ckpts=6 run.resume=true "$@" &&
    python -m zimagekit rl export "runs/$run" "runs/export/$run"; }
  seed_sets "$row" "runs/export/$run" 8 0 1 2
}
from_control_long=dmdr.student=runs/export/shapes-dmd-control-long
from_awr_w3=dmdr.student=runs/export/shapes-dmdr-awr-w3  # the shapes-turbo of commit 478e188
run_to() {  # run_to RUN STEPS [overrides...]: train (resumable) to trainer step STEPS, every 200th
  # checkpoint kept; export to runs/export/RUN-STEPS. A later stage extends the same run.
  local run=$1 steps=$2; shift 2
  [ -d "runs/export/$run-$steps" ] || { python -m zimagekit rl --config configs/shapes/dmdr.yaml "run.name=$run" \
      train.steps="$steps" train.ckpt_every=200 train.keep_last_ckpts=12 run.resume=true "$@" &&
    python -m zimagekit rl export "runs/$run" "runs/export/$run-$steps"; }
}
seed_sets() {  # seed_sets ROW FOLDER STEPS W I...: seed set I (seeds (I-1)*432..) as ROW, or ROW-seedsI
  local row=$1 folder=$2 steps=$3 w=$4 i; shift 4
  for i in "$@"; do
    evaluate "$row$([ "$i" = 1 ] || echo "-seeds$i")" "$folder" "$steps" "$w" --seed-offset $(( (i - 1) * 432 ))
  done
}
four_seed_sets() { seed_sets "$1" "$2" 8 0 1 2 3 4; }  # four_seed_sets ROW FOLDER: 8 NFE, seed sets 1-4
six_seed_sets() { seed_sets "$1" "$2" 8 0 1 2 3 4 5 6; }  # ... and two fresh ones, 1728.. and 2160..
# The student the first rows started from: git worktree add /tmp/old 033939c
old_turbo=${OLD_TURBO:-/tmp/old/src/zimagekit/models/shapes-turbo}
train_export() {  # train_export RUN CONFIG [overrides...]
  local run=$1 config=$2; shift 2
  [ -f "runs/$run/checkpoints/latest" ] || python -m zimagekit rl --config "$config" "run.name=$run" "$@"
  [ -d "runs/export/$run" ] || python -m zimagekit rl export "runs/$run" "runs/export/$run"
}

for stage in $STAGES; do
  case $stage in
    baselines)  # the shipped teacher (50 steps, w = 3) and student (8 NFE), judged here
      evaluate teacher-cpu src/zimagekit/models/shapes-teacher 50 3
      evaluate student-shipped "$old_turbo" 8 0 ;;
    dmdr)     # DMDR stage 2: the shipped student + λ = 0.5 GRPO on the judge's graded reward
      train_export shapes-dmdr configs/shapes/dmdr.yaml
      evaluate dmdr-grpo runs/export/shapes-dmdr 8 0 ;;
    control)  # the same run with λ = 0: Decoupled-DMD alone on the same budget
      train_export shapes-dmd-control configs/shapes/dmdr.yaml dmdr.rl_weight=0
      evaluate dmd-control runs/export/shapes-dmd-control 8 0 ;;
    dmdr_w2)  # λ = 2
      train_export shapes-dmdr-w2 configs/shapes/dmdr.yaml dmdr.rl_weight=2
      evaluate dmdr-grpo-w2 runs/export/shapes-dmdr-w2 8 0 ;;
    hack_dm)  # the same hackable reward with the DM term kept
      train_export shapes-hack-with-dm configs/shapes/dmdr.yaml dmdr.rl=refl dmdr.rl_weight=1 \
          dmdr.reward=zimagekit.shapes.rewards:ColourMassReward train.steps=200
      evaluate hack-with-dm runs/export/shapes-hack-with-dm 8 0 ;;
    flow_grpo)  # Flow-GRPO on the 50-step teacher (LoRA r16), judged at 50 steps, w = 3
      train_export shapes-flow-grpo configs/shapes/flow_grpo.yaml grpo.group_size=6 grpo.sde_steps=8 \
          train.batch_size=2 train.steps=40 train.ckpt_every=20 train.log_every=5 optim.lr=3.0e-4
      evaluate flow-grpo runs/export/shapes-flow-grpo 50 3 ;;
    dpo)      # Diffusion-DPO on the teacher, on-policy pairs (best vs worst of 6 by the judge)
      train_export shapes-dpo configs/shapes/diffusion_dpo.yaml train.steps=40 train.batch_size=2 train.ckpt_every=20
      evaluate diffusion-dpo runs/export/shapes-dpo 50 3 ;;
    dmdr_refl)  # RL inside DMDR at equal rollouts (16 student samples per update, 80 updates): ReFL
      # needs a differentiable reward, so the judge's soft surrogate; batch 16 = GRPO's 4 prompts x 4
      train_export shapes-dmdr-refl configs/shapes/dmdr.yaml dmdr.rl=refl \
          dmdr.reward=zimagekit.shapes.rewards:SoftColourReward train.batch_size=16
      evaluate dmdr-refl runs/export/shapes-dmdr-refl 8 0 ;;
    dmdr_dpo)   # ... and DPO on on-policy pairs (best vs worst of each prompt's 4)
      train_export shapes-dmdr-dpo configs/shapes/dmdr.yaml dmdr.rl=dpo
      evaluate dmdr-dpo runs/export/shapes-dmdr-dpo 8 0 ;;
    dmdr_long)  # 3x the updates (240 = 1,200 trainer steps), λ = 1, judged on both seed sets
      long_run dmdr-long shapes-dmdr-long dmdr.rl_weight=1 ;;
    control_long)  # its DMD-only control: the same 240 updates with λ = 0
      long_run dmd-control-long shapes-dmd-control-long dmdr.rl_weight=0 ;;
    awr)  # from the shapes-turbo that dmd-control-long made: 240 updates of DMDR with AWR, λ = 1
      long_run dmdr-awr shapes-dmdr-awr dmdr.rl=awr dmdr.rl_weight=1 $from_control_long ;;
    awr_w3)  # ... with λ = 3
      long_run dmdr-awr-w3 shapes-dmdr-awr-w3 dmdr.rl=awr dmdr.rl_weight=3 $from_control_long ;;
    awr_alone)  # AWR without distribution matching (dmdr.dm_weight=0), 80 updates: can the term alone
      # raise the training reward?
      train_export shapes-awr-alone configs/shapes/dmdr.yaml dmdr.rl=awr dmdr.rl_weight=1 dmdr.dm_weight=0 \
          $from_control_long
      evaluate awr-alone runs/export/shapes-awr-alone 8 0 ;;
    control_long2)  # their DMD-only control: 240 more updates of Decoupled-DMD from the same student
      long_run dmd-control-long2 shapes-dmd-control-long2 dmdr.rl_weight=0 $from_control_long ;;
    awr2)  # from the shipped dmdr-awr-w3: 240 more updates of DMD + AWR, λ = 1
      run_to shapes-dmdr-awr2 1200 dmdr.rl=awr dmdr.rl_weight=1 $from_awr_w3
      four_seed_sets dmdr-awr2 runs/export/shapes-dmdr-awr2-1200 ;;
    control_b16)  # its DMD-only control with as many samples per update as AWR's 4 prompts x 4:
      # 16 prompts (the earlier controls drew 4, a quarter of their RL rows' DM batch)
      run_to shapes-dmd-control-b16 1200 dmdr.rl_weight=0 train.batch_size=16 $from_awr_w3
      four_seed_sets dmd-control-b16 runs/export/shapes-dmd-control-b16-1200 ;;
    awr2_long)  # both runs extended to 480 updates (2,400 trainer steps; the learning rate is constant)
      run_to shapes-dmdr-awr2 2400 dmdr.rl=awr dmdr.rl_weight=1 $from_awr_w3
      four_seed_sets dmdr-awr2-2400 runs/export/shapes-dmdr-awr2-2400 ;;
    awr_g8)  # AWR with groups of 8 samples of 2 prompts (the same 16 samples an update): fewer
      # groups whose samples all score the same
      run_to shapes-dmdr-awr-g8 1200 dmdr.rl=awr dmdr.rl_weight=1 dmdr.group_size=8 train.batch_size=2 $from_awr_w3
      four_seed_sets dmdr-awr-g8 runs/export/shapes-dmdr-awr-g8-1200 ;;
    seeds56)  # two fresh seed sets (1728.., 2160..) for the shipped student and the teacher: the
      # shipped row was the best of three, so its four-set mean is biased upward
      seed_sets dmdr-awr-w3 runs/export/shapes-dmdr-awr-w3 8 0 5 6
      seed_sets teacher-cpu src/zimagekit/models/shapes-teacher 50 3 5 6 ;;
    awr_g8_long)  # the best of them, awr_g8, extended to 2,400 trainer steps, on six seed sets
      run_to shapes-dmdr-awr-g8 2400 dmdr.rl=awr dmdr.rl_weight=1 dmdr.group_size=8 train.batch_size=2 $from_awr_w3
      six_seed_sets dmdr-awr-g8-2400 runs/export/shapes-dmdr-awr-g8-2400 ;;
    control_b16_long)  # control_b16 extended to 2,400 trainer steps: the control for awr2_long and awr_g8_long
      run_to shapes-dmd-control-b16 2400 dmdr.rl_weight=0 train.batch_size=16 $from_awr_w3
      six_seed_sets dmd-control-b16-2400 runs/export/shapes-dmd-control-b16-2400 ;;
    rerun)  # the 1,200-step exports of awr_g8 and control_b16 as awr_g8_long and control_b16_long
      # re-trained them on a second machine, after a restart lost the first runs: the same
      # commands, starting student and code. Two runs on one machine are bit-identical; runs on
      # two machines are not, so these rows measure the training noise of one recipe. Run on
      # one machine from the start, this stage judges the models of awr_g8 and control_b16 again.
      six_seed_sets dmdr-awr-g8-rerun runs/export/shapes-dmdr-awr-g8-1200
      six_seed_sets dmd-control-b16-rerun runs/export/shapes-dmd-control-b16-1200 ;;
    seeds2)     # the DMDR variants and the DMD control on the second seed set (seeds 432..)
      for name in dmd-control:shapes-dmd-control dmdr-grpo:shapes-dmdr dmdr-refl:shapes-dmdr-refl \
                  dmdr-dpo:shapes-dmdr-dpo student-shipped:; do
        folder=runs/export/${name#*:}
        [ -n "${name#*:}" ] || folder=$old_turbo
        seed_sets "${name%%:*}" "$folder" 8 0 2
      done ;;
    seeds34)  # two more seed sets (864.., 1296..) for the AWR rows, their control, the shipped student and the teacher
      for name in dmdr-awr:shapes-dmdr-awr dmdr-awr-w3:shapes-dmdr-awr-w3 dmd-control-long2:shapes-dmd-control-long2 \
                  dmd-control-long:shapes-dmd-control-long teacher-cpu:; do
        folder=runs/export/${name#*:} steps=8 w=0
        [ -n "${name#*:}" ] || { folder=src/zimagekit/models/shapes-teacher steps=50 w=3; }
        seed_sets "${name%%:*}" "$folder" $steps $w 3 4
      done ;;
    seen)     # the same rows on the seen-pairs twin of the prompts: unlearnt or ungeneralised?
      evaluate dmdr-awr-seen runs/export/shapes-dmdr-awr 8 0 --prompts seen
      evaluate dmd-control-long2-seen runs/export/shapes-dmd-control-long2 8 0 --prompts seen
      evaluate teacher-cpu-seen src/zimagekit/models/shapes-teacher 50 3 --prompts seen ;;
    curves)   # held-out accuracy, diversity and saturation at every checkpoint of the AWR runs and their control
      [ -f "$out/awr-curves/curves.csv" ] || python -m zimagekit.shapes.evaluation curves runs/shapes-dmdr-awr \
          runs/shapes-dmdr-awr-w3 runs/shapes-dmd-control-long2 --images-per-prompt 4 --out "$out/awr-curves" ;;
    g8_seed1)  # awr_g8 with another training seed (run.seed=1): a third draw of that recipe
      run_to shapes-dmdr-awr-g8-s1 1200 dmdr.rl=awr dmdr.rl_weight=1 dmdr.group_size=8 train.batch_size=2 \
          run.seed=1 $from_awr_w3
      four_seed_sets dmdr-awr-g8-s1 runs/export/shapes-dmdr-awr-g8-s1-1200 ;;
    control_b16_seed1)  # and its control, control_b16, with run.seed=1
      run_to shapes-dmd-control-b16-s1 1200 dmdr.rl_weight=0 train.batch_size=16 run.seed=1 $from_awr_w3
      four_seed_sets dmd-control-b16-s1 runs/export/shapes-dmd-control-b16-s1-1200 ;;
    g8_curves)  # held-out accuracy, diversity and saturation every 200 trainer steps of the two 2,400-step runs
      [ -f "$out/g8-curves/curves.csv" ] || python -m zimagekit.shapes.evaluation curves runs/shapes-dmdr-awr-g8 \
          runs/shapes-dmd-control-b16 --images-per-prompt 4 --out "$out/g8-curves" ;;
    plots)    # the training-reward figures of docs/rl.md, from the runs' metrics.csv
      python -m zimagekit plot runs/shapes-hack-rl-only runs/shapes-hack-with-dm --metric reward/mean --window 5 \
          --label "ReFL alone" --label "DMD + ReFL" -o "$out/hack-reward.png"
      python -m zimagekit plot runs/shapes-dmdr runs/shapes-dmdr-dpo runs/shapes-dmdr-refl --metric reward/mean \
          --window 5 --label "GRPO (judge)" --label "DPO (judge)" --label "ReFL (soft colour)" \
          -o "$out/dmdr-variants-reward.png"
      python -m zimagekit plot runs/shapes-dmdr-long --metric reward/mean --window 10 -o "$out/dmdr-long-reward.png"
      python -m zimagekit plot runs/shapes-dmdr-awr runs/shapes-dmdr-awr-w3 --metric reward/mean \
          --metric reward/flat_groups --metric awr_loss --window 10 --label "AWR, λ = 1" --label "AWR, λ = 3" \
          -o "$out/dmdr-awr-reward.png"
      python -m zimagekit plot runs/shapes-awr-alone runs/shapes-dmdr-awr --metric reward/mean --window 5 \
          --label "AWR alone (no DM)" --label "DMD + AWR" -o "$out/awr-alone-reward.png"
      python -m zimagekit plot runs/shapes-dmdr-awr-g8 --metric reward/mean --metric reward/flat_groups \
          --metric awr_loss --window 20 -o "$out/dmdr-awr-g8-reward.png" ;;
    hack)     # the control of DMDR Fig. 4: ReFL on the hackable colour-mass reward, without DM
      train_export shapes-hack-rl-only configs/shapes/dmdr.yaml dmdr.rl=refl dmdr.dm_weight=0 dmdr.rl_weight=1 \
          dmdr.reward=zimagekit.shapes.rewards:ColourMassReward train.steps=200
      evaluate hack-rl-only runs/export/shapes-hack-rl-only 8 0 ;;
  esac
done
