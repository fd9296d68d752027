"""Activation memory per rank of a transformer MLP block, with and without sequence parallelism, at TP 1-8, on one
device: what rank 0 of a TP = N group keeps for backward and allocates at its peak.

    python bench/bench_memory.py [--dtype bf16|fp16|fp32] [--tp 1 2 4 8] [--blocks 1 4] [--tiny]

A fake process group (torch's `fake` backend, world size N) stands in for the other ranks: its collectives move no
data but the layers allocate exactly what a real rank allocates, so one device measures rank 0 of any TP size.
The numbers are memory, not results: the outputs are not checked (the tests do that on real ranks).

The block, as a transformer layer runs it: x -> LayerNorm -> ParallelMLP (fc1, GELU, fc2) -> + x; --blocks N runs N of
them in a row, as a model's layers do (the saved bytes add up, the backward's transients do not).
    all-reduce         x [S, B, H] replicated on every rank; fc2's output all-reduced
    sequence-parallel  x [S/N, B, H], this rank's share (sequence_parallel=True: the all-gather into fc1, the
                       reduce-scatter out of fc2), so the norm and the residual run on the share
Measured, forward + backward of one step, each variant in a fresh process group:
    saved_bytes   what autograd keeps for backward when forward returns (every saved tensor but the parameters,
                  each storage once: torch.autograd.graph.saved_tensors_hooks), on any device
    formula_bytes README's formula for the same: the norm's input and the MLP's input (S/N x B x H each with
                  sequence parallelism, S x B x H each without) and the hidden activations, S x B x F/N twice
    peak_mib      on a GPU, the peak allocated during the step beyond what was allocated before it (weights, x)
    peak_with_input_mib  the same plus x, which is the full sequence without sequence parallelism and a share with it
On a CPU the layers take the torch path (no interpreter: memory, not speed, is measured). Writes
bench/results/<gpu or cpu>/bench_memory_<dtype>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.testing._internal.distributed.fake_pg import FakeStore

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import DTYPES, env, markdown_table, results_dir, write  # noqa: E402

import fused_tp  # noqa: E402
from fused_tp.autograd import shard_range  # noqa: E402

# (tokens S, batch B, hidden H, ffn F): a Llama-3-8B MLP at 8192 tokens, a 70B one at 4096.
CASES = [(8192, 1, 4096, 14336), (4096, 1, 8192, 28672)]
TINY = [(64, 2, 32, 96)]


def step(tokens, batch, hidden, ffn, dtype, device, sequence_parallel: bool, blocks: int) -> dict:
    """One forward + backward of `blocks` blocks in a row on rank 0 of the current (fake) group: their saved and peak
    memory."""
    world = dist.get_world_size()
    share = shard_range(tokens, world, 0)
    rows = share[1] - share[0] if sequence_parallel else tokens
    norms = [nn.LayerNorm(hidden, device=device, dtype=dtype) for _ in range(blocks)]
    mlps = [
        fused_tp.ParallelMLP(hidden, ffn, sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        for _ in range(blocks)
    ]
    x = torch.randn(rows, batch, hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    params = {p.data_ptr() for m in (*norms, *mlps) for p in m.parameters()}
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    saved = {}

    def pack(t):
        if t.data_ptr() not in params:
            saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = x
        for norm, mlp in zip(norms, mlps):
            y = mlp(norm(y)) + y
    y.backward(grad)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else None
    f_r = shard_range(ffn, world, 0)
    hidden_acts = 2 * tokens * batch * (f_r[1] - f_r[0])
    formula = blocks * (2 * rows * batch * hidden + hidden_acts) * dtype.itemsize
    held = x.numel() * x.element_size() / 2**20  # the input, allocated before the step: a full sequence or a share
    return dict(
        saved_bytes=sum(saved.values()),
        formula_bytes=formula,
        peak_mib=peak,
        peak_with_input_mib=None if peak is None else peak + held,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--blocks", type=int, nargs="+", default=[1], help="blocks in a row (each number a run)")
    p.add_argument("--tiny", action="store_true", help="one small case (a check of the script, on a CPU)")
    args = p.parse_args()
    dtype, info = DTYPES[args.dtype], env()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    warnings.filterwarnings("ignore", message="fused_tp: CPU tensors run a torch path")
    rows = []
    cases = [(*c, tp, n) for c in (TINY if args.tiny else CASES) for n in args.blocks for tp in args.tp]
    for tokens, batch, hidden, ffn, tp, blocks in cases:
        for variant in ("all-reduce", "sequence-parallel"):
            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
            try:
                got = step(tokens, batch, hidden, ffn, dtype, device, variant == "sequence-parallel", blocks)
            finally:
                dist.destroy_process_group()
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(
                dict(tokens=tokens, batch=batch, hidden=hidden, ffn=ffn, tp=tp, blocks=blocks, variant=variant, **got)
            )
            r = rows[-1]
            print(
                f"S {tokens} B {batch} H {hidden} F {ffn} TP {tp} x{blocks} {variant:>17}: saved "
                f"{r['saved_bytes'] / 2**20:.1f} MiB (formula {r['formula_bytes'] / 2**20:.1f})"
                + ("" if r["peak_mib"] is None else f", peak {r['peak_mib']:.0f} MiB"),
                flush=True,
            )
    case = lambda r: (r["tokens"], r["batch"], r["hidden"], r["ffn"], r["tp"], r["blocks"])  # noqa: E731
    for r in rows:  # each variant against the all-reduce one of the same case and TP
        base = next(b for b in rows if b["variant"] == "all-reduce" and case(b) == case(r))
        r["saved_vs_all_reduce"] = r["saved_bytes"] / base["saved_bytes"]
        if r["peak_mib"] is not None:
            r["peak_vs_all_reduce"] = r["peak_mib"] / base["peak_mib"]
            r["peak_with_input_vs_all_reduce"] = r["peak_with_input_mib"] / base["peak_with_input_mib"]
    blocks = "" if args.blocks == [1] else "_blocks" + "-".join(map(str, args.blocks))
    name = f"bench_memory_{args.dtype}{blocks}{'_tiny' if args.tiny else ''}.json"
    if not args.tiny:
        write(results_dir(info["gpu"]) / name, {"env": info, "rows": rows})
    cols = ["tokens", "hidden", "ffn", "tp", "blocks", "variant", "saved_bytes", "formula_bytes", "saved_vs_all_reduce"]
    cols += ["peak_mib", "peak_vs_all_reduce", "peak_with_input_vs_all_reduce"] if device == "cuda" else []
    print("\n" + markdown_table(rows, cols))
    bad = [r for r in rows if r["saved_bytes"] < r["formula_bytes"]]
    if bad:
        raise SystemExit(f"saved less than the formula's activations: {bad[0]}")


if __name__ == "__main__":
    main()
