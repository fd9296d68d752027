"""`python -m fused_tp tune`: time every config of the space on each shape, keep every timing, write a tuned table.

For each product (fwd: y = x @ w.T + b, dgrad: grad_x = grad_y @ w, wgrad: grad_w = grad_y.T @ x with grad_b,
dgrad_gated: grad_pre = (grad_y @ w) * swiglu'(pre), SwiGLU's grad_input, against autograd's LlamaMLP backward) and
shape (tokens M, in-features K, out-features N), every config of `configs.candidates` runs pinned, its output is
checked against torch, then it is timed beside torch (cuBLAS on a GPU) in the same process; where the chosen config
leaves SMs without an output tile, it is timed at pinned splits of its K loop too (_pin_splits). Written to --out:

    timings_<kernel>_<dtype>.json   every timing: product, shape, path, config, ms (the minimum of ms_rounds:
                                    the contenders are timed three times, autotune.contenders), TF/s, torch's
                                    ms, ratio
    <gpu-slug>.json                 the tuned table (tables.load_table's format): the fastest config per product,
                                    dtype, operand path and shape bucket, merged with the entries of other
                                    buckets a table already there holds; copy it into fused_tp/kernels/tuned/
    tune_<kernel>_<dtype>.png       TF/s of each config on each shape (with matplotlib installed)
and a markdown table of the best configs and their speed against torch on stdout.

On a machine without a GPU it runs through Triton's interpreter (TRITON_INTERPRET=1 set before fused_tp is
imported), timed by the wall clock, which says nothing about speed but exercises the whole command.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import pathlib
import re
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import kernels, path_counts
from .kernels import autotune, configs, plan, tables
from .kernels.epilogues import ACTIVATIONS
from .kernels.matmul import INTERPRETED
from .shapes import PRESETS
from .tolerance import NORM_CHECK, rel_err

# --dtype: the operand dtype; fp32 twice, as tf32 (torch.backends.cuda.matmul.allow_tf32 on, for cuBLAS and for
# fused_tp) and fp32 (off): tables.TABLE_DTYPES.
DTYPES = {**tables.DTYPES, "tf32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernel",
        choices=[*configs.PRODUCTS, "all"],
        default="all",
        help="which product: fwd (x @ w.T + b), dgrad (grad_y @ w), wgrad (grad_y.T @ x, grad_b), dgrad_gated "
        "((grad_y @ w) * swiglu'(pre)); all: the four",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="bf16",
        help="operand dtype; tf32 is fp32 with allow_tf32 on, fp32 with it off",
    )
    parser.add_argument("--shapes", default="speed", help=f"a preset ({', '.join(PRESETS)}) or a file of M,K,N lines")
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        metavar="M",
        help="only the shapes of --shapes with these token counts (M): a preset in parts, each within a time limit",
    )
    parser.add_argument("--out", default="tune-out", help="directory for the results")
    parser.add_argument(
        "--missing",
        action="store_true",
        help="only the shapes whose table bucket has no entry yet, for this GPU, product, dtype and operand path, "
        "in the table in --out or the shipped ones (a table's new buckets, without re-tuning the rest)",
    )
    parser.add_argument(
        "--reach",
        type=float,
        metavar="STEPS",
        help="the new entries serve only shapes at most this many log2 steps (summed over M, N, K) from their "
        "buckets: a preset's entries kept from the shapes far from it (tables.py)",
    )
    parser.add_argument(
        "--rep-ms",
        type=float,
        default=100,
        help="GPU: each timing's budget in ms (do_bench's rep; 25 ms of warm-up before it)",
    )
    add_timer_argument(parser)


def add_timer_argument(parser: argparse.ArgumentParser) -> None:
    """--timer, for tune and the benches that time its problems."""
    parser.add_argument(
        "--timer",
        choices=["auto", *TIMERS],
        default="auto",
        help="GPU: flush (do_bench, the L2 cleared before every call) or graph (calls on rotated operand copies "
        "replayed from a CUDA graph); auto: graph for the decode presets, flush for the rest",
    )


def load_shapes(spec: str) -> list[tuple[int, int, int]]:
    if spec in PRESETS:
        return PRESETS[spec]
    path = pathlib.Path(spec)
    if not path.is_file():
        raise SystemExit(f"--shapes: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    shapes = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if line:
            parts = re.split(r"[,\s]+", line)
            if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise SystemExit(f"--shapes: {spec}, line {n}: expected three positive integers M,K,N, got {line!r}")
            shapes.append(tuple(int(p) for p in parts))
    if not shapes:
        raise SystemExit(f"--shapes: {spec} lists no shapes")
    return shapes


def gpu_timer(fn, rep_ms: float = 100) -> float:
    """do_bench's median, by default with 4x the timing budget of run-time autotuning: a shipped table is worth it.
    do_bench clears the L2 before every call by writing zeros over 256 MB: the timed call then starts on an L2 full
    of dirty lines, which it writes back as it reads (bench/NOTES.md, attempt 38b)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


GRAPH_CALLS = 64  # the fewest calls a timed graph holds: as many as a problem has operand copies at most (COPIES_MAX)
GRAPH_REPLAYS = 8


def graph_timer(fn, rep_ms: float = 100) -> float:
    """ms per call of `fn` replayed from a CUDA graph of back-to-back calls, as a decode step runs under CUDA graphs
    (vLLM, torch.compile's reduce-overhead): no host time between launches, and no L2 state but what the calls
    themselves leave. `fn` cycles through operand copies (problem's `copies`), so that no call finds its weight in
    the L2 left by the one before. The median of GRAPH_REPLAYS replays; the graph holds enough calls for about
    rep_ms / GRAPH_REPLAYS ms."""
    import statistics

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile, plan and allocate before the capture, on a side stream as it asks
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(GRAPH_CALLS):
        fn()
    end.record()
    end.synchronize()
    each = start.elapsed_time(end) / GRAPH_CALLS  # with host time between launches: an upper bound
    calls = max(GRAPH_CALLS, min(100 * GRAPH_CALLS, round(rep_ms / GRAPH_REPLAYS / each)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(GRAPH_REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


TIMERS = {"flush": gpu_timer, "graph": graph_timer}
COPIES_L2 = 3  # operand copies a graph timing cycles through cover this many L2s
COPIES_MAX = GRAPH_CALLS


def copies_for(nbytes: int, timer: str, device) -> int:
    """How many operand copies of `nbytes` a timing by `timer` cycles through: for "graph", enough to cover COPIES_L2
    times the GPU's L2 (at most COPIES_MAX), so that every call reads its operands from memory; else one."""
    if timer != "graph":
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, min(COPIES_MAX, -(-COPIES_L2 * l2 // nbytes)))


def timer_name(choice: str, preset: str) -> str:
    """--timer's value: "auto" is "graph" for the decode presets, `small` and `grid` (decode runs under CUDA graphs,
    and do_bench's L2 clearing costs a product that small as much as its own time), "flush" for the rest."""
    return (
        ("graph" if preset.startswith("decode") or preset in ("small", "grid") else "flush")
        if choice == "auto"
        else choice
    )


def _same(out):
    return out


class Problem(NamedTuple):
    """One product on fresh operands: fused_tp's call, torch's (cuBLAS on a GPU), the launch's (M, N, K),
    check(ours' output) -> (its first CHECK_ROWS rows, their float64 value), and as_theirs(ours' output) -> it in
    the form theirs returns (for the error between the two): the builder tune and the bench scripts share."""

    ours: Callable
    theirs: Callable
    launch_mnk: tuple[int, int, int]
    check: Callable
    as_theirs: Callable = _same


CHECK_ROWS = 64  # rows (output features for the weight gradient) a check computes in float64


def launch_dims(product: str, M: int, K: int, N: int) -> tuple[int, int, int]:
    """The launch (M, N, K) of `product` (configs.PRODUCTS) for a layer of M tokens, K in-features, N out-features:
    what a table's buckets key it by."""
    return (M, N, K) if product == "fwd" else (N, K, M) if product == "wgrad" else (M, K, N)


def problem(product: str, M: int, K: int, N: int, dtype, device, timer: str = "flush") -> Problem:
    """`product` (configs.PRODUCTS) of y[M, N] = x[M, K] @ w[N, K].T + b on N(0, 1) operands of `dtype` (the weight
    scaled by K^-1/2, so that outputs stay near 1 at any K), from a fixed seed. For a `timer` that needs them
    (copies_for), ours and theirs cycle through copies of the operands, call after call: the same values (check
    holds for every call), different memory."""
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.randn(s, generator=gen, device=device).to(dtype)  # noqa: E731
    s = slice(0, CHECK_ROWS)
    as_theirs = _same
    if product == "fwd":
        x, w, b = ops = rand(M, K), (rand(N, K) / K**0.5).to(dtype), rand(N)
        ours, theirs = kernels.linear, F.linear
        check = lambda y: (y[s], x[s].double() @ w.double().T + b.double())  # noqa: E731
    elif product == "dgrad":
        g, w = ops = rand(M, N), (rand(N, K) / K**0.5).to(dtype)
        ours, theirs = kernels.grad_input, torch.matmul
        check = lambda gx: (gx[s], g[s].double() @ w.double())  # noqa: E731
    elif product == "dgrad_gated":
        # SwiGLU's grad_pre [M, 2K] (interleaved (gate, up) pairs, as ParallelMLP holds them) from the down
        # projection's grad_y and the pre-activation; torch's is what autograd runs for LlamaMLP: cuBLAS's grad
        # through down_proj, then the mul's and silu's backward on separate gate, up and saved silu(gate) tensors.
        g, w, pre = rand(M, N), (rand(N, K) / K**0.5).to(dtype), rand(M, 2 * K)
        gate, up = pre[:, 0::2].contiguous(), pre[:, 1::2].contiguous()
        ops = g, w, pre, gate, up, F.silu(gate)

        def ours(g, w, pre, *_):
            return kernels.grad_input(g, w, activation="swiglu", pre=pre)

        def theirs(g, w, _, gate, up, act):
            grad_act = g @ w
            return torch.ops.aten.silu_backward(grad_act * up, gate), grad_act * act

        check = lambda gp: (gp[s], ACTIVATIONS["swiglu"].torch_grad(g[s].double() @ w.double(), pre[s].double()))  # noqa: E731
        as_theirs = lambda gp: (gp[:, 0::2], gp[:, 1::2])  # noqa: E731
    else:
        g, x = ops = rand(M, N), rand(M, K)
        ours, theirs = kernels.grad_params, lambda g, x: (g.t() @ x, g.sum(0))
        check = lambda gw: (gw[0][s], g[:, s].double().T @ x.double())  # noqa: E731
    nbytes = sum(t.numel() for t in ops) * dtype.itemsize
    copies = [ops] + [tuple(t.clone() for t in ops) for _ in range(copies_for(nbytes, timer, device) - 1)]
    return Problem(_cycling(ours, copies), _cycling(theirs, copies), launch_dims(product, M, K, N), check, as_theirs)


def _cycling(fn, copies: list[tuple]) -> Callable:
    """fn on each operand copy in turn, one call after another (fn on the one copy where there is one)."""
    if len(copies) == 1:
        return functools.partial(fn, *copies[0])
    turn = itertools.cycle(copies)
    return lambda: fn(*next(turn))


def run(args: argparse.Namespace, timer=None) -> dict:
    """The tune command; `timer(fn) -> ms` is injectable (the tests pass a fake one). Returns what it wrote."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = args.dtype == "tf32"  # torch and fused_tp both follow it
    try:
        return _tune(args, timer)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _tune(args: argparse.Namespace, timer) -> dict:
    from tqdm import tqdm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not INTERPRETED:
        raise SystemExit("tune: needs a GPU, or TRITON_INTERPRET=1 set before fused_tp is imported (interpreter)")
    how = timer_name(getattr(args, "timer", "auto"), args.shapes) if device == "cuda" else "flush"
    if timer is None:  # on the CPU, the interpreter's wall clock
        timer = functools.partial(TIMERS[how], rep_ms=args.rep_ms) if device == "cuda" else autotune.timer
    reach = getattr(args, "reach", None)
    if reach is not None and not reach >= 0:
        raise SystemExit(f"--reach: expected a number of log2 steps >= 0, got {reach}")
    dtype, shapes = DTYPES[args.dtype], load_shapes(args.shapes)
    if getattr(args, "tokens", None):
        shapes = [s for s in shapes if s[0] in args.tokens]
        if not shapes:
            raise SystemExit(f"--tokens: no shape of --shapes {args.shapes} has M in {args.tokens}")
    products = configs.PRODUCTS if args.kernel == "all" else (args.kernel,)
    gpu = plan.device(torch.cuda.current_device() if device == "cuda" else -1).gpu
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "dtype": args.dtype,
        "timer": how,
    }

    have = _tuned_buckets(gpu, out_dir) if getattr(args, "missing", False) else {}
    work, skipped = [], 0
    for product in products:
        for M, K, N in shapes:
            ours, theirs, (m, n, k), _, as_theirs = problem(product, M, K, N, dtype, device, how)
            before = path_counts["tma"]
            ref = theirs()
            # Which operand path this product takes (the tuned table is keyed by it): what descriptors can address,
            # found with a tile config, since a GEMV config reads through pointers whatever the operands.
            with configs.pin_config(configs.ROUTE_PROBE):
                ours()
            route = "tma" if path_counts["tma"] > before else "pointers"
            if tables.bucket_of(m, n, k) in have.get((product, args.dtype, route), ()):
                skipped += 1
                continue
            fit = functools.partial(
                configs.fits, itemsize=dtype.itemsize, tma=route == "tma", aux_tile=AUX_TILES.get(product, 0)
            )
            mine = [cfg for cfg in configs.candidates(m, n, k, dtype, route == "tma") if fit(cfg)]
            # The config the tables serve this launch now (a neighbour's entry, or its bucket's own under a re-time)
            # is timed too, and is what a new config must beat (choose): without it, a tune over buckets that a
            # neighbour's entry served well wrote entries slower than it (bench/NOTES.md, session 52).
            served = tables.table_config(gpu, product, m, n, k, dtype, route == "tma", args.dtype == "tf32")
            incumbent = None
            if served is not None and fit(served):
                own = tables.bucket_of(m, n, k) in tables.tuned_table(gpu).get((product, args.dtype, route), {})
                incumbent = ("own" if own else "nearest", served)
                mine += [] if served in mine else [served]
            for cfg in mine:
                mark = incumbent[0] if incumbent and cfg == incumbent[1] else None
                work.append((product, (M, K, N), (m, n, k), route, ours, theirs, as_theirs, ref, cfg, mark))
    if skipped:
        print(
            f"tune: --missing: {skipped} of {len(products) * len(shapes)} shapes skipped, their buckets tuned already"
        )
    if not work:
        raise SystemExit("tune: --missing: every shape's bucket has an entry already; nothing to tune")
    rows, baselines, calls = [], {}, {}
    for product, shape, dims, route, ours, theirs, as_theirs, ref, cfg, mark in tqdm(work, desc="tune", unit="config"):
        if (product, shape) not in baselines:
            baselines[(product, shape)] = [timer(theirs)]
            calls[(product, shape)] = ours, theirs, as_theirs, ref
        with configs.pin_config(cfg):
            err = rel_err(as_theirs(ours()), ref)
            # A config whose output is wrong is kept in the timings, marked, and never chosen.
            ms = timer(ours) if err <= NORM_CHECK[args.dtype] else None
        rows.append(
            dict(
                product=product,
                M=shape[0],
                K=shape[1],
                N=shape[2],
                launch_mnk=list(dims),
                path=route,
                config=cfg.to_dict(),
                ms_rounds=[] if ms is None else [ms],
                rel_err=err,
                passed_check=ms is not None,
                timer=how,
                **({"incumbent": mark} if mark else {}),
            )
        )
    _confirm(rows, calls, baselines, timer, args.dtype)

    best, _ = choose(rows, args.dtype)
    slots = plan.device(torch.cuda.current_device() if device == "cuda" else -1).slots
    rows += _pin_splits(best, calls, timer, slots, dtype.itemsize, NORM_CHECK[args.dtype])
    table = _table(best, args.dtype, reach)
    written = {
        "timings": out_dir / f"timings_{args.kernel}_{args.dtype}.json",
        "table": out_dir / f"{tables.gpu_slug(gpu)}.json",
    }
    # splits_timed: this tune's pinned-split stage, so that a tune's timings say which entries it covered
    timings_env = dict(env, splits_timed=list(SPLITS_TIMED))
    written["timings"].write_text(json.dumps({"env": timings_env, "rows": rows}, indent=1) + "\n")
    if written["table"].exists():  # entries tuned before (other products, dtypes, paths or buckets): keep them,
        # in their order, so that a diff of the table shows what this run changed
        merged = json.loads(written["table"].read_text()).get("gpus", {}).get(gpu, {})
        for product, dtypes in table.items():
            for name, routes in dtypes.items():
                for route, entries in routes.items():
                    merged.setdefault(product, {}).setdefault(name, {}).setdefault(route, {}).update(entries)
        table = merged
    tuned = {
        "format": 1,
        "env": {k: v for k, v in env.items() if k not in ("dtype", "timer")},
        "gpus": {gpu: table},
    }  # all dtypes
    written["table"].write_text(json.dumps(tuned, indent=1) + "\n")
    tables.load_table(written["table"])  # what was written must load
    plot = _plot(rows, out_dir / f"tune_{args.kernel}_{args.dtype}.png", f"fused_tp tune, {args.dtype}, {gpu}")
    if plot:
        written["plot"] = plot
    print(_markdown(best))
    print("\nwrote " + ", ".join(str(p) for p in written.values()))
    return written


def _tuned_buckets(gpu: str, out_dir: pathlib.Path) -> dict:
    """{(product, dtype name, path): {bucket}} that the shipped tables or the table in `out_dir` hold for `gpu`."""
    have = {key: set(entries) for key, entries in tables.tuned_table(gpu).items()}
    mine = out_dir / f"{tables.gpu_slug(gpu)}.json"
    if mine.exists():
        for key, entries in tables.load_table(mine).get(gpu, {}).items():
            have.setdefault(key, set()).update(entries)
    return have


def _confirm(rows: list[dict], calls: dict, baselines: dict, timer, name: str) -> None:
    """Re-time each shape's contenders (autotune.contenders) autotune.CONFIRM_ROUNDS more times, interleaved with
    torch, then fill in every row's ms (the minimum of its ms_rounds), TF/s, torch's ms (the minimum of its rounds)
    and ratio."""
    by_shape = {}
    for r in rows:
        by_shape.setdefault((r["product"], (r["M"], r["K"], r["N"])), []).append(r)
    for key, mine in by_shape.items():
        cands = [configs.KernelConfig(**r["config"]) for r in mine]
        again = autotune.contenders(
            cands, [r["ms_rounds"][0] if r["ms_rounds"] else None for r in mine], _baseline(mine, name)
        )
        ours, theirs = calls[key][:2]
        for _ in range(autotune.CONFIRM_ROUNDS if again else 0):
            baselines[key].append(timer(theirs))
            for i in again:
                with configs.pin_config(cands[i]):
                    mine[i]["ms_rounds"].append(timer(ours))
        base_ms = min(baselines[key])
        for r in mine:
            ms = min(r["ms_rounds"], default=None)
            flops = 2 * r["M"] * r["K"] * r["N"]
            r.update(
                ms=ms,
                tflops=ms and flops / ms / 1e9,
                torch_ms=base_ms,
                torch_rounds=baselines[key],
                torch_tflops=flops / base_ms / 1e9,
                ratio=ms and base_ms / ms,
            )


# The pre-activation tiles a product's epilogue reads, which its configs need room for.
AUX_TILES = {"dgrad_gated": plan.aux_tiles("swiglu", "load")}


def _rule(row: dict, name: str) -> configs.KernelConfig:
    """The rule's config for a timing row's launch (configs.rule_config, with room for the product's tiles)."""
    m = row["launch_mnk"][0]
    return configs.rule_config(m, DTYPES[name], INTERPRETED, row["path"] == "tma", AUX_TILES.get(row["product"], 0))


def _baseline(mine: list[dict], name: str) -> configs.KernelConfig:
    """What a shape's other configs must beat: the config the tables served it before the tune (its row marked
    `incumbent`), else the rule's."""
    served = next((r for r in mine if r.get("incumbent")), None)
    return configs.KernelConfig(**served["config"]) if served else _rule(mine[0], name)


def choose(rows: list[dict], name: str) -> tuple[list[dict], dict]:
    """(the chosen row per product and shape, the tuned table {product: {name: {path: {bucket: entry}}}}), for
    operands of the table dtype `name`.

    A config replaces the baseline (_baseline: the config the tables served the shape before, or the rule's,
    configs.rule_config, always among the candidates) only if it was faster by more than autotune.MARGIN
    (`autotune.choose`; seen on the H100: bench/NOTES.md, attempt 11). A row whose baseline won is marked `kept`
    with where its config came from: its bucket's own entry, which _table leaves as it is, or the nearest entry,
    which _table writes with a reach of 0, so that the bucket keeps that config whatever entries the tune adds
    around it (session 52: nine such buckets, left without an entry, took a new neighbour's, up to 1.31x slower)."""
    by_shape = {}
    for r in rows:
        by_shape.setdefault((r["product"], r["M"], r["K"], r["N"]), []).append(r)
    chosen = []
    for _key, mine in sorted(by_shape.items()):
        timed = [r for r in mine if r["ms"] is not None]
        if not timed:
            continue
        rule = _rule(mine[0], name)
        cands = [configs.KernelConfig(**r["config"]) for r in timed]
        pick = autotune.choose(cands, [r["ms"] for r in timed], _baseline(mine, name))
        by_rule = next((r for r in timed if r["config"] == rule.to_dict()), None)
        row = next(r for r in timed if r["config"] == pick.to_dict())
        kept = {"kept": row["incumbent"]} if row.get("incumbent") else {}
        chosen.append(dict(row, rule_ms=by_rule and by_rule["ms"], **kept))
    return chosen, _table(chosen, name)


def _table(chosen: list[dict], name: str, reach: float | None = None) -> dict:
    """{product: {name: {path: {bucket: entry}}}} of the chosen rows, each serving within `reach` (None: any)."""
    table = {}
    for r in chosen:
        if r.get("kept") == "own":
            continue  # the bucket's entry stays as it is, its reach too
        m, n, k = r["launch_mnk"]
        routes = table.setdefault(r["product"], {}).setdefault(name, {})
        entries = routes.setdefault(r["path"], {})
        key, flops = tables.table_key(m, n, k), 2 * m * n * k
        # Two shapes in one bucket: the larger problem's choice, since it carries more of a model's time.
        if key not in entries or entries[key]["flops"] < flops:
            entries[key] = dict(
                config=r["config"],
                **({"reach": 0} if r.get("kept") else {} if reach is None else {"reach": reach}),
                shape_MKN=[r["M"], r["K"], r["N"]],
                ms=r["ms"],
                rule_ms=r["rule_ms"],
                tflops=r["tflops"],
                torch_ms=r["torch_ms"],
                ratio=r["ratio"],
                flops=flops,
                timer=r.get("timer", "flush"),
                **({"unpinned_split_ms": r["unpinned_split_ms"]} if "unpinned_split_ms" in r else {}),
            )
    return table


# The splits the tune times for a product of fewer output tiles than the GPU has SMs, with the config it chose: the
# rule's split (configs.choose_split_k) left 15-16% on two of 22 narrow decode shards on the H100, and no other rule
# did better on average (bench/NOTES.md, attempt 76). At most configs.MAX_SPLIT_K.
SPLITS_TIMED = (1, 2, 3, 4, 6, 8, 12, 16)


def _pin_splits(chosen: list[dict], calls: dict, timer, slots: int, itemsize: int, bound: float) -> list[dict]:
    """For each chosen row whose config has fewer output tiles than `slots` and leaves the split to the rule: its
    config at each split of SPLITS_TIMED that gives every program at least two K-steps (the rule's own split
    aside, which is the row's timing), checked against torch as every candidate is (`bound`) and timed, then the
    fastest again autotune.CONFIRM_ROUNDS times beside the unpinned config, each keeping its fastest timing. A
    split that still beats the unpinned config by autotune.MARGIN goes into the row's config (a table entry's
    split_k is what every launch it serves takes), its ms and ratio with it. Returns the timing rows of the pinned
    splits."""
    out = []
    for r in chosen:
        cfg = configs.KernelConfig(**r["config"])
        m, n, k = r["launch_mnk"]
        tiles = -(-m // cfg.BLOCK_M) * -(-n // cfg.BLOCK_N)
        k_tiles = -(-k // cfg.BLOCK_K)
        if cfg.split_k is not None or tiles >= slots or r["ms"] is None:
            continue
        auto = configs.choose_split_k(m, n, k, cfg, slots, itemsize)
        splits = [s for s in SPLITS_TIMED if s != auto and k_tiles // s >= 2]
        if not splits:
            continue
        ours, _, as_theirs, ref = calls[(r["product"], (r["M"], r["K"], r["N"]))]
        timed, errs = {}, {}
        for s in splits:
            with configs.pin_config(dataclasses.replace(cfg, split_k=s)):
                errs[s] = rel_err(as_theirs(ours()), ref)
                if errs[s] <= bound:
                    timed[s] = [timer(ours)]
        if not timed:
            continue
        fastest = min(timed, key=lambda s: timed[s][0])
        unpinned = [r["ms"]]
        for _ in range(autotune.CONFIRM_ROUNDS):
            with configs.pin_config(cfg):
                unpinned.append(timer(ours))
            with configs.pin_config(dataclasses.replace(cfg, split_k=fastest)):
                timed[fastest].append(timer(ours))
        flops = 2 * r["M"] * r["K"] * r["N"]
        for s in splits:
            ms = min(timed.get(s, ()), default=None)
            out.append(
                dict(
                    {key: r[key] for key in ("product", "M", "K", "N", "launch_mnk", "path", "timer")},
                    config=dataclasses.replace(cfg, split_k=s).to_dict(),
                    ms_rounds=timed.get(s, []),
                    rel_err=errs[s],
                    passed_check=ms is not None,
                    ms=ms,
                    tflops=ms and flops / ms / 1e9,
                    **{key: r[key] for key in ("torch_ms", "torch_rounds", "torch_tflops")},
                    ratio=ms and r["torch_ms"] / ms,
                    stage="split",
                )
            )
        best_ms, auto_ms = min(timed[fastest]), min(unpinned)
        if best_ms < (1 - autotune.MARGIN) * auto_ms:
            r.update(
                config=dataclasses.replace(cfg, split_k=fastest).to_dict(),
                ms=best_ms,
                tflops=flops / best_ms / 1e9,
                ratio=r["torch_ms"] / best_ms,
                unpinned_split_ms=auto_ms,
            )
    return out


def _markdown(rows) -> str:
    cols = ["product", "M", "K", "N", "path", "config", "ms", "rule_ms", "tflops", "torch_ms", "ratio"]

    def fmt(r, c):
        v = r[c]
        if v is None:
            return "-"
        if c == "config":
            return (
                ",".join(
                    f"{k}={v[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "persistent")
                )
                + ("" if v.get("tma", True) else ",tma=False")
                + ("" if v.get("tma_c", True) else ",tma_c=False")
                + (f",split_k={v['split_k']}" if v.get("split_k") else "")
            )
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r, c) for c in cols) + " |" for r in rows])


def _plot(rows, path: pathlib.Path, title: str):
    try:
        import matplotlib
    except ImportError:
        print("tune: matplotlib is not installed, so no plot (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    products = list(dict.fromkeys(r["product"] for r in rows))
    fig, axes = plt.subplots(len(products), 1, figsize=(12, 3.5 * len(products)), squeeze=False)
    for ax, product in zip(axes[:, 0], products):
        mine = [r for r in rows if r["product"] == product]
        shapes = list(dict.fromkeys((r["M"], r["K"], r["N"]) for r in mine))
        for i, shape in enumerate(shapes):
            points = [r["tflops"] for r in mine if (r["M"], r["K"], r["N"]) == shape and r["ms"] is not None]
            ax.scatter([i] * len(points), points, s=10, color="tab:blue")
            base = next(r for r in mine if (r["M"], r["K"], r["N"]) == shape)
            ax.scatter([i], [base["torch_tflops"]], marker="_", s=200, color="k")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(["x".join(map(str, s)) for s in shapes], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(f"{product} TF/s")
    axes[0, 0].set_title(title + " (dots: configs; bar: torch)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
