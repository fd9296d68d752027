"""Host time per call: what a launch costs the CPU, fused_tp against torch, side by side.

    python bench/bench_host.py [--rounds 3] [--calls 2000] [--stub-kernels]

A tiny problem (16 x 256 x 256 in bf16 on a GPU; 16 x 128 x 128 in fp32 with the TF32 flag set on the CPU, where no
fp32 operand is then copied into another layout first: layout.FP32_COPY_MIN_REUSE) makes every call host-bound, so
the wall time of many back-to-back calls over their count is the host's cost of one call. Cases: `F.linear`,
`kernels.linear`, the registered operator `torch.ops.fused_tp.linear` (the dispatcher's cost), `kernels.grad_input`,
`kernels.grad_params` (matmul + column sum); a one-token forward under no_grad of `nn.Linear` and of
`ColumnParallelLinear.from_linear` of it; forward + backward of `nn.Linear`, Column, Row, and of the Linear -> GELU
-> Linear stack against ParallelMLP and against the same as three fused_tp modules (Column -> GELU -> Row); and
the single layers' steps with backward on the calling thread (`torch.autograd.set_multithreading_enabled(False)`,
both sides). PAIRS lists the ratios the issue's goals bound, and the three modules' step, which no goal bounds.
Rounds alternate and every case runs in every round, because a host's speed swings between rounds by more than most
changes to the launch path: ratios are taken within a round, and their median over rounds is reported, beside the
ratio of each side's fastest round (best_ratio).

--stub-kernels replaces the Triton kernels by functions that return at once (fused_tp's own Python alone; it
runs on a CPU without Triton's interpreter doing the work): how the wrapper, not Triton's launcher, changed.
Writes bench/results/<gpu or cpu>/bench_host[_stub].json and prints the rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fused_tp is imported: the kernels need a path on the CPU

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import env, markdown_table, results_dir, write  # noqa: E402

import fused_tp  # noqa: E402
from fused_tp import kernels  # noqa: E402
from fused_tp.kernels import jit  # noqa: E402


class _Stub:
    """Stands in for a Triton kernel: kernel[grid](*args, **meta) returns at once."""

    def __getitem__(self, grid):
        return lambda *args, **meta: None


def host_us(fn, calls: int) -> float:
    for _ in range(max(20, calls // 40)):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


# (case, baseline case, the bound on fused_tp / baseline host time): the layer-level pairs the goals name.
PAIRS = [
    ("Column forward, no_grad", "nn.Linear forward, no_grad", 1.3),
    ("Column fwd+bwd", "nn.Linear fwd+bwd", 1.25),
    ("Row fwd+bwd", "nn.Linear fwd+bwd", 1.25),
    ("ParallelMLP fwd+bwd", "nn.Linear MLP fwd+bwd", 1.25),
    ("Column -> GELU -> Row fwd+bwd", "nn.Linear MLP fwd+bwd", None),
    ("Column fwd+bwd, one thread", "nn.Linear fwd+bwd, one thread", 1.25),
    ("Row fwd+bwd, one thread", "nn.Linear fwd+bwd, one thread", 1.25),
    ("kernels.linear", "F.linear", None),
    ("torch.ops.fused_tp.linear", "F.linear", None),
]


def cases(device: str, dtype: torch.dtype, width: int) -> dict:
    x = torch.randn(16, width, device=device, dtype=dtype)
    x1 = x[:1].clone()  # one token: decode
    w = torch.randn(width, width, device=device, dtype=dtype)
    b = torch.randn(width, device=device, dtype=dtype)
    lin, lin2 = (nn.Linear(width, width, device=device, dtype=dtype) for _ in range(2))
    col, row = fused_tp.ColumnParallelLinear.from_linear(lin), fused_tp.RowParallelLinear.from_linear(lin)
    mlp, pmlp = nn.Sequential(lin, nn.GELU(), lin2), fused_tp.ParallelMLP.from_linears(lin, lin2)
    modules = nn.Sequential(col, nn.GELU(), fused_tp.RowParallelLinear.from_linear(lin2))
    xg = x.clone().requires_grad_()

    def step(module):
        def run():
            xg.grad = None
            for p in module.parameters():
                p.grad = None
            module(xg).backward(x)

        return run

    def one_thread(run):
        # backward on the calling thread: on a GPU the engine otherwise runs it on its device thread, where a Python
        # Function's node costs more than nn.Linear's C++ one (bench/NOTES.md, attempts 63 and 74)
        def wrapped():
            with torch.autograd.set_multithreading_enabled(False):
                run()

        return wrapped

    def no_grad(module):
        def run():
            with torch.no_grad():
                return module(x1)

        return run

    return {
        "F.linear": lambda: F.linear(x, w, b),
        "kernels.linear": lambda: kernels.linear(x, w, b),
        "torch.ops.fused_tp.linear": lambda: torch.ops.fused_tp.linear(x, w, b, ""),
        "kernels.grad_input": lambda: kernels.grad_input(x, w),
        "kernels.grad_params": lambda: kernels.grad_params(x, x),
        "nn.Linear forward, no_grad": no_grad(lin),
        "Column forward, no_grad": no_grad(col),
        "nn.Linear fwd+bwd": step(lin),
        "Column fwd+bwd": step(col),
        "Row fwd+bwd": step(row),
        "nn.Linear MLP fwd+bwd": step(mlp),
        "ParallelMLP fwd+bwd": step(pmlp),
        "Column -> GELU -> Row fwd+bwd": step(modules),
        "nn.Linear fwd+bwd, one thread": one_thread(step(lin)),
        "Column fwd+bwd, one thread": one_thread(step(col)),
        "Row fwd+bwd, one thread": one_thread(step(row)),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=2000, help="calls per case and round")
    p.add_argument("--stub-kernels", action="store_true", help="fused_tp's Python alone, the kernels not launched")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, width = (torch.bfloat16, 256) if device == "cuda" else (torch.float32, 128)
    if device == "cpu":
        torch.backends.cuda.matmul.allow_tf32 = True  # only steers fused_tp's layout choice here (see above)
    if args.stub_kernels:
        jit.matmul_kernel = jit.colsum_kernel = jit.pair_kernel = _Stub()
    elif device == "cpu":
        args.calls = min(args.calls, 20)  # the interpreter runs the kernels: its time says nothing about launches
    info = dict(
        env(),
        kernel_path=kernels.kernel_path(device),
        stub_kernels=args.stub_kernels,
        dtype=str(dtype),
        width=width,
        calls=args.calls,
    )
    named = cases(device, dtype, width)
    rows = []
    for r in range(args.rounds):
        order = list(named) if r % 2 == 0 else list(named)[::-1]
        us = {name: host_us(named[name], args.calls) for name in order}
        rows += [dict(round=r, case=name, host_us=us[name]) for name in named]
        print(f"round {r}: " + ", ".join(f"{name} {us[name]:.1f}" for name in named), flush=True)
    summary = []
    for name in named:
        us = sorted(r["host_us"] for r in rows if r["case"] == name)
        summary.append(dict(case=name, min_us=us[0], median_us=us[len(us) // 2], max_us=us[-1]))
    # Ratios within each round (a host's speed swings between rounds), then their median over the rounds; and the
    # ratio of each side's fastest round, which a host's stalls (they only ever slow a round down) cannot move: on
    # a host whose rounds swing 2x the medians say nothing, where the best rounds still agree (bench/NOTES.md,
    # attempt 100).
    best = {s["case"]: s["min_us"] for s in summary}
    ratios = []
    for case, base, bound in PAIRS:
        per_round = sorted(
            next(r["host_us"] for r in rows if r["round"] == i and r["case"] == case)
            / next(r["host_us"] for r in rows if r["round"] == i and r["case"] == base)
            for i in range(args.rounds)
        )
        ratios.append(
            dict(
                case=case,
                baseline=base,
                median_ratio=per_round[len(per_round) // 2],
                min_ratio=per_round[0],
                max_ratio=per_round[-1],
                best_ratio=best[case] / best[base],
                bound=bound,
                within_bound=None if bound is None else per_round[len(per_round) // 2] <= bound,
            )
        )
    out = results_dir(info["gpu"]) / f"bench_host{'_stub' if args.stub_kernels else ''}.json"
    write(out, {"env": info, "summary": summary, "ratios": ratios, "rows": rows})
    print("\n" + markdown_table(summary, ["case", "min_us", "median_us", "max_us"]))
    print(
        "\nhost time over the baseline's, median of per-round ratios, and the best rounds' (bound: the goal)\n"
        + markdown_table(ratios, ["case", "baseline", "median_ratio", "min_ratio", "max_ratio", "best_ratio", "bound"])
    )


if __name__ == "__main__":
    main()
