#!/bin/bash
# Issue 20's GPU table in one lease command (one GPU, under 10 minutes), from the repository
# root:   OUT=DIR bash scripts/gpu_bench_lease.sh
#   1. benchmarks/bench_gpu.py at the released 6B config in bf16: forward (ours and diffusers',
#      eager and regionally compiled), an 8-step 1024² generation, training throughput
#      (the shapes teacher in a bare loop and through the Trainer, LoRA on the 6B) -> gpu.json;
#   2. if time is left, the forward part again with CUDA graphs (compile mode
#      reduce-overhead) -> gpu-cudagraphs.json.
# Everything printed goes to OUT/gpu-bench.log. Packages the machine lacks come as wheels in
# .whl/ (scripts/lease_env.sh).
# The CPU rehearsal: DEVICE_ARGS="--preset tiny --device cpu --dtype fp32 --repeats 1 --no-compile"
set -u -o pipefail
OUT=${OUT:-runs/gpu-bench}
END=${END:-540}
DEVICE_ARGS=${DEVICE_ARGS:-}
L=$OUT/gpu-bench.log
. scripts/lease_env.sh
nvidia-smi 2>&1 | head -15 | tee -a "$L"
timeout $(( END - $(date +%s) + S )) python3 benchmarks/bench_gpu.py $DEVICE_ARGS --json "$OUT/gpu.json" 2>&1 | tee -a "$L"
LEFT=$(( END - $(date +%s) + S ))
echo "[$(( $(date +%s) - S ))s] main table done, ${LEFT}s left" | tee -a "$L"
if [ "$LEFT" -gt 150 ] && [ -z "$DEVICE_ARGS" ]; then
  timeout "$LEFT" python3 benchmarks/bench_gpu.py --parts forward --compile-mode reduce-overhead \
    --json "$OUT/gpu-cudagraphs.json" 2>&1 | tee -a "$L"
fi
echo "[$(( $(date +%s) - S ))s] done" | tee -a "$L"
