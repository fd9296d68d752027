#!/usr/bin/env bash
# The multi-GPU runs (one GPU per rank), each part within one 10-minute device call: the NCCL multi-rank and fault
# tests at the given world sizes, or the TP MLP bench at one TP size. Logs go to $OUT, what the bench wrote to
# $OUT/results.tgz (only files this run wrote: the device's fetch takes at most 8 files). NVLink multicast stays off
# as the machine sets it (NCCL_NVLS_ENABLE=0 and the rest): nothing here changes those variables.
#   bash bench/multi_gpu_run.sh tests 2,4        tests/test_dist.py and test_faults.py over NCCL, worlds 2 and 4
#   bash bench/multi_gpu_run.sh bench 4 [args]   torchrun --nproc-per-node 4 bench/bench_tp_mlp.py [args]
# LIMIT_S (default 540) bounds the run in seconds.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
part=${1:?tests or bench}; n=${2:?world sizes}; shift 2
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  env | grep -E 'NVLS|MULTICAST' | sort; } | tee "$OUT/env.txt"
case "$part" in
  tests) FUSED_TP_TEST_BACKEND=nccl FUSED_TP_TEST_WORLDS=$n timeout "${LIMIT_S:-540}" python3 -m pytest -v \
           -p no:cacheprovider --tb=short tests/test_dist.py tests/test_faults.py 2>&1 \
           | tee "$OUT/pytest_nccl_worlds_${n//,/-}.log" | tail -8 ;;
  bench) timeout "${LIMIT_S:-540}" torchrun --nproc-per-node "$n" bench/bench_tp_mlp.py "$@" 2>&1 \
           | grep -v '^\[rank[1-9]' | tee "$OUT/bench_tp_mlp_tp$n.log" | tail -12 ;;
  *) echo "multi_gpu_run.sh: the first argument is tests or bench" >&2; exit 2 ;;
esac
find bench/results -type f -newer "$OUT/env.txt" | tar czf "$OUT/results.tgz" -T -
