"""fused_tp's layers against the same built from nn.Linear, side by side, at world size 1.

    python bench/bench_layers.py [--dtype bf16|fp16|fp32] [--quick | --mid | --tokens 16 128 ...]
                                 [--graphs] [--launches] [--layers column row ...]

Cases: ColumnParallelLinear (hidden -> ffn), RowParallelLinear (ffn -> hidden), the Column -> GELU -> Row MLP as
three modules ("mlp") and as one ParallelMLP, GELU in the kernels' epilogues ("parallel_mlp"), and Llama's gated
MLP down(silu(gate(x)) * up(x)) without biases, as three fused_tp modules with silu(g) * u between them
("swiglu_modules") and as one ParallelMLP whose fc1 launch computes gate, up and SwiGLU ("parallel_swiglu"),
each from `from_linear(s)` / `from_gated` of the nn.Linear layers it is timed against (same weights, same
inputs; the gated baseline is Hugging Face's LlamaMLP written out), forward alone and
forward + backward (grads of the input and every parameter; parameter grads set to None before each step, in
both), and the peak memory each step allocates beyond what was allocated before it. Outputs and gradients are
checked against the baseline before timing. --graphs times each step, of both, replayed from a CUDA graph: the
GPU's work of a step without the host's (what a decode loop or a training step under torch.cuda.graph runs); the
replayed outputs are checked too, and the peak memory is not measured. --launches profiles each eager step of
both (common.launch_profile): its launches in order with their GPU times, the host's time to issue it, and the
caching allocator's calls into the driver, which wait for the GPU; where a step's wall time is above its launches'
sum, that says whether the host or the driver holds it. --tokens picks the cases of both sets with those token
counts. Writes a .json and a .png named
bench/results/<gpu>/bench_layers_<dtype>[_quick|_mid|_tokens<t>-...][_<layers>][_graphs][_launches] (`--layers`
names the layers timed, all by default); prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
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

import fused_tp  # noqa: E402
from fused_tp.tolerance import norm_check, rel_err  # noqa: E402

# (tokens, hidden, ffn): a Llama-3-8B MLP whole and a Llama-3-70B MLP's shard at TP 4 (ffn 28672 / 4), a TP 2
# shard of the 8B one, and decode token counts.
CASES = [(8192, 4096, 14336), (8192, 8192, 7168), (4096, 4096, 7168), (128, 8192, 7168), (16, 4096, 14336)]
QUICK = [(8192, 4096, 14336), (16, 4096, 14336)]
# Issue 18's mid-size training steps: Llama-3-8B's MLP at 512-2048 tokens.
MID = [(512, 4096, 14336), (1024, 4096, 14336), (2048, 4096, 14336)]
LAYERS = ("column", "row", "mlp", "parallel_mlp", "swiglu_modules", "parallel_swiglu")  # models()'s keys


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): Hugging Face's LlamaMLP, over any three layers."""

    def __init__(self, gate, up, down):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def models(tokens, hidden, ffn, dtype, device="cuda"):
    """{layer: (baseline module, fused_tp module, input, grad of the output)}."""
    torch.manual_seed(0)
    new = dict(device=device, dtype=dtype)
    up, down = nn.Linear(hidden, ffn, **new), nn.Linear(ffn, hidden, **new)
    col, row = fused_tp.ColumnParallelLinear.from_linear(up), fused_tp.RowParallelLinear.from_linear(down)
    x, h = torch.randn(tokens, hidden, **new), torch.randn(tokens, ffn, **new)
    grad_mlp = torch.randn(tokens, hidden, **new)
    gated = [nn.Linear(i, o, bias=False, **new) for i, o in ((hidden, ffn), (hidden, ffn), (ffn, hidden))]
    llama = GatedMLP(*gated)
    return {
        "column": (up, col, x, torch.randn(tokens, ffn, **new)),
        "row": (down, row, h, torch.randn(tokens, hidden, **new)),
        "mlp": (nn.Sequential(up, nn.GELU(), down), nn.Sequential(col, nn.GELU(), row), x, grad_mlp),
        "parallel_mlp": (nn.Sequential(up, nn.GELU(), down), fused_tp.ParallelMLP.from_linears(up, down), x, grad_mlp),
        "swiglu_modules": (
            llama,
            GatedMLP(col.from_linear(gated[0]), col.from_linear(gated[1]), row.from_linear(gated[2])),
            x,
            grad_mlp,
        ),
        "parallel_swiglu": (llama, fused_tp.ParallelMLP.from_gated(*gated), x, grad_mlp),
    }


def dense_grads(layer: str, grads) -> list:
    """fused_tp's gradients in the baseline's parameter order: a gated ParallelMLP's fc1 gradient holds gate's and
    up's rows interleaved."""
    grads = list(grads)
    if layer == "parallel_swiglu":
        x, fc1, fc2 = grads
        return [x, fc1[0::2], fc1[1::2], fc2]
    return grads


def steps(module, x, grad_y):
    """(forward, forward + backward, clear) closures over fixed inputs; forward + backward returns every gradient,
    clear drops them."""
    x = x.detach().requires_grad_()
    params = list(module.parameters())

    def forward():
        with torch.no_grad():
            return module(x)

    def clear():
        for t in (x, *params):
            t.grad = None

    def forward_backward():
        clear()
        module(x).backward(grad_y)
        return (x.grad, *(p.grad for p in params))

    return forward, forward_backward, clear


def graphed(step):
    """step captured into a CUDA graph, as a closure that replays it and returns the step's (static) outputs. Warmed
    up on a side stream first, as torch.cuda.graph asks; the Python of the step, gradients cleared first, runs at
    capture only."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay():
        graph.replay()
        return out

    return replay


def peak_mib(step, clear) -> float:
    """Memory that one step allocates at its peak, beyond what was allocated before it (gradients dropped first)."""
    clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _tensors(out):
    """A step's output as a list of tensors (forward: one, forward + backward: every gradient)."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    cases = p.add_mutually_exclusive_group()
    cases.add_argument("--quick", action="store_true", help=f"{len(QUICK)} cases instead of {len(CASES)}")
    cases.add_argument("--mid", action="store_true", help=f"the {len(MID)} mid-size cases (512-2048 tokens) instead")
    cases.add_argument(
        "--tokens", nargs="+", type=int, help="the cases of the default and mid-size sets with these token counts"
    )
    p.add_argument("--graphs", action="store_true", help="time steps replayed from CUDA graphs, both providers")
    p.add_argument(
        "--launches", action="store_true", help="profile each eager step: its launches, host time, driver calls"
    )
    p.add_argument("--layers", nargs="+", choices=LAYERS, default=list(LAYERS), help="which layers (default: all)")
    args = p.parse_args()
    require_gpu("bench_layers.py")
    dtype, info = DTYPES[args.dtype], env()
    rows = []
    chosen = QUICK if args.quick else MID if args.mid else CASES
    if args.tokens:
        chosen = [case for case in CASES + MID if case[0] in args.tokens]
        if not chosen:
            raise SystemExit(
                f"--tokens: no case has {args.tokens} tokens (theirs: {sorted({c[0] for c in CASES + MID})})"
            )
    for tokens, hidden, ffn in chosen:
        for layer, (base_mod, fused_mod, x, grad_y) in models(tokens, hidden, ffn, dtype).items():
            if layer not in args.layers:
                continue
            (base_f, base_fb, base_clear), (fused_f, fused_fb, fused_clear) = (
                steps(base_mod, x, grad_y),
                steps(fused_mod, x, grad_y),
            )
            err = max(
                rel_err(fused_f(), base_f()),
                *(rel_err(a, b) for a, b in zip(dense_grads(layer, fused_fb()), base_fb(), strict=True)),
            )
            if not err <= norm_check(dtype):
                raise SystemExit(f"{layer} {tokens}x{hidden}x{ffn}: fused_tp differs from nn.Linear by {err:.2e}")
            for step, base, fused in (("forward", base_f, fused_f), ("forward+backward", base_fb, fused_fb)):
                profiles = (
                    {"baseline": launch_profile(base), "fused_tp": launch_profile(fused)} if args.launches else {}
                )
                if args.graphs:
                    base, fused = graphed(base), graphed(fused)
                    pairs = zip(
                        dense_grads(layer, _tensors(fused())) if step != "forward" else _tensors(fused()),
                        _tensors(base()),
                        strict=True,
                    )
                    err = max(err, *(rel_err(a, b) for a, b in pairs))
                    if not err <= norm_check(dtype):
                        raise SystemExit(
                            f"{layer} {step} {tokens}x{hidden}x{ffn}: replayed from a CUDA graph, "
                            f"fused_tp differs from nn.Linear by {err:.2e}"
                        )
                t = time_interleaved({"baseline": base, "fused_tp": fused})
                (tb, sb), (tf, sf) = t["baseline"], t["fused_tp"]
                mb, mf = (None, None) if args.graphs else (peak_mib(base, base_clear), peak_mib(fused, fused_clear))
                rows.append(
                    dict(
                        layer=layer,
                        step=step,
                        dtype=args.dtype,
                        tokens=tokens,
                        hidden=hidden,
                        ffn=ffn,
                        baseline_ms=tb,
                        fused_tp_ms=tf,
                        ratio=tb / tf,
                        spread=max(sb, sf),
                        err_vs_baseline=err,
                        baseline_peak_mib=mb,
                        fused_tp_peak_mib=mf,
                        **{f"{who}_profile": prof for who, prof in profiles.items()},
                        **info,
                    )
                )
                print(
                    f"{layer:>12} {step:>16} {tokens:>6} {hidden:>6} {ffn:>6}  ratio {tb / tf:.3f}"
                    + ("" if mb is None else f"  peak MiB {mb:.0f} vs {mf:.0f}"),
                    flush=True,
                )
                for who, prof in profiles.items():
                    launches = prof["error"] or ", ".join(f"{name[:40]} {us:.1f}" for name, us in prof["launches"])
                    print(
                        f"{'':>12} {who:>16}  wall {1e3 * (tb if who == 'baseline' else tf):.1f} us, launches "
                        f"{prof['gpu_us']:.1f} us ({launches}); host {prof['host_us']:.1f} us"
                        f"; driver calls {prof['driver_calls'] or 'none'}",
                        flush=True,
                    )

    series = lambda r: f"{r['layer']} {r['step']}"  # noqa: E731
    summary = {s: geomean(r["ratio"] for r in rows if series(r) == s) for s in dict.fromkeys(map(series, rows))}
    some = "" if set(args.layers) == set(LAYERS) else "_" + "-".join(args.layers)
    which = "_quick" if args.quick else "_mid" if args.mid else ""
    if args.tokens:
        which = "_tokens" + "-".join(map(str, args.tokens))
    flags = "".join(f"_{flag}" for flag in ("graphs", "launches") if getattr(args, flag))
    name = f"bench_layers_{args.dtype}{which}{some}{flags}"
    out = results_dir(info["gpu"]) / name
    write(out.with_suffix(".json"), {"env": info, "summary_geomean_ratio": summary, "rows": rows})
    for r in rows:
        r["series"] = series(r)
    plot_ratios(
        rows,
        out.with_suffix(".png"),
        f"fused_tp layers vs nn.Linear, world size 1, {args.dtype}, "
        f"{'CUDA graphs, ' if args.graphs else ''}"
        f"{info['gpu']}, torch {info['torch']}, triton {info['triton']}",
        series="series",
        label=lambda r: f"{r['tokens']}x{r['hidden']}x{r['ffn']}",
    )
    print(
        "\n"
        + markdown_table(
            rows,
            [
                "layer",
                "step",
                "tokens",
                "hidden",
                "ffn",
                "baseline_ms",
                "fused_tp_ms",
                "ratio",
                "spread",
                "baseline_peak_mib",
                "fused_tp_peak_mib",
            ],
        )
    )
    print("\ngeometric mean of ratios (> 1 is faster):", ", ".join(f"{s} {g:.3f}" for s, g in summary.items()))


if __name__ == "__main__":
    main()
