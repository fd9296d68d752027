"""Where two tuned tables choose differently, and what it costs there.

A tune's entry serves every launch it is the nearest entry of, timed or not: on the H100 the `small` preset's
weight-gradient entries ran the decode set's Llama shards up to 2.5x slower than the entries they displaced until
they got a reach (bench/NOTES.md, session 51). This lists the launches of the presets' layers whose table config
(tables.table_config: nearest bucket, reach, GEMV rule) differs between an older table and the shipped one, then
times each with either table's whole plan (operand path, config, split), replayed from CUDA graphs on operand copies
that cover three L2s as tune's graph timer does, beside torch's product, and checks the new plan against float64.

    git show HEAD:fused_tp/kernels/tuned/<gpu>.json > old.json     # before the tune's table is copied in
    python bench/compare_tables.py --old old.json [--new NEW.json] [--product fwd|dgrad|wgrad] [--dtype bf16|fp16]
                                   [--shapes decode speed mid layers swiglu small grid | FILE ..] [--list] [--gpu NAME]
                                   [--pin]

--new defaults to the shipped tables (fused_tp/kernels/tuned/). --list prints the launches and both configs, for
--gpu's entries (default: the visible GPU's), and times nothing. A timed run, of the visible GPU's entries, writes
bench/results/<gpu>/compare_tables_<product>_<dtype>.json and prints a table, the geometric means against torch, and
the launches the new table runs more than 5% slower. --pin then keeps the old config at each of those launches: it
writes an entry of reach 0 at the launch's bucket, with the config the old table ran there (its entry's, or the
rule's), into the new table (--new, or the shipped table of this GPU), unless the new table has an entry of its own
in that bucket (the tune timed that bucket: printed, not pinned). A tune's entries help most launches near them and
slow a few (session 52: the H100's grad_input grid, 65 entries a dtype); a pin of reach 0 serves only the launches
of its own bucket, which the old table served with that config, so it changes nothing else. Without a GPU, Triton's
interpreter runs the launches of the interpreter's entries (--gpu triton-interpreter), timed by the wall clock: a
check of the script, nothing kept."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import sys
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fused_tp is imported: the kernels need a path on the CPU

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import DTYPES, env, geomean, markdown_table, results_dir, write  # noqa: E402

from fused_tp import path_counts  # noqa: E402
from fused_tp.kernels import autotune, configs, plan, tables  # noqa: E402
from fused_tp.kernels.jit import INTERPRETED  # noqa: E402
from fused_tp.tolerance import NORM_CHECK, rel_err  # noqa: E402
from fused_tp.tune import graph_timer, launch_dims, load_shapes, problem  # noqa: E402

PRODUCTS = ("fwd", "dgrad", "wgrad")
SLOWER = 1.05  # a launch the new table runs more than this much slower is listed after the table


@contextlib.contextmanager
def using(table_dir: pathlib.Path):
    """Plans drawn from the tables in `table_dir` inside the block (plans made before are forgotten on the way in
    and out)."""
    shipped = tables.TABLE_DIR
    tables.TABLE_DIR = table_dir
    tables.tuned_table.cache_clear()
    plan.clear_caches()
    try:
        yield
    finally:
        tables.TABLE_DIR = shipped
        tables.tuned_table.cache_clear()
        plan.clear_caches()


def table_dir_of(path: str, where: str, scratch: pathlib.Path) -> pathlib.Path:
    """A folder holding only the table file `path` (checked: a malformed table exits naming `where`)."""
    try:
        tables.load_table(pathlib.Path(path))
    except ValueError as e:
        raise SystemExit(f"{where}: {e}") from None
    folder = scratch / where.strip("-")
    folder.mkdir()
    shutil.copy(path, folder / "table.json")
    return folder


def changed(gpu, product, dtype, layers, old_dir, new_dir) -> list[dict]:
    """The layers whose launch takes another config from the new tables than from the old, on either operand path."""
    launches = {layer: launch_dims(product, *layer) for layer in layers}
    picks = {}  # table: {layer: {tma: config}}
    for name, folder in (("old", old_dir), ("new", new_dir)):
        with using(folder):
            picks[name] = {
                layer: {tma: tables.table_config(gpu, product, *dims, dtype, tma) for tma in (True, False)}
                for layer, dims in launches.items()
            }
    rows = []
    for (M, K, N), dims in launches.items():
        pick = {name: chosen[(M, K, N)] for name, chosen in picks.items()}
        paths = [tma for tma in (True, False) if pick["old"][tma] != pick["new"][tma]]
        if paths:
            rows.append(dict(M=M, K=K, N=N, launch_mnk=list(dims), paths=paths, picks=pick))
    return rows


def short(cfg) -> str:
    """A config in a few words: its tile (or the GEMV form), warps, stages, and what it sets apart from the default
    (a data-parallel grid, operands or C through pointers, a pinned split); "rule" where the table has none."""
    if cfg is None:
        return "rule"
    form = "gemv" if cfg.BLOCK_M == 1 else f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}"
    extra = (" grid" if not cfg.persistent else "") + (" ptr" if not cfg.tma else " ptr-C" if not cfg.tma_c else "")
    return f"{form} w{cfg.num_warps} s{cfg.num_stages}{extra}{f' split {cfg.split_k}' if cfg.split_k else ''}"


def pin_entries(rows: list[dict], own: set) -> tuple[dict, list[dict]]:
    """({path: {bucket key: entry}}, the rows not pinned) for the timed `rows` the new table ran more than SLOWER
    slower: each an entry of reach 0 with the config the old table ran (`old_config_dict`), unless its bucket is in
    `own` ({(path, bucket key)}: buckets the new table has an entry of its own in). Rows in one bucket and path share
    the old table's config (its pick depends on the bucket alone), so the first one's timing is kept."""
    pins, skipped = {}, []
    for r in rows:
        if r["new_over_old"] <= SLOWER:
            continue
        key = tables.table_key(*r["launch_mnk"])
        if (r["path"], key) in own:
            skipped.append(r)
            continue
        m, n, k = r["launch_mnk"]
        pins.setdefault(r["path"], {}).setdefault(
            key,
            dict(
                config=r["old_config_dict"],
                reach=0,
                shape_MKN=r["layer_MKN"],
                ms=r["old_us"] / 1e3,
                torch_ms=r["torch_us"] / 1e3,
                ratio=r["torch_us"] / r["old_us"],
                flops=2 * m * n * k,
                timer="graph",
                pinned=f"compare_tables.py: the new table's config ran {r['new_over_old']:.2f}x this time",
            ),
        )
    return pins, skipped


def own_buckets(path: pathlib.Path, gpu: str, product: str, dtype: str) -> set:
    """{(operand path, bucket key)}: the buckets the table file `path` (if there) has entries in for gpu / product /
    dtype."""
    found = tables.load_table(path).get(gpu, {}) if path.exists() else {}
    return {
        (route, tables.table_key(*b))
        for (p, d, route), entries in found.items()
        if (p, d) == (product, dtype)
        for b in entries
    }


def write_pins(path: pathlib.Path, gpu: str, product: str, dtype: str, pins: dict) -> None:
    """Adds `pins` ({path: {bucket key: entry}}) to the table file `path` under gpu / product / dtype, and checks
    that the file still loads."""
    data = json.loads(path.read_text()) if path.exists() else {"format": 1, "gpus": {}}
    routes = data["gpus"].setdefault(gpu, {}).setdefault(product, {}).setdefault(dtype, {})
    for route, entries in pins.items():
        routes.setdefault(route, {}).update(entries)
    path.write_text(json.dumps(data, indent=1) + "\n")
    tables.load_table(path)


def old_config(cfg, rows: int, dtype, tma: bool):
    """The config the old table ran a launch of `rows` rows with: its entry's, or the rule's where it had none."""
    return cfg if cfg is not None else configs.rule_config(rows, dtype, INTERPRETED, tma)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the older table file")
    p.add_argument("--new", help="the newer table file (default: the shipped tables)")
    p.add_argument("--product", choices=PRODUCTS, default="fwd")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument(
        "--shapes",
        nargs="+",
        default=["decode", "speed", "mid", "layers", "swiglu", "small", "grid"],
        help="presets or files",
    )
    p.add_argument("--list", action="store_true", help="list the launches whose config changes; time nothing")
    p.add_argument("--gpu", help="whose entries to compare (default: the GPU's name)")
    p.add_argument(
        "--pin", action="store_true", help="keep the old config where the new table runs a launch over 5%% slower"
    )
    p.add_argument("--rep-ms", type=float, default=30, help="each timing's budget in ms (tune's graph timer)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    here = plan.device(torch.cuda.current_device() if cuda else -1).gpu  # whose entries this machine's launches take
    gpu = args.gpu or here
    if args.pin and args.list:
        raise SystemExit("--pin: pins come from timings, which --list does not take")
    if gpu != here and not args.list:
        raise SystemExit(f"--gpu {gpu}: its entries can only be listed here (--list); launches here take {here}'s")
    dtype = DTYPES[args.dtype]
    layers = list(dict.fromkeys(s for spec in args.shapes for s in load_shapes(spec)))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = pathlib.Path(scratch)
        old_dir = table_dir_of(args.old, "--old", scratch)
        new_dir = table_dir_of(args.new, "--new", scratch) if args.new else tables.TABLE_DIR
        rows = changed(gpu, args.product, dtype, layers, old_dir, new_dir)
        print(f"{len(rows)} of {len(layers)} layers' {args.product} launches take another config ({gpu}, {args.dtype})")
        if args.list:
            for r in rows:
                for tma in r["paths"]:
                    old, new = r["picks"]["old"][tma], r["picks"]["new"][tma]
                    print(
                        f"  {r['M']} x {r['K']} -> {r['N']}: launch {'x'.join(map(str, r['launch_mnk']))} "
                        f"{'tma' if tma else 'pointers'}: {short(old)} -> {short(new)}"
                    )
            return
        timer = (lambda fn: graph_timer(fn, args.rep_ms)) if cuda else autotune.timer
        timed = []
        for r in rows:
            how = ("cuda", "graph") if cuda else ("cpu", "flush")
            ours, theirs, _, check, _ = problem(args.product, r["M"], r["K"], r["N"], dtype, *how)
            before = path_counts["tma"]
            with configs.pin_config(configs.ROUTE_PROBE):  # the path the operands take, as tune finds it
                ours()
            tma = path_counts["tma"] > before
            if tma not in r["paths"]:
                continue  # the other path's config changed, which these operands do not take
            ms = {}
            for name, folder in (("old", old_dir), ("new", new_dir)):
                with using(folder):
                    ms[name] = timer(ours)
                    if name == "new":
                        err = rel_err(*check(ours()))
            ms["torch"] = timer(theirs)
            if err > NORM_CHECK[args.dtype]:
                raise SystemExit(f"{r['M']} x {r['K']} -> {r['N']}: the new table's {args.product} is off: {err:.2e}")
            timed.append(
                dict(
                    layer_MKN=[r["M"], r["K"], r["N"]],
                    launch_mnk=r["launch_mnk"],
                    path="tma" if tma else "pointers",
                    old_config=short(r["picks"]["old"][tma]),
                    old_config_dict=old_config(r["picks"]["old"][tma], r["launch_mnk"][0], dtype, tma).to_dict(),
                    new_config=short(r["picks"]["new"][tma]),
                    old_us=ms["old"] * 1e3,
                    new_us=ms["new"] * 1e3,
                    torch_us=ms["torch"] * 1e3,
                    new_over_old=ms["new"] / ms["old"],
                    old_over_torch=ms["old"] / ms["torch"],
                    new_over_torch=ms["new"] / ms["torch"],
                    rel_err=err,
                )
            )
            print(f"  {r['M']} x {r['K']} -> {r['N']}: {ms['old'] * 1e3:.2f} -> {ms['new'] * 1e3:.2f} us", flush=True)
    summary = {
        "launches": len(timed),
        "new_over_old": geomean(t["new_over_old"] for t in timed),
        "old_over_torch": geomean(t["old_over_torch"] for t in timed),
        "new_over_torch": geomean(t["new_over_torch"] for t in timed),
        "slower": sum(t["new_over_old"] > SLOWER for t in timed),
        "faster": sum(t["new_over_old"] < 1 / SLOWER for t in timed),
    }
    cols = ["layer_MKN", "launch_mnk", "path", "old_config", "new_config", "old_us", "new_us", "torch_us", "rel_err"]
    print(markdown_table(timed, cols + ["new_over_old", "new_over_torch"]))
    print(
        f"\n{summary['launches']} launches; time against torch's, geometric mean: old table "
        f"{summary['old_over_torch']:.3f}, new {summary['new_over_torch']:.3f} "
        f"(new / old {summary['new_over_old']:.3f}); "
        f"{summary['faster']} faster and {summary['slower']} slower by over {SLOWER - 1:.0%}"
    )
    for t in timed:
        if t["new_over_old"] > SLOWER:
            print(f"  slower: {t['layer_MKN']} launch {t['launch_mnk']}: {t['new_over_old']:.2f}x")
    if not cuda:  # the interpreter's run: nothing to keep
        print(
            "no GPU: Triton's interpreter ran the launches, timed by the wall clock: a check of the script, not speed"
        )
        return
    info = dict(env(), product=args.product, dtype=args.dtype, shapes=args.shapes, old=args.old, new=args.new)
    if args.pin:
        table = pathlib.Path(args.new) if args.new else tables.TABLE_DIR / f"{tables.gpu_slug(gpu)}.json"
        pins, skipped = pin_entries(timed, own_buckets(table, gpu, args.product, args.dtype))
        if pins:
            write_pins(table, gpu, args.product, args.dtype, pins)
        info["pinned"] = {route: sorted(entries) for route, entries in pins.items()}
        print(f"pinned {sum(map(len, pins.values()))} buckets to the old table's config in {table}")
        for r in skipped:
            print(f"  not pinned: {r['layer_MKN']} launch {r['launch_mnk']}: the new table has its own entry there")
    path = results_dir(gpu) / f"compare_tables_{args.product}_{args.dtype}.json"
    write(path, {"env": info, "summary": summary, "rows": timed})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
