#!/usr/bin/env bash
# The GPU test suite within one 10-minute device call: pytest-xdist workers (the GPU image has pytest-xdist) spread
# over the machine's GPUs, since the files one after another compile and run for over 15 minutes on an H100, most
# of it compiling on one host core; then the demo; optionally bench_linear afterwards, alone on the machine.
# The log, the demo's output and the environment go to $OUT; what bench_linear wrote to $OUT/results.tgz (the
# device's fetch takes at most 8 files).
#   bash bench/gpu_run.sh                      the suite and the demo
#   bash bench/gpu_run.sh [bench_linear args]  the same, then bench/bench_linear.py with those arguments
# LIMIT_S (default 450) bounds the parallel part of the suite in seconds.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# the hypothesis profile with a quarter of CI's examples (tests/conftest.py): each compiles on a GPU
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
# the GPUs: CUDA_VISIBLE_DEVICES's where set, else all. test_scale.py's big tensors need 40 GiB free on the GPU: it
# runs alone, after the rest.
export FUSED_TP_TEST_GPUS=${CUDA_VISIBLE_DEVICES:-$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd,)}
timeout "${LIMIT_S:-450}" python3 -m pytest -n 8 -v -p no:cacheprovider --durations=20 --ignore tests/test_scale.py \
  tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
timeout 120 python3 -m pytest -v -p no:cacheprovider tests/test_scale.py 2>&1 | tee -a "$OUT/pytest_gpu.log" | tail -3
timeout 60 python3 -m fused_tp demo 2>&1 | tee "$OUT/demo_gpu.txt"
if [ $# -gt 0 ]; then
  timeout 300 python3 bench/bench_linear.py "$@" 2>&1 | tee "$OUT/bench_linear.log" | tail -40
  find bench/results -type f -newer "$OUT/env.txt" | tar czf "$OUT/results.tgz" -T -
fi
