#!/usr/bin/env bash
# The GPU test suite in three parts, each within one 10-minute device call (the whole suite compiles and runs for
# over 15 minutes on an H100; part b alone ran past 9 minutes), the demo with the first part, and optionally
# bench_linear with the last. Logs and results go to $OUT. Run the parts back to back on one warm machine, so that
# later ones reuse the earlier ones' compile cache.
#   bash bench/gpu_run.sh a                       demo, multi-rank, error and fault tests
#   bash bench/gpu_run.sh b                       edge, kernel and scale tests
#   bash bench/gpu_run.sh c [bench_linear args]   shard, tolerance and tuning tests
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
part=${1:?a, b or c}; shift
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
case "$part" in
  a) files="tests/test_demo.py tests/test_dist.py tests/test_errors.py tests/test_faults.py" ;;
  b) files="tests/test_edges.py tests/test_kernels.py tests/test_scale.py" ;;
  c) files="tests/test_shards.py tests/test_tolerance.py tests/test_tune.py" ;;
  *) echo "gpu_run.sh: the first argument is a, b or c" >&2; exit 2 ;;
esac
# shellcheck disable=SC2086
timeout 540 python3 -m pytest -v -p no:cacheprovider --durations=15 $files 2>&1 | tee "$OUT/pytest_gpu_$part.log" | tail -25
if [ "$part" = a ]; then
  timeout 60 python3 -m fused_tp demo 2>&1 | tee "$OUT/demo_gpu.txt"
elif [ "$part" = c ] && [ $# -gt 0 ]; then
  timeout 300 python3 bench/bench_linear.py "$@" 2>&1 | tee "$OUT/bench_linear.log" | tail -40
  # only what this run wrote: the device's fetch takes a limited number of files
  find bench/results -type f -newer "$OUT/env.txt" -exec cp --parents {} "$OUT/" \;
fi
