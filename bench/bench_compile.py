"""Compiled fused_tp against compiled nn.Linear on the same model, side by side, at world size 1.

    python bench/bench_compile.py [--dtype bf16|fp16] [--quick | --shapes 4096x14336] [--modes default reduce-overhead]
                                  [--tokens 16 128]

Cases: the Column -> GELU -> Row MLP as three modules ("mlp") and as one ParallelMLP ("parallel_mlp"), each built
with from_linear(s) of the nn.Sequential(nn.Linear, nn.GELU(), nn.Linear) it is timed against (same weights, same
inputs). Every model is compiled once per model shape and mode, torch.compile(mode=..., dynamic=True, fullgraph for
fused_tp), then run at 16, 128, 1024 and 8192 tokens, forward under no_grad and forward + backward (bench_layers'
steps); "reduce-overhead" replays inductor's CUDA graphs. Outputs and gradients are checked against the compiled
baseline before timing; a step is timed with do_bench (median), interleaved with the baseline's. Each row also
holds both sides' GPU time a step (its launches' sum, from torch.profiler: common.launch_profile) and the host's
time to issue one (10 back to back, no synchronisation inside), and their ratio `gpu_ratio`: where a side's host time
exceeds its GPU time the step is host-bound (`host_bound`), and `ratio` there measures the hosts (dynamo's guards,
AOTAutograd's wrappers, inductor's CUDA-graph trees) more than the kernels. Writes
bench/results/<gpu>/bench_compile_<dtype>[_quick | _<shapes>].json and .png; prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from bench_layers import models, steps  # noqa: E402
from common import (  # noqa: E402
    DTYPES,
    env,
    geomean,
    launch_profile,
    markdown_table,
    plot_ratios,
    require_gpu,
    results_dir,
    time_interleaved,
    write,
)

from fused_tp.tolerance import norm_check, rel_err  # noqa: E402

# (hidden, ffn): the Llama-3-8B MLP whole, and a Llama-3-70B MLP's shard at TP 4 (28672 / 4).
SHAPES = [(4096, 14336), (8192, 7168)]
TOKENS = [16, 128, 1024, 8192]


def _marked_step(step):
    """A step that first tells inductor's CUDA graphs a new iteration begins (its outputs may then be reused)."""

    def run():
        torch.compiler.cudagraph_mark_step_begin()
        return step()

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--quick", action="store_true", help=f"the first model shape only, of {len(SHAPES)}")
    p.add_argument(
        "--shapes",
        nargs="+",
        help="model shapes as HIDDENxFFN (default: %(default)s)",
        default=[f"{h}x{f}" for h, f in SHAPES],
    )
    p.add_argument("--modes", nargs="+", default=["default", "reduce-overhead"], choices=["default", "reduce-overhead"])
    p.add_argument("--tokens", nargs="+", type=int, default=TOKENS, help="token counts (default: %(default)s)")
    args = p.parse_args()
    require_gpu("bench_compile.py")
    dtype, info = DTYPES[args.dtype], env()
    rows = []
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes]
    for hidden, ffn in shapes[:1] if args.quick else shapes:
        for mode in args.modes:
            torch._dynamo.reset()
            # models() at the largest token count; smaller batches are its leading rows (the models are the same)
            built = models(max(args.tokens), hidden, ffn, dtype)
            for layer in ("mlp", "parallel_mlp"):
                base_mod, fused_mod, x_all, grad_all = built[layer]
                compiled = {
                    "baseline": torch.compile(base_mod, mode=mode, dynamic=True),
                    "fused_tp": torch.compile(fused_mod, mode=mode, dynamic=True, fullgraph=True),
                }
                for tokens in args.tokens:
                    x, grad_y = x_all[:tokens], grad_all[:tokens]
                    start = time.perf_counter()
                    (base_f, base_fb, _), (fused_f, fused_fb, _) = (steps(compiled[n], x, grad_y) for n in compiled)
                    if mode == "reduce-overhead":
                        base_f, base_fb, fused_f, fused_fb = map(_marked_step, (base_f, base_fb, fused_f, fused_fb))
                    err = max(
                        rel_err(fused_f().clone(), base_f().clone()),
                        *(rel_err(a, b) for a, b in zip([t.clone() for t in fused_fb()], base_fb())),
                    )
                    first_s = time.perf_counter() - start  # both compiles (the first token count) and first runs
                    if not err <= norm_check(dtype):
                        raise SystemExit(
                            f"{layer} {mode} {tokens}x{hidden}x{ffn}: fused_tp differs from nn.Linear by {err:.2e}"
                        )
                    for step, base, fused in (("forward", base_f, fused_f), ("forward+backward", base_fb, fused_fb)):
                        t = time_interleaved({"baseline": base, "fused_tp": fused})
                        (tb, sb), (tf, sf) = t["baseline"], t["fused_tp"]
                        pb, pf = launch_profile(base), launch_profile(fused)
                        rows.append(
                            dict(
                                layer=layer,
                                mode=mode,
                                step=step,
                                dtype=args.dtype,
                                tokens=tokens,
                                hidden=hidden,
                                ffn=ffn,
                                baseline_ms=tb,
                                fused_tp_ms=tf,
                                ratio=tb / tf,
                                spread=max(sb, sf),
                                baseline_gpu_us=pb["gpu_us"],
                                fused_tp_gpu_us=pf["gpu_us"],
                                gpu_ratio=pb["gpu_us"] / pf["gpu_us"],
                                baseline_host_us=pb["host_us"],
                                fused_tp_host_us=pf["host_us"],
                                host_bound=[p["host_us"] > p["gpu_us"] for p in (pb, pf)],
                                err_vs_baseline=err,
                                first_calls_s=first_s,
                                **info,
                            )
                        )
                        print(
                            f"{layer:>12} {mode:>15} {step:>16} {tokens:>5} {hidden:>5} {ffn:>5}  ratio {tb / tf:.3f}"
                            f"  GPU {pb['gpu_us'] / pf['gpu_us']:.3f}  host / GPU us: baseline {pb['host_us']:.0f} / "
                            f"{pb['gpu_us']:.0f}, fused_tp {pf['host_us']:.0f} / {pf['gpu_us']:.0f}",
                            flush=True,
                        )

    series = lambda r: f"{r['layer']} {r['mode']} {r['step']}"  # noqa: E731
    summary = {s: geomean(r["ratio"] for r in rows if series(r) == s) for s in dict.fromkeys(map(series, rows))}
    gpu = {s: geomean(r["gpu_ratio"] for r in rows if series(r) == s) for s in summary}
    subset = "_quick" if args.quick else "" if shapes == SHAPES else "_" + "_".join(args.shapes)
    out = results_dir(info["gpu"]) / f"bench_compile_{args.dtype}{subset}"
    write(
        out.with_suffix(".json"),
        {"env": info, "summary_geomean_ratio": summary, "summary_geomean_gpu_ratio": gpu, "rows": rows},
    )
    for r in rows:
        r["series"] = series(r)
    plot_ratios(
        rows,
        out.with_suffix(".png"),
        f"compiled fused_tp vs compiled nn.Linear, world size 1, "
        f"{args.dtype}, {info['gpu']}, torch {info['torch']}, triton {info['triton']}",
        series="series",
        label=lambda r: f"{r['tokens']}x{r['hidden']}x{r['ffn']}",
    )
    print(
        "\n"
        + markdown_table(
            rows,
            ["layer", "mode", "step", "tokens", "hidden", "ffn", "baseline_ms", "fused_tp_ms", "ratio", "spread"]
            + ["gpu_ratio", "baseline_host_us", "fused_tp_host_us"],
        )
    )
    print("\ngeometric mean of ratios (> 1 is faster):", ", ".join(f"{s} {g:.3f}" for s, g in summary.items()))
    print("geometric mean of GPU-time ratios:", ", ".join(f"{s} {g:.3f}" for s, g in gpu.items()))


if __name__ == "__main__":
    main()
