#!/usr/bin/env bash
# The GPU test suite in two halves, each within one 10-minute device call (the whole suite compiles for about 12
# minutes on an H100), the demo with the first half, and optionally bench_linear with the second. Logs and results
# go to $OUT. Run the halves back to back on one warm machine, so the second reuses the first's compile cache.
#   bash bench/gpu_run.sh a                       demo, multi-rank, error and fault tests
#   bash bench/gpu_run.sh b [bench_linear args]   kernel, edge, scale, shard, tolerance and tuning tests
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
half=${1:?a or b}; shift
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
case "$half" in
  a) files="tests/test_demo.py tests/test_dist.py tests/test_errors.py tests/test_faults.py" ;;
  b) files="tests/test_edges.py tests/test_kernels.py tests/test_scale.py tests/test_shards.py tests/test_tolerance.py tests/test_tune.py" ;;
  *) echo "gpu_run.sh: the first argument is a or b" >&2; exit 2 ;;
esac
# shellcheck disable=SC2086
timeout 540 python3 -m pytest -v -p no:cacheprovider --durations=15 $files 2>&1 | tee "$OUT/pytest_gpu_$half.log" | tail -25
if [ "$half" = a ]; then
  timeout 60 python3 -m fused_tp demo 2>&1 | tee "$OUT/demo_gpu.txt"
elif [ $# -gt 0 ]; then
  timeout 300 python3 bench/bench_linear.py "$@" 2>&1 | tee "$OUT/bench_linear.log" | tail -40
  cp -r bench/results/* "$OUT/" 2>/dev/null
fi
