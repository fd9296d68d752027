#!/usr/bin/env bash
# A GPU's decode tables, its small layers' entries and the decode bench, as steps run one after another in one
# device call (on the H100 a dtype's every decode bucket took about 300 s of tuning and the bench about 190 s:
# bench/NOTES.md, attempt 80; split the steps over calls to stay within a call's 10 minutes). Each tune starts from
# the tree's table for this GPU, adds or replaces what it timed and writes the table back into the tree
# (fused_tp/kernels/tuned/<gpu>.json), so the next step and the bench use it; the table, the tune's timings (gzipped,
# as bench/results/<gpu>/tune/ keeps them) and logs and the bench's files go to $OUT/results.tgz (the device's fetch
# takes at most 8 files). Copy the table back into your tree between calls.
#   bash bench/decode_run.sh STEP [STEP ...]
#     tune:bf16:1,4,8,16      tune --missing over the decode-buckets preset's shapes of those token counts
#     retime:bf16:32,64,128   the same shapes, every bucket timed again whether it has an entry or not (after
#                             configs.SPACE grew: bench/NOTES.md, attempt 104)
#     retune:bf16:0.92        tune again (pinned splits included) the buckets that served the last decode bench's
#                             rows below 0.92x at 32-128 tokens, where an entry is there already (tune:'s fill the rest),
#                             but for those shapes a tune with the pinned-split stage timed (the tree's timings files
#                             under bench/results/<gpu>/tune/ and this call's: copy a call's timings there too)
#     stale:bf16              tune again the buckets whose entries were not timed from CUDA graphs: a speed-set tune's,
#                             timed with the L2 flushed, which tune: skips (on the H100, until session 41, the
#                             one-token 8192 -> 14336 and 14336 -> 8192 shards' buckets: 16- and 64-row tiles, 2-10%
#                             slower there than the GEMV form the other one-token buckets run: bench/NOTES.md,
#                             sessions 40 and 41)
#     small:bf16:dgrad        tune --kernel dgrad (or wgrad) --missing over the small preset's layers (16-128 tokens into
#                             256-1024 features; grad_input's at 64-128 only), whose buckets the decode and speed sets'
#                             entries are far from (on the H100 grad_input's ran at 2.6x torch's time at 64-128 tokens
#                             until attempt 114 tuned them)
#     grid:bf16:dgrad         the same over the grid preset (32-512 tokens into 512-4096 features), with --reach 1.0:
#                             on the H100 grad_input there ran at 1.2x torch's time on the entries of the buckets
#                             around it (session 52); follow it with compare:DTYPE:dgrad, which pins what it slowed
#     compare:bf16:wgrad      bench/compare_tables.py --product fwd|dgrad|wgrad --pin: the launches of the presets'
#                             layers whose config the call's steps so far changed (the table as the call found it
#                             against the tree's now), timed with both beside torch's (a new entry serves every launch
#                             it is the nearest entry of, timed or not: session 51); where the new config ran a launch
#                             over 5% slower, the old one is pinned in that launch's bucket (reach 0: session 52)
#     bench:bf16              bench/bench_linear.py --shapes decode --ops forward
set -u
for step in "$@"; do  # every step's form checked before the first runs
  [[ $step =~ ^((tune|retime):[a-z0-9]+:[0-9,]+|retune:[a-z0-9]+:[0-9.]+|(small|grid):[a-z0-9]+:(dgrad|wgrad)|compare:[a-z0-9]+:(fwd|dgrad|wgrad)|(stale|bench):[a-z0-9]+)$ ]] ||
    { echo "decode_run.sh: a step is tune:DTYPE:M,M,.. retime:DTYPE:M,M,.. retune:DTYPE:RATIO small:DTYPE:dgrad|wgrad grid:DTYPE:dgrad|wgrad compare:DTYPE:fwd|dgrad|wgrad stale:DTYPE or bench:DTYPE, got $step" >&2
      exit 2; }
done
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/tune"
# the GPU's table name as fused_tp names it (on the CPU with TRITON_INTERPRET=1: the interpreter's, a check of this
# script, with SHAPES=tiny for tune: a preset in place of decode-buckets or small), and the versions, from one Python
# (each import of torch costs seconds on a small CPU: tests/test_tune.py runs this script eight times)
info=$(python3 -c "import torch, triton; from fused_tp.kernels import plan, tables
print(tables.gpu_slug(plan.device(torch.cuda.current_device() if torch.cuda.is_available() else -1).gpu))
print('torch', torch.__version__, 'triton', triton.__version__)")
slug=${info%%$'\n'*}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  echo "${info#*$'\n'}"; } | tee "$OUT/env.txt"
table=fused_tp/kernels/tuned/$slug.json
before=$(mktemp)  # the table as the call found it, which compare: steps measure the call's changes against
if [ -f "$table" ]; then cp "$table" "$before"; else echo '{"format": 1, "gpus": {}}' > "$before"; fi
tune() {  # tune KERNEL DTYPE TAG [tune args]: the tune with the tree's table in --out, then the table back into the tree
  local kernel=$1 dtype=$2 tag=$3 work; shift 3
  work=$(mktemp -d); [ -f "$table" ] && cp "$table" "$work/"
  # the progress bar's lines left out of the log
  python3 -m fused_tp tune --kernel "$kernel" --dtype "$dtype" --timer graph --rep-ms 30 --out "$work" "$@" 2>&1 \
    | grep -Ev 'config/s\]|s/config\]' > "$OUT/tune/tune_${kernel}_${dtype}_$tag.log"
  tail -2 "$OUT/tune/tune_${kernel}_${dtype}_$tag.log"
  [ -f "$work/$slug.json" ] && cp "$work/$slug.json" "$table" && cp "$table" "$OUT/"
  # the timings gzipped, as the tree keeps them (about 14x smaller: the tree travels to the device within 64 MiB)
  [ -f "$work/timings_${kernel}_$dtype.json" ] && gzip -9nc "$work/timings_${kernel}_$dtype.json" \
    > "$OUT/tune/timings_${kernel}_${dtype}_$tag.json.gz"
  [ -f "$work/tune_${kernel}_$dtype.png" ] && cp "$work/tune_${kernel}_$dtype.png" \
    "$OUT/tune/tune_${kernel}_${dtype}_$tag.png"
}
for step in "$@"; do
  IFS=: read -r what dtype arg <<< "$step"
  start=$(date +%s)
  case $what in
    tune) tune fwd "$dtype" "decode-${arg//,/-}" --shapes "${SHAPES:-decode-buckets}" --tokens ${arg//,/ } --missing ;;
    retime) tune fwd "$dtype" "retime-${arg//,/-}" --shapes "${SHAPES:-decode-buckets}" --tokens ${arg//,/ } ;;
    retune)
      python3 - "$slug" "$dtype" "$arg" "$OUT" > "$OUT/retune_$dtype.txt" <<'EOF'
import glob, gzip, json, sys
from fused_tp.kernels import tables
slug, dtype, below, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
bench = json.load(open(f"bench/results/{slug}/bench_linear_{dtype}_decode.json"))
have = set().union(*(v for k, v in tables.tuned_table(bench["env"]["gpu"]).items() if k[:2] == ("fwd", dtype)))
# the buckets a tune with the pinned-split stage timed already (this call's timings, or the tree's; the stage's own
# rows mark the files written before their env said so), whose entries a re-tune would only time again
split_era = set()
for f in glob.glob(f"bench/results/{slug}/tune/timings_fwd_{dtype}*.json.gz") + glob.glob(f"{out}/tune/timings_fwd_{dtype}_*.json.gz"):
    timings = json.load(gzip.open(f))
    rows = timings["rows"]
    if "splits_timed" in timings["env"] or any(r.get("stage") == "split" for r in rows):
        split_era |= {tables.bucket_of(r["M"], r["N"], r["K"]) for r in rows if r["product"] == "fwd"}
picked = {}  # one shape per bucket, the largest, as tune's table keeps
for r in bench["rows"]:
    bucket = tables.bucket_of(r["M"], r["N"], r["K"])
    if r["M"] >= 32 and r["ratio"] < below and bucket in have and bucket not in split_era:
        picked[bucket] = max(picked.get(bucket, (0, 0, 0)), (r["M"], r["K"], r["N"]), key=lambda s: s[0] * s[1] * s[2])
print("".join(f"{m},{k},{n}\n" for m, k, n in sorted(picked.values())), end="")
EOF
      if [ -s "$OUT/retune_$dtype.txt" ]; then tune fwd "$dtype" retune --shapes "$OUT/retune_$dtype.txt"
      else echo "retune: no row below $arg whose entry a tune without pinned splits made"; fi ;;
    stale)
      python3 - "$table" "$dtype" "${SHAPES:-decode-buckets}" > "$OUT/stale_$dtype.txt" <<'EOF'
import json, os, sys
from fused_tp.shapes import PRESETS
from fused_tp.kernels import tables
path, dtype, preset = sys.argv[1:]
timers = {}  # bucket: the timers its entries (either operand path) were timed with
if os.path.exists(path):
    for products in json.load(open(path))["gpus"].values():
        for entries in products.get("fwd", {}).get(dtype, {}).values():
            for key, entry in entries.items():
                timers.setdefault(key, set()).add(entry.get("timer"))
stale = [s for s in PRESETS[preset] if timers.get(tables.table_key(s[0], s[2], s[1]), {"graph"}) != {"graph"}]
print("".join(f"{m},{k},{n}\n" for m, k, n in stale), end="")
EOF
      if [ -s "$OUT/stale_$dtype.txt" ]; then tune fwd "$dtype" stale --shapes "$OUT/stale_$dtype.txt"
      else echo "stale: every entry of those buckets was timed from CUDA graphs"; fi ;;
    # The entries serve only shapes within 1.6 log2 steps of their buckets (a factor of 3, never 4): on the H100 the
    # weight gradient's, unlimited, were the nearest entry of 4-128-token Llama shards 4096-8192 wide and ran them up
    # to 2.5x slower, while every shape they took within log2(3) ran 6-27% faster (session 51). grad_input's 16-token
    # buckets are left out: on the H100 they timed no faster at the small layers than the 64-token entries.
    small) tune "$arg" "$dtype" small --shapes "${SHAPES:-small}" --missing --reach 1.6 \
             $([ "$arg" = dgrad ] && [ -z "${SHAPES:-}" ] && echo --tokens 64 128) ;;
    # Entries serve a log2 step from their bucket at most: on the H100, with no reach, the grid's bf16 grad_input
    # entries ran the launches they took within one step at 0.88x their time before (88 launches) and the farther
    # ones at 1.02x (26, 8 of them over 5% slower: Llama shards 6144-8192 wide); fp16's farther ones gained (0.87x
    # over 59), which one reach for both dtypes leaves out (session 52). Widening a dtype's entries afterwards is a
    # table edit and a compare_tables.py --pin against the table before it: on the H100 fp16's, with no reach, then
    # ran 49 launches at 0.854x their time before (after 8 pins), bf16's at 0.985x over 13 (after 12 pins: not kept;
    # attempts 120-121).
    grid) tune "$arg" "$dtype" grid --shapes "${SHAPES:-grid}" --missing --reach 1.0 ;;
    compare)
      python3 bench/compare_tables.py --old "$before" --product "$arg" --dtype "$dtype" ${SHAPES:+--shapes $SHAPES} --pin \
        > "$OUT/compare_${dtype}_$arg.log" 2>&1
      tail -4 "$OUT/compare_${dtype}_$arg.log"
      [ -f "$table" ] && cp "$table" "$OUT/" ;;
    bench)
      python3 bench/bench_linear.py --shapes decode --ops forward --dtype "$dtype" 2>&1 \
        | tail -60 > "$OUT/bench_linear_${dtype}_decode.log"
      tail -3 "$OUT/bench_linear_${dtype}_decode.log" ;;
  esac
  echo "== $step: $(( $(date +%s) - start )) s"
done
find bench/results -type f -newer "$OUT/env.txt" -exec cp --parents {} "$OUT/" \;
( cd "$OUT" && tar czf /tmp/results.tgz . && rm -rf ./* && mv /tmp/results.tgz . )
