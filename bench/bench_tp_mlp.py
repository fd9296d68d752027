"""A tensor-parallel Column -> GELU -> Row MLP, forward + backward, against the references and the floors.

    torchrun --nproc-per-node N bench/bench_tp_mlp.py [--dtype bf16] [--steps 20] [--quick | --tiny]
                                                      [--sequence-parallel] [--compile]

Every rank builds the same dense MLP from one seed; in one run, with the same weights and inputs:
    fused_tp    ColumnParallelLinear -> GELU -> RowParallelLinear, three modules
    fused_mlp   the same as one fused_tp.ParallelMLP: GELU and its derivative in the kernels' epilogues
    megatron    cuBLAS F.linear in autograd Functions with a blocking all-reduce (Megatron's ColumnParallelLinear /
                RowParallelLinear without overlap; the row bias added after the all-reduce)
    dtensor     torch's parallelize_module with ColwiseParallel / RowwiseParallel on the nn.Linear MLP
    gemms       the floor of compute: each rank's shard GEMMs of forward and backward alone (F.linear, no comm)
    allreduces  the floor of communication: the two all-reduces of [tokens, hidden] alone
With --sequence-parallel, each rank feeds and gets its share of the tokens (an even split), and every provider is
its sequence-parallel form: fused_tp's layers and ParallelMLP with sequence_parallel=True, the Megatron-style
reference with an all-gather in and a reduce-scatter out (blocking), DTensor's ColwiseParallel(input_layouts=
Shard(0)) / RowwiseParallel(output_layouts=Shard(0)); the floor of communication keeps the all-reduces, the same
total volume. Results go to bench_tp_mlp_sp_<dtype>.json. With --compile, every provider runs through torch.compile
(default mode; fused_tp's with fullgraph=True; the Megatron-style reference breaks the graph at its blocking
collectives, DTensor's traces whole): the compiled steps, where the column layer's grad_x all-reduce is waited for
after its weight gradient as eager code does (bench/NOTES.md, attempt 82). Results go to
bench_tp_mlp_[sp_]compiled_<dtype>.json.
Outputs and input gradients are checked against the megatron reference before timing. A step is timed on every
rank from a barrier to the end of backward (device synchronised); its time is the max over ranks, the figure the
median over steps. Rank 0 writes bench/results/<gpu>-x<N>/bench_tp_mlp_<dtype>.json and a .png of the ratios (with
--tiny, nothing: that size is a check of the script on gloo ranks, through Triton's interpreter on a CPU).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import DTYPES, env, markdown_table, plot_ratios, results_dir, write  # noqa: E402

from fused_tp.tolerance import norm_check, rel_err  # noqa: E402

# (tokens, hidden, ffn): Llama-3-70B's, 8B's and Llama-2-7B's MLPs, and decode token counts on the 70B one.
CASES = [(8192, 8192, 28672), (4096, 4096, 14336), (2048, 4096, 11008), (128, 8192, 28672), (16, 8192, 28672)]
QUICK = [(4096, 4096, 14336), (16, 8192, 28672)]
TINY = [(8, 16, 24)]


class _MegatronColumn(torch.autograd.Function):
    """y = x @ w.T + b on this rank's output features; backward all-reduces grad_x, blocking."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        grad_x = g @ w
        dist.all_reduce(grad_x)
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        return grad_x, g2.t() @ x2, g2.sum(0)


class _MegatronRow(torch.autograd.Function):
    """y = all_reduce(x_shard @ w_shard.T) + b; backward has no collective."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        y = F.linear(x, w)
        dist.all_reduce(y)
        return y + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        return g @ w, g2.t() @ x2, g2.sum(0)


def _gather_tokens(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty((x.shape[0] * dist.get_world_size(), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


def _reduce_scatter_tokens(y: torch.Tensor) -> torch.Tensor:
    out = y.new_empty((y.shape[0] // dist.get_world_size(), *y.shape[1:]))
    dist.reduce_scatter_tensor(out, y.contiguous())
    return out


class _MegatronSequence(torch.autograd.Function):
    """Sequence parallelism's entry (gather=True: this rank's tokens -> all of them) or exit (False: partial sums of
    all tokens -> this rank's tokens of their sum); backward does the other, blocking."""

    @staticmethod
    def forward(ctx, t, gather):
        ctx.gather = gather
        return _gather_tokens(t) if gather else _reduce_scatter_tokens(t)

    @staticmethod
    def backward(ctx, g):
        return (_reduce_scatter_tokens(g) if ctx.gather else _gather_tokens(g)), None


OURS, REFERENCES = ("fused_tp", "fused_mlp"), ("megatron", "dtensor")


def models(dense: nn.Sequential, world: int, rank: int, device, sequence_parallel: bool = False):
    """{provider: forward function of x} built from the same dense MLP (x: this rank's tokens with
    sequence_parallel, else all of them)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import fused_tp

    up, down = dense[0], dense[2]
    sp = dict(sequence_parallel=sequence_parallel)
    col, row = fused_tp.ColumnParallelLinear.from_linear(up, **sp), fused_tp.RowParallelLinear.from_linear(down, **sp)
    shard = lambda t, dim: nn.Parameter(torch.tensor_split(t.detach(), world, dim)[rank].clone())  # noqa: E731
    w1, b1, w2 = shard(up.weight, 0), shard(up.bias, 0), shard(down.weight, 1)
    b2 = nn.Parameter(down.bias.detach().clone())
    copy = nn.Sequential(
        nn.Linear(up.in_features, up.out_features), nn.GELU(), nn.Linear(down.in_features, down.out_features)
    ).to(device, up.weight.dtype)
    copy.load_state_dict(dense.state_dict())
    mesh = init_device_mesh(device.type, (world,))
    if sequence_parallel:
        plan = {"0": ColwiseParallel(input_layouts=Shard(0)), "2": RowwiseParallel(output_layouts=Shard(0))}

        def megatron(x):  # the row bias after the reduce-scatter, as Megatron-LM adds it
            h = F.gelu(F.linear(_MegatronSequence.apply(x, True), w1, b1))
            return _MegatronSequence.apply(F.linear(h, w2), False) + b2
    else:
        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}

        def megatron(x):
            return _MegatronRow.apply(F.gelu(_MegatronColumn.apply(x, w1, b1)), w2, b2)

    tp = parallelize_module(copy, mesh, plan)
    mlp = fused_tp.ParallelMLP.from_linears(up, down, **sp)
    return {
        "fused_tp": lambda x: row(F.gelu(col(x))),
        "fused_mlp": mlp,
        "megatron": megatron,
        "dtensor": tp,
    }, [col.weight, col.bias, row.weight, row.bias, w1, b1, w2, b2, *tp.parameters(), *mlp.parameters()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--steps", type=int, default=20)
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help=f"{len(QUICK)} cases instead of {len(CASES)}")
    sizes.add_argument("--tiny", action="store_true", help="one tiny case: checks the script, measures nothing")
    p.add_argument("--sequence-parallel", action="store_true", help="every provider's sequence-parallel form")
    p.add_argument("--compile", action="store_true", help="every provider through torch.compile")
    args = p.parse_args()

    gpus = torch.cuda.device_count()
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("bench_tp_mlp: run it under torchrun: torchrun --nproc-per-node N bench/bench_tp_mlp.py")
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if gpus >= world:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    elif args.tiny:
        device = torch.device("cpu")
    else:
        raise SystemExit(f"bench_tp_mlp: needs a GPU per rank ({world} ranks, {gpus} GPUs); --tiny runs on gloo")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=5))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype, rows = DTYPES[args.dtype], []
    for tokens, hidden, ffn in TINY if args.tiny else QUICK if args.quick else CASES:
        torch.manual_seed(0)
        dense = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden)).to(device, dtype)
        providers, params = models(dense, world, rank, device, args.sequence_parallel)
        if args.compile:
            providers = {n: torch.compile(f, fullgraph=n in OURS) for n, f in providers.items()}
        x = torch.randn(tokens, hidden, device=device, dtype=dtype)
        grad_y = torch.randn(tokens, hidden, device=device, dtype=dtype)
        if args.sequence_parallel:  # this rank's tokens; every case's count splits evenly over 2, 4 and 8
            x, grad_y = x.chunk(world)[rank].contiguous(), grad_y.chunk(world)[rank].contiguous()

        def step(forward):
            inp = x.detach().requires_grad_()
            for t in params:
                t.grad = None
            y = forward(inp)
            y = y.full_tensor() if hasattr(y, "full_tensor") else y
            y.backward(grad_y)
            return y.detach().clone(), inp.grad.clone()  # (clone: DTensor's outputs wait for their collective)

        ref_y, ref_grad = step(providers["megatron"])
        for name in ("fused_tp", "fused_mlp", "dtensor"):
            y, grad = step(providers[name])
            err = max(rel_err(y, ref_y), rel_err(grad, ref_grad))
            if not err <= norm_check(dtype):
                raise SystemExit(f"rank {rank}: {name} differs from the megatron reference by {err:.2e}")
        # The floors: this rank's six shard GEMMs (forward, grad_input, grad_weight of each layer), and the two
        # all-reduces of [tokens, hidden] (the row layer's forward, the column layer's grad_input).
        w1, w2 = params[4].detach(), params[6].detach()
        x_all, g_all = (torch.randn(tokens, hidden, device=device, dtype=dtype) for _ in range(2))  # all tokens
        h, grad_h = (torch.randn(tokens, w1.shape[0], device=device, dtype=dtype) for _ in range(2))
        sums = [torch.empty(tokens, hidden, device=device, dtype=dtype) for _ in range(2)]
        floors = {
            "gemms": lambda: (
                F.linear(x_all, w1),
                grad_h @ w1,
                grad_h.t() @ x_all,
                F.linear(h, w2),
                g_all @ w2,
                g_all.t() @ h,
            ),
            "allreduces": lambda: [dist.all_reduce(t) for t in sums],
        }
        timed = {name: (lambda f=f: step(f)) for name, f in providers.items()} | floors
        times = {name: [] for name in timed}
        for i in range(args.steps + 2):  # 2 warm-up steps
            for name in timed if i % 2 == 0 else list(timed)[::-1]:
                sync()
                dist.barrier()
                start = time.perf_counter()
                timed[name]()
                sync()
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
        gathered = [None] * world
        dist.all_gather_object(gathered, times)
        ms = {n: statistics.median(max(g[n][s] for g in gathered) for s in range(args.steps)) * 1e3 for n in times}
        floor = max(ms["gemms"], ms["allreduces"])
        ratios = {f"{ours}_vs_{ref}": ms[ref] / ms[ours] for ours in OURS for ref in REFERENCES}
        rows.append(
            dict(
                tokens=tokens,
                hidden=hidden,
                ffn=ffn,
                tp=world,
                dtype=args.dtype,
                **{f"{n}_ms": v for n, v in ms.items()},
                **ratios,
                floor_ms=floor,
                **{f"{ours}_over_floor": ms[ours] / floor for ours in OURS},
            )
        )
    if rank == 0:
        info = env()
        cols = [
            "tokens",
            "hidden",
            "ffn",
            "tp",
            "fused_tp_ms",
            "fused_mlp_ms",
            "megatron_ms",
            "dtensor_ms",
            "gemms_ms",
            "allreduces_ms",
            *ratios,
            "fused_mlp_over_floor",
        ]
        print(markdown_table(rows, cols))
        if not args.tiny:
            forms = ("sp_" if args.sequence_parallel else "") + ("compiled_" if args.compile else "")
            name = f"bench_tp_mlp_{forms}{args.dtype}"
            out = results_dir(f"{info['gpu']}-x{world}") / name
            write(out.with_suffix(".json"), {"env": info, "rows": [dict(r, **info) for r in rows]})
            bars = [
                dict(r, reference=f"{ours} vs {ref}", ratio=r[f"{ours}_vs_{ref}"])
                for r in rows
                for ours in OURS
                for ref in REFERENCES
            ]
            plot_ratios(
                bars,
                out.with_suffix(".png"),
                f"fused_tp MLP step vs the references{', compiled' if args.compile else ''}, TP {world}, {args.dtype}, "
                f"{info['gpu']}",
                "reference",
                lambda r: f"{r['tokens']}x{r['hidden']}x{r['ffn']}",
            )
    # DTensor's modules hold reference cycles whose collectives' work objects are freed only by the garbage
    # collector; left to the interpreter's exit, after the group is destroyed, they ended rank 0 in `terminate called
    # without an active exception` on gloo (about 1 run in 5 on a CPU; 0 in 64 with the collection here).
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
