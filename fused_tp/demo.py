"""`python -m fused_tp demo`: a dense MLP sharded into Column -> GELU -> Row on N local ranks, checked and timed.

Every rank builds the same dense MLP from one seed, shards it with from_linear, and runs forward and backward
beside the dense nn.Linear MLP on the same inputs. Errors are relative Frobenius norms over the whole tensor
(each rank compares its shard; the squared norms are summed over ranks), against the dense MLP in the same dtype
and against a float64 reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROCESS_GROUP_TIMEOUT = timedelta(seconds=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=int, default=2, help="ranks to spawn (default 2)")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                        help="default: nccl with one GPU per rank when there are enough GPUs, else gloo")  # fmt: skip
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--tokens", type=int, default=64, help="rows of the input (default 64)")
    parser.add_argument("--hidden", type=int, default=256, help="model width; the MLP is 4x wider (default 256)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default 3)")


def main(args: argparse.Namespace) -> None:
    import torch.multiprocessing as mp

    for name in ("world_size", "tokens", "hidden", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    gpus = torch.cuda.device_count()
    backend = args.backend or ("nccl" if gpus >= args.world_size else "gloo")
    if backend == "nccl" and gpus < args.world_size:
        raise SystemExit(f"--backend nccl: needs one GPU per rank, {args.world_size} ranks but {gpus} GPUs")
    device = "cuda" if gpus else "cpu"
    if device == "cpu":
        # The ranks are fresh processes: run the Triton kernels through the interpreter there, not the torch path.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    with tempfile.TemporaryDirectory() as tmp:
        init_method = "file://" + os.path.join(tmp, "store")
        mp.spawn(_rank_main, args=(args, backend, device, init_method), nprocs=args.world_size)


def _rank_main(rank: int, args, backend: str, device: str, init_method: str) -> None:
    import torch.distributed as dist
    from torch import nn

    import fused_tp
    from fused_tp.autograd import shard_range

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=args.world_size,
                            timeout=PROCESS_GROUP_TIMEOUT)  # fmt: skip
    try:
        dtype, world = DTYPES[args.dtype], args.world_size
        hidden, ffn = args.hidden, 4 * args.hidden
        torch.manual_seed(0)
        dense = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden)).to(device, dtype)
        tp = nn.Sequential(fused_tp.ColumnParallelLinear.from_linear(dense[0]), nn.GELU(),
                           fused_tp.RowParallelLinear.from_linear(dense[2]))  # fmt: skip
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.tokens, hidden, generator=gen).to(device, dtype)
        grad_y = torch.randn(args.tokens, hidden, generator=gen).to(device, dtype)

        def step(model, inp, grad_out):
            inp = inp.detach().requires_grad_()
            model.zero_grad(set_to_none=True)
            out = model(inp)
            out.backward(grad_out)
            return out.detach(), inp.grad

        def timed(model):
            step(model, x, grad_y)  # warm-up: compiles the kernels on a GPU
            times = []
            for _ in range(args.steps):
                if device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                result = step(model, x, grad_y)
                if device != "cpu":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return result, statistics.median(times)

        counts_before = fused_tp.path_counts.copy()
        (y_tp, gx_tp), t_tp = timed(tp)
        launches = fused_tp.path_counts - counts_before
        (y_dense, gx_dense), t_dense = timed(dense)
        ref = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden)).double()
        ref.load_state_dict({k: v.double().cpu() for k, v in dense.state_dict().items()})
        y_ref, gx_ref = step(ref, x.double().cpu(), grad_y.double().cpu())

        own = slice(*shard_range(ffn, world, rank))  # this rank's ffn features: rows of w1, columns of w2
        # (name, this rank's TP tensor, the matching slice of the dense one, of the float64 one, replicated?)
        pairs = [
            ("y", y_tp, y_dense, y_ref, True),
            ("grad_x", gx_tp, gx_dense, gx_ref, True),
            ("grad_w1 (column)", tp[0].weight.grad, dense[0].weight.grad[own], ref[0].weight.grad[own], False),
            ("grad_b1 (column)", tp[0].bias.grad, dense[0].bias.grad[own], ref[0].bias.grad[own], False),
            ("grad_w2 (row)", tp[2].weight.grad, dense[2].weight.grad[:, own], ref[2].weight.grad[:, own], False),
            ("grad_b2 (row)", tp[2].bias.grad, dense[2].bias.grad, ref[2].bias.grad, True),
        ]  # fmt: skip
        # Squared norms [|tp - dense|, |dense|, |tp - f64|, |f64|, |dense - f64|] summed over ranks for shards;
        # replicated tensors count once (rank 0's).
        sq = torch.zeros(len(pairs), 5, dtype=torch.float64)
        for i, (_, t, d, r, replicated) in enumerate(pairs):
            if replicated and rank != 0:
                continue
            t, d, r = t.double().cpu(), d.double().cpu(), r.double().cpu()
            sq[i] = torch.stack([(t - d).norm(), d.norm(), (t - r).norm(), r.norm(), (d - r).norm()]) ** 2
        sq = sq.to(device) if backend == "nccl" else sq
        dist.all_reduce(sq)
        timing = torch.tensor([t_tp, t_dense], dtype=torch.float64, device=sq.device)
        dist.all_reduce(timing, op=dist.ReduceOp.MAX)
        if rank == 0:
            _report(args, backend, x.device, fused_tp.kernel_path(x.device), launches, pairs, sq.cpu(), timing.tolist())
    finally:
        dist.destroy_process_group()


def _report(args, backend, device, path, launches, pairs, sq, timing) -> None:
    norm = sq.sqrt()
    rel = lambda num, den: (num / den).item() if den > 0 else 0.0  # noqa: E731
    print(f"fused_tp demo: Column -> GELU -> Row MLP, {args.world_size} ranks ({backend}, {device.type}), "
          f"{args.dtype}, tokens {args.tokens}, hidden {args.hidden}, ffn {4 * args.hidden}")  # fmt: skip
    print(f"kernel path: {path} ({launches[path]} kernel launches per rank in 1 + {args.steps} steps, "
          f"{launches['tma']} of them through tensor descriptors)\n")  # fmt: skip
    print(f"{'relative error':<18}{'TP vs dense':>14}{'TP vs fp64':>14}{'dense vs fp64':>16}")
    for i, (name, *_) in enumerate(pairs):
        print(f"{name:<18}{rel(norm[i, 0], norm[i, 1]):>14.2e}{rel(norm[i, 2], norm[i, 3]):>14.2e}"
              f"{rel(norm[i, 4], norm[i, 3]):>16.2e}")  # fmt: skip
    t_tp, t_dense = timing
    print(f"\ntime per forward+backward step (median of {args.steps}, max over ranks): "
          f"dense nn.Linear {t_dense * 1e3:.2f} ms, fused_tp {t_tp * 1e3:.2f} ms")  # fmt: skip
    if path == "triton-interpreter":
        print("(the interpreter runs the Triton kernels in Python on the CPU: these times are not speed)")
