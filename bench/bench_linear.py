"""fused_tp's kernels against cuBLAS, side by side: forward, grad_input, grad_weight + grad_bias.

    python bench/bench_linear.py [--dtype bf16|fp16|fp32] [--tf32] [--shapes speed|quick|decode|...] [--quick]
                                 [--ops forward grad_input grad_weight+bias] [--compare-rule] [--timer auto|flush|graph]
    python bench/bench_linear.py --summarize bench/results/<gpu>/bench_linear_bf16_decode.json   # no GPU needed

Shapes: a preset of fused_tp/shapes.py (--quick is --shapes quick). `--shapes decode --ops forward` is issue 18's
decode set: its summary adds the goals (geometric mean and lowest ratio, and which shards of 32 MB or more read
the weight at 75% of the card's copy rate) and, per token count, the line fused_tp's times make against cuBLAS's
(a fixed cost per launch, and a slope: launch_cost_fit); --summarize prints them from a run's JSON.

Timing (--timer): the decode presets are timed from CUDA graphs of back-to-back calls cycling through copies of the
operands that cover three L2s (tune.graph_timer), as decode runs under CUDA graphs (so launches through tensor
descriptors take them made on the host, as every captured launch does: fused_tp/kernels/launch.py); the rest by
do_bench, which clears the L2 before every call by writing 256 MB, so that the timed call also writes back the dirty
lines (about 10 us on the H200, as much as a decode product: bench/NOTES.md, attempt 38b). A timer other than the
preset's own writes its own file (..._flush.json).

Baselines: F.linear(x, w, b) (one cuBLASLt kernel with the bias in its epilogue), grad_y @ w, and grad_y.T @ x plus
grad_y.sum(0). Every output is checked against the baseline, and a slice against float64,
before anything is timed. --compare-rule also times, interleaved in the same run, fused_tp pinned to the config
the rule would pick without a tuned table (configs.rule_config): `table_over_rule` = rule ms / fused_tp ms shows
what the shipped tuned table gains. Writes bench/results/<gpu>/bench_linear_<dtype>.json and .png; prints a
markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch
import triton.testing

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPES,
    env,
    geomean,
    markdown_table,
    plot_ratios,
    require_gpu,
    results_dir,
    time_interleaved,
    write,
)

import fused_tp  # noqa: E402
from fused_tp.kernels import configs, plan  # noqa: E402
from fused_tp.shapes import DECODE_SHARDS, PRESETS  # noqa: E402
from fused_tp.tolerance import norm_check, rel_err  # noqa: E402
from fused_tp.tune import add_timer_argument, graph_timer, problem, timer_name  # noqa: E402

DECODE_BIG_BYTES = 32e6  # issue 18: shards this large should stream at DECODE_COPY_SHARE of the copy rate
DECODE_COPY_SHARE = 0.75


OPS = {"forward": "fwd", "grad_input": "dgrad", "grad_weight+bias": "wgrad"}  # bench names -> configs.PRODUCTS


def ops(M, K, N, dtype, which=tuple(OPS), timer="flush"):
    """{op: (baseline fn, fused fn, float64 check on a slice, flops)} for one shape and the ops in `which`, on
    tune's operands (tune.problem, cycling through copies where `timer` needs them)."""
    out = {}
    for op in which:
        p = problem(OPS[op], M, K, N, dtype, "cuda", timer)
        out[op] = (p.theirs, p.ours, p.check, 2 * M * N * K)
    return out


def launch_config(op: str, M: int, K: int, N: int, dtype) -> str:
    """The config and split the launch of `op` takes (its matmul's C[m, n], k deep), and where the config came from,
    as plan.pick_config gives them for contiguous operands on this GPU, for the record."""
    m, n, k = {"forward": (M, N, K), "grad_input": (M, K, N), "grad_weight+bias": (N, K, M)}[op]
    dev = plan.device(torch.cuda.current_device())
    product = OPS[op]
    cfg, source = plan.pick_config(
        m,
        n,
        k,
        dtype,
        False,
        dev.has_tma,
        dev.slots,
        product,
        dev.gpu,
        configs.pinned_config(),
        torch.backends.cuda.matmul.allow_tf32,
    )
    return (
        f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K} w{cfg.num_warps} s{cfg.num_stages}"
        f"{'' if cfg.persistent else ' np'}{'' if cfg.tma else ' ptr'}{'' if cfg.tma_c else ' ptrC'}"
        f" split{cfg.split_k} ({source})"
    )


def decode_goals(rows: list[dict]) -> dict:
    """Issue 18's decode goals over the forward rows: geometric mean >= 1.15, none below 0.95, and shards of
    DECODE_BIG_BYTES or more reading the weight at DECODE_COPY_SHARE of the copy rate."""
    fwd = [r for r in rows if r["op"] == "forward"]
    big = [r for r in fwd if r["N"] * r["K"] * r["dtype_bytes"] >= DECODE_BIG_BYTES]
    slow = [r for r in big if r["fused_tp_of_copy_rate"] < DECODE_COPY_SHARE]
    return dict(
        geomean=geomean(r["ratio"] for r in fwd),
        geomean_by_tokens={
            str(m): geomean(r["ratio"] for r in fwd if r["M"] == m) for m in sorted({r["M"] for r in fwd})
        },
        lowest=min(r["ratio"] for r in fwd),
        below_0_95=sum(r["ratio"] < 0.95 for r in fwd),
        rows=len(fwd),
        big_rows=len(big),
        big_below_copy_share=len(slow),
        big_copy_share_range=[
            min(r["fused_tp_of_copy_rate"] for r in big),
            max(r["fused_tp_of_copy_rate"] for r in big),
        ]
        if big
        else None,
        baseline_big_copy_share_range=[
            min(r["baseline_weight_gbps"] / r["copy_gbps"] for r in big),
            max(r["baseline_weight_gbps"] / r["copy_gbps"] for r in big),
        ]
        if big
        else None,
        launch_cost_fit=launch_cost_fit(fwd),
    )


def launch_cost_fit(rows: list[dict]) -> dict:
    """{token count: the least-squares line fused_tp_us = fixed_us + slope * baseline_us over its rows}: a slope near
    1 with fixed_us > 0 is a cost each launch pays on top of streaming as fast as cuBLAS, a slope above 1 a slower
    stream (bench/NOTES.md, session 15). Token counts with fewer than two shard sizes are left out."""
    import numpy as np

    fits = {}
    for m in sorted({r["M"] for r in rows}):
        theirs = np.array([r["baseline_ms"] * 1e3 for r in rows if r["M"] == m])
        ours = np.array([r["fused_tp_ms"] * 1e3 for r in rows if r["M"] == m])
        if len(set(theirs.tolist())) > 1:
            slope, fixed = np.polyfit(theirs, ours, 1)
            fits[str(m)] = dict(fixed_us=float(fixed), slope=float(slope), rows=len(ours))
    return fits


def copy_rate() -> float:
    """The card's device-to-device copy rate in GB/s (bytes read plus bytes written), the floor for M <= 128."""
    src = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / ms * 1e-6


def errors(got, want, check) -> tuple[float, float]:
    """Norm-wise relative errors of fused_tp's output against the baseline's and against float64 on a slice."""
    pairs = zip(got, want) if isinstance(got, tuple) else [(got, want)]
    return max(rel_err(g, w) for g, w in pairs), rel_err(*check(got))


def pinned_to_rule(fused, launch_m: int, dtype):
    """fused, run with the config the rule picks for its matmul (no tuned table); the launch's operand path
    (descriptors or pointers) is the one fused takes."""
    before = fused_tp.path_counts["tma"]
    fused()
    cfg = configs.rule_config(launch_m, dtype, interpreted=False, tma=fused_tp.path_counts["tma"] > before)

    def run():
        with configs.pin_config(cfg):
            return fused()

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--tf32", action="store_true", help="fp32: allow TF32 in both cuBLAS and fused_tp")
    p.add_argument("--shapes", choices=list(PRESETS), default="speed", help="a preset of fused_tp/shapes.py")
    p.add_argument("--quick", action="store_true", help="--shapes quick")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="which products (default: all three)")
    p.add_argument(
        "--rep-ms",
        type=float,
        default=100,
        help="each timing's budget in ms (flush: do_bench's rep, a quarter of it warm-up, at most 25)",
    )
    add_timer_argument(p)
    p.add_argument("--compare-rule", action="store_true", help="also time the rule's config, without the table")
    p.add_argument(
        "--summarize",
        metavar="JSON",
        help="print the decode goals (and the launch-cost fit) of a decode run's JSON, then exit: no GPU needed",
    )
    args = p.parse_args()
    if args.summarize:
        print(json.dumps(decode_goals(json.loads(open(args.summarize).read())["rows"]), indent=1))
        return
    require_gpu("bench_linear.py")
    dtype = DTYPES[args.dtype]
    preset = "quick" if args.quick else args.shapes
    how = timer_name(args.timer, preset)
    if how == "graph":
        timer = functools.partial(graph_timer, rep_ms=args.rep_ms)
    else:
        timer = functools.partial(
            triton.testing.do_bench, warmup=min(25, args.rep_ms / 4), rep=args.rep_ms, return_mode="median"
        )
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    info = env()
    info["copy_gbps"] = copy_rate()
    info["timer"] = how
    tag = args.dtype + ("-tf32" if args.tf32 and dtype == torch.float32 else "")
    rows = []
    for M, K, N in PRESETS[preset]:
        for op, (base, fused, check, flops) in ops(M, K, N, dtype, args.ops, how).items():
            err_base, err_f64 = errors(fused(), base(), check)
            limit = norm_check(dtype, args.tf32)
            if not (err_base <= limit and err_f64 <= limit):
                raise SystemExit(f"{op} {M}x{K}x{N}: wrong result (vs baseline {err_base:.2e}, vs fp64 {err_f64:.2e})")
            providers = {"baseline": base, "fused_tp": fused}
            if args.compare_rule:
                providers["rule"] = pinned_to_rule(fused, M if op != "grad_weight+bias" else N, dtype)
            t = time_interleaved(providers, timer=timer)
            (tb, sb), (tf, sf) = t["baseline"], t["fused_tp"]
            row = dict(
                op=op,
                dtype=tag,
                M=M,
                K=K,
                N=N,
                baseline_ms=tb,
                fused_tp_ms=tf,
                baseline_tflops=flops / tb * 1e-9,
                fused_tp_tflops=flops / tf * 1e-9,
                ratio=tb / tf,
                spread=max(sb, sf),
                err_vs_fp64=err_f64,
                config=launch_config(op, M, K, N, dtype),
                **info,
            )
            if preset.startswith("decode"):
                row["shard"] = DECODE_SHARDS[(K, N)]
            if args.compare_rule:
                row.update(rule_ms=t["rule"][0], table_over_rule=t["rule"][0] / tf)
            if M <= 128:  # bound by reading (or writing) the weight
                nbytes = N * K * dtype.itemsize
                row.update(
                    dtype_bytes=dtype.itemsize,
                    baseline_weight_gbps=nbytes / tb * 1e-6,
                    fused_tp_weight_gbps=nbytes / tf * 1e-6,
                    fused_tp_of_copy_rate=nbytes / tf * 1e-6 / info["copy_gbps"],
                )
            rows.append(row)
            print(
                f"{op:>17} {M:>6} {K:>6} {N:>6}  ratio {row['ratio']:.3f}  ({tf:.4f} vs {tb:.4f} ms)  {row['config']}",
                flush=True,
            )

    summary = {op: geomean(r["ratio"] for r in rows if r["op"] == op) for op in dict.fromkeys(r["op"] for r in rows)}
    if args.compare_rule:
        summary.update(
            {
                f"{op} table_over_rule": geomean(r["table_over_rule"] for r in rows if r["op"] == op)
                for op in dict.fromkeys(r["op"] for r in rows)
            }
        )
    goals = decode_goals(rows) if preset == "decode" else None
    # A timer other than the preset's own (timer_name's "auto") gets its own file, beside the one docs cite.
    other_timer = "" if how == timer_name("auto", preset) else "_" + how
    out = results_dir(info["gpu"]) / f"bench_linear_{tag}{'' if preset == 'speed' else '_' + preset}{other_timer}"
    write(
        out.with_suffix(".json"), {"env": info, "summary_geomean_ratio": summary, "decode_goals": goals, "rows": rows}
    )
    title = f"fused_tp vs cuBLAS, {tag}, {info['gpu']}, torch {info['torch']}, triton {info['triton']}"
    if preset.startswith("decode"):  # one bar group per shard, one bar per token count
        plot_ratios(
            rows,
            out.with_suffix(".png"),
            title + " (bars: tokens)",
            series="M",
            label=lambda r: f"{r['op'][0]} {r['K']}x{r['N']}",
        )
    else:
        plot_ratios(rows, out.with_suffix(".png"), title, series="op", label=lambda r: f"{r['M']}x{r['K']}x{r['N']}")
    cols = ["op", "M", "K", "N", "baseline_tflops", "fused_tp_tflops", "ratio", "spread"]
    cols += ["fused_tp_of_copy_rate", "config", "shard"] if preset.startswith("decode") else []
    cols += ["table_over_rule"] if args.compare_rule else []
    print("\n" + markdown_table(rows, cols))
    print(
        "\ngeometric mean of ratios (baseline_ms / fused_tp_ms; > 1 is faster):",
        ", ".join(f"{op} {g:.3f}" for op, g in summary.items()),
    )
    if goals:
        print("decode goals:", json.dumps(goals))


if __name__ == "__main__":
    main()
