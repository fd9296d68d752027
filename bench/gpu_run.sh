#!/usr/bin/env bash
# One device call: the test suite with compiled kernels, the demo, and a bench. Logs and results go to $OUT.
#   bash bench/gpu_run.sh [tests-seconds] [bench args...]
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
tests_s=${1:-400}; shift || true
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
timeout "$tests_s" python3 -m pytest -v -p no:cacheprovider --durations=15 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
timeout 120 python3 -m fused_tp demo 2>&1 | tee "$OUT/demo_gpu.txt"
if [ $# -gt 0 ]; then
  timeout 300 python3 bench/bench_linear.py "$@" 2>&1 | tee "$OUT/bench_linear.log" | tail -40
  cp -r bench/results/* "$OUT/" 2>/dev/null
fi
