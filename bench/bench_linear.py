"""fused_tp's kernels against cuBLAS, side by side: forward, grad_input, grad_weight + grad_bias.

    python bench/bench_linear.py [--dtype bf16|fp16|fp32] [--tf32] [--quick] [--compare-rule]

Baselines: F.linear(x, w, b) (one cuBLASLt kernel with the bias in its epilogue), grad_y @ w, and
grad_y.T @ x plus grad_y.sum(0). Every output is checked against the baseline, and a slice against float64,
before anything is timed. --compare-rule also times, interleaved in the same run, fused_tp pinned to the config
the rule would pick without a tuned table (configs.rule_config): `table_over_rule` = rule ms / fused_tp ms shows
what the shipped tuned table gains. Writes bench/results/<gpu>/bench_linear_<dtype>.json and .png; prints a
markdown table.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import (DTYPES, env, geomean, markdown_table, plot_ratios, rel_err, results_dir,  # noqa: E402
                    time_interleaved, write)

import fused_tp  # noqa: E402
from fused_tp import kernels  # noqa: E402
from fused_tp.kernels import configs  # noqa: E402

# (M tokens, K, N): shards of Llama-3-70B/8B-like MLPs at TP 1/2/4/8, odd shapes, and decode shapes.
SHAPES = [
    (8192, 8192, 14336), (8192, 14336, 8192), (8192, 8192, 7168), (8192, 7168, 8192), (8192, 8192, 3584),
    (8192, 3584, 8192), (4096, 4096, 7168), (4096, 7168, 4096), (16384, 4096, 1792), (32768, 768, 3072),
    (1000, 4000, 3000), (4097, 4095, 1023),
] + [(m, k, n) for m in (1, 16, 128) for k, n in ((8192, 14336), (14336, 8192))]  # fmt: skip
QUICK = [(8192, 8192, 14336), (4096, 4096, 7168), (1000, 4000, 3000), (4097, 4095, 1023), (16, 8192, 14336)]

# Norm-wise relative error allowed against the baseline and float64: a few roundings of the output dtype, or
# for float32 with TF32 on, of TF32's 10-bit mantissa (2^-11).
CHECK = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}
CHECK_TF32 = 2e-3


def ops(M, K, N, dtype):
    """{op: (baseline fn, fused fn, float64 check on a slice, flops, weight bytes)} for one shape."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    randn = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=gen)  # noqa: E731
    x, w, b, gy = randn(M, K), randn(N, K) / K**0.5, randn(N), randn(M, N)
    s = slice(0, 64)  # rows checked in float64
    return {
        "forward": (lambda: F.linear(x, w, b), lambda: kernels.linear(x, w, b),
                    lambda y: (y[s], x[s].double() @ w.double().T + b.double()), 2 * M * N * K),
        "grad_input": (lambda: gy @ w, lambda: kernels.grad_input(gy, w),
                       lambda g: (g[s], gy[s].double() @ w.double()), 2 * M * N * K),
        "grad_weight+bias": (lambda: (gy.t() @ x, gy.sum(0)), lambda: kernels.grad_params(gy, x),
                             lambda g: (g[0][s], gy[:, s].double().T @ x.double()), 2 * M * N * K),
    }  # fmt: skip


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
    p.add_argument("--quick", action="store_true", help=f"{len(QUICK)} shapes instead of {len(SHAPES)}")
    p.add_argument("--compare-rule", action="store_true", help="also time the rule's config, without the table")
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    info = env()
    info["copy_gbps"] = copy_rate()
    tag = args.dtype + ("-tf32" if args.tf32 and dtype == torch.float32 else "")
    rows = []
    for M, K, N in QUICK if args.quick else SHAPES:
        for op, (base, fused, check, flops) in ops(M, K, N, dtype).items():
            err_base, err_f64 = errors(fused(), base(), check)
            limit = CHECK_TF32 if args.tf32 and dtype == torch.float32 else CHECK[dtype]
            if not (err_base <= limit and err_f64 <= limit):
                raise SystemExit(f"{op} {M}x{K}x{N}: wrong result (vs baseline {err_base:.2e}, vs fp64 {err_f64:.2e})")
            providers = {"baseline": base, "fused_tp": fused}
            if args.compare_rule:
                providers["rule"] = pinned_to_rule(fused, M if op != "grad_weight+bias" else N, dtype)
            t = time_interleaved(providers)
            (tb, sb), (tf, sf) = t["baseline"], t["fused_tp"]
            row = dict(op=op, dtype=tag, M=M, K=K, N=N, baseline_ms=tb, fused_tp_ms=tf,
                       baseline_tflops=flops / tb * 1e-9, fused_tp_tflops=flops / tf * 1e-9, ratio=tb / tf,
                       spread=max(sb, sf), err_vs_fp64=err_f64, **info)  # fmt: skip
            if args.compare_rule:
                row.update(rule_ms=t["rule"][0], table_over_rule=t["rule"][0] / tf)
            if M <= 128:  # bound by reading (or writing) the weight
                nbytes = N * K * dtype.itemsize
                row.update(baseline_weight_gbps=nbytes / tb * 1e-6, fused_tp_weight_gbps=nbytes / tf * 1e-6,
                           fused_tp_of_copy_rate=nbytes / tf * 1e-6 / info["copy_gbps"])  # fmt: skip
            rows.append(row)
            print(f"{op:>17} {M:>6} {K:>6} {N:>6}  ratio {row['ratio']:.3f}  ({tf:.4f} vs {tb:.4f} ms)", flush=True)

    summary = {op: geomean(r["ratio"] for r in rows if r["op"] == op) for op in dict.fromkeys(r["op"] for r in rows)}
    if args.compare_rule:
        summary.update({f"{op} table_over_rule": geomean(r["table_over_rule"] for r in rows if r["op"] == op)
                        for op in dict.fromkeys(r["op"] for r in rows)})  # fmt: skip
    out = results_dir(info["gpu"]) / f"bench_linear_{tag}{'_quick' if args.quick else ''}"
    write(out.with_suffix(".json"), {"env": info, "summary_geomean_ratio": summary, "rows": rows})
    plot_ratios(rows, out.with_suffix(".png"), f"fused_tp vs cuBLAS, {tag}, {info['gpu']}, torch {info['torch']}, "
                f"triton {info['triton']}", series="op", label=lambda r: f"{r['M']}x{r['K']}x{r['N']}")  # fmt: skip
    cols = ["op", "M", "K", "N", "baseline_tflops", "fused_tp_tflops", "ratio", "spread"]
    cols += ["table_over_rule"] if args.compare_rule else []
    print("\n" + markdown_table(rows, cols))
    print("\ngeometric mean of ratios (baseline_ms / fused_tp_ms; > 1 is faster):", 
          ", ".join(f"{op} {g:.3f}" for op, g in summary.items()))


if __name__ == "__main__":
    main()
