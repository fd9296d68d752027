"""`python -m fused_tp demo`: a dense MLP sharded into Column -> GELU -> Row on N local ranks, checked and timed.

Every rank builds the same dense MLP from one seed, shards it with from_linear, and runs forward and backward
beside the dense nn.Linear MLP on the same inputs. Errors are relative Frobenius norms over the whole tensor
(each rank compares its shard; the squared norms are summed over ranks), against the dense MLP in the same dtype
and against a float64 reference. The verdict is the test suite's: every element of the output and of every
gradient within the tolerance table's bound for the dtype (fused_tp/tolerance.py) of the float64 value.
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
    parser.add_argument("--world-size", type=int, default=2, help="ranks to spawn")
    parser.add_argument(
        "--backend",
        choices=["gloo", "nccl"],
        default=None,
        help="None: nccl with one GPU per rank when there are enough GPUs, else gloo",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="parameters and activations")
    parser.add_argument("--tokens", type=int, default=64, help="rows of the input")
    parser.add_argument("--hidden", type=int, default=256, help="model width; the MLP is 4x wider")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")


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
    from fused_tp.tolerance import MLP_STAGES, bound_ratio, mlp_reference, tol

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=args.world_size, timeout=PROCESS_GROUP_TIMEOUT
    )
    failed = False
    try:
        dtype, world = DTYPES[args.dtype], args.world_size
        hidden, ffn = args.hidden, 4 * args.hidden
        torch.manual_seed(0)
        dense = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden)).to(device, dtype)
        tp = nn.Sequential(
            fused_tp.ColumnParallelLinear.from_linear(dense[0]),
            nn.GELU(),
            fused_tp.RowParallelLinear.from_linear(dense[2]),
        )
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
        params = [dense[0].weight, dense[0].bias, dense[2].weight, dense[2].bias]
        ref, mag = mlp_reference(x, *params, grad_y)  # float64, and the magnitudes the bound scales with
        bound = tol(dtype, max(hidden, ffn, args.tokens), rounds=world, stages=MLP_STAGES)

        own = slice(*shard_range(ffn, world, rank))  # this rank's ffn features: rows of w1, columns of w2
        # (name, this rank's TP tensor, the matching slice of the dense one, key and slice of the float64 one,
        # replicated?)
        pairs = [
            ("y", y_tp, y_dense, "y", ..., True),
            ("grad_x", gx_tp, gx_dense, "grad_x", ..., True),
            ("grad_w1 (column)", tp[0].weight.grad, dense[0].weight.grad[own], "grad_w1", own, False),
            ("grad_b1 (column)", tp[0].bias.grad, dense[0].bias.grad[own], "grad_b1", own, False),
            ("grad_w2 (row)", tp[2].weight.grad, dense[2].weight.grad[:, own], "grad_w2", (slice(None), own), False),
            ("grad_b2 (row)", tp[2].bias.grad, dense[2].bias.grad, "grad_b2", ..., True),
        ]
        # Per tensor: squared norms [|tp - dense|, |dense|, |tp - f64|, |f64|, |dense - f64|] summed over ranks for
        # shards (replicated tensors count once, rank 0's), and the worst error over the bound, maxed over ranks.
        sq = torch.zeros(len(pairs), 5, dtype=torch.float64)
        worst = torch.zeros(len(pairs), dtype=torch.float64)
        for i, (_, t, d, key, part, replicated) in enumerate(pairs):
            r, m = ref[key][part], mag[key][part]
            worst[i] = bound_ratio(t, r, m, bound).nan_to_num(float("inf")).max() if t.numel() else 0.0
            if replicated and rank != 0:
                continue
            t, d = t.double().cpu(), d.double().cpu()
            sq[i] = torch.stack([(t - d).norm(), d.norm(), (t - r).norm(), r.norm(), (d - r).norm()]) ** 2
        sq, worst = (sq.to(device), worst.to(device)) if backend == "nccl" else (sq, worst)
        dist.all_reduce(sq)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        timing = torch.tensor([t_tp, t_dense], dtype=torch.float64, device=sq.device)
        dist.all_reduce(timing, op=dist.ReduceOp.MAX)
        failed = bool((~(worst <= 1)).any())
        if rank == 0:
            _report(
                args,
                backend,
                x.device,
                fused_tp.kernel_path(x.device),
                launches,
                pairs,
                sq.cpu(),
                worst.cpu(),
                bound,
                timing.tolist(),
            )
        # without it torch 2.13 can abort a rank at exit: see the barrier in examples/train_tp_mlp.py
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if failed:
        raise SystemExit(1)


def _report(args, backend, device, path, launches, pairs, sq, worst, bound, timing) -> None:
    norm = sq.sqrt()
    rel = lambda num, den: (num / den).item() if den > 0 else 0.0  # noqa: E731
    print(
        f"fused_tp demo: Column -> GELU -> Row MLP, {args.world_size} ranks ({backend}, {device.type}), "
        f"{args.dtype}, tokens {args.tokens}, hidden {args.hidden}, ffn {4 * args.hidden}"
    )
    line = f"kernel path: {path} ({launches[path]} kernel launches per rank in 1 + {args.steps} steps"
    if path == "triton":  # the copy engine is a GPU's: under the interpreter the count says nothing
        line += f"; {launches['tma']} of them moved tiles with the GPU's bulk copy engine (TMA)"
    print(line + ")\n")
    print(f"{'relative error':<18}{'TP vs dense':>14}{'TP vs fp64':>14}{'dense vs fp64':>16}{'worst / bound':>16}")
    for i, (name, *_) in enumerate(pairs):
        verdict = "PASS" if worst[i] <= 1 else "FAIL"
        print(
            f"{name:<18}{rel(norm[i, 0], norm[i, 1]):>14.2e}{rel(norm[i, 2], norm[i, 3]):>14.2e}"
            f"{rel(norm[i, 4], norm[i, 3]):>16.2e}{worst[i].item():>12.1e}  {verdict}"
        )
    passed = bool((worst <= 1).all())
    print(
        f"\n{'PASS' if passed else 'FAIL'}: {'every' if passed else 'not every'} element of the output and the "
        f"gradients is within the {args.dtype} bound of its float64 value, |error| <= {bound.rel:.3g} * "
        f"magnitude + {bound.abs:.3g} (the test suite's tolerance table, fused_tp/tolerance.py)"
    )
    t_tp, t_dense = timing
    print(
        f"\ntime per forward+backward step (median of {args.steps}, max over ranks): "
        f"dense nn.Linear {t_dense * 1e3:.2f} ms, fused_tp {t_tp * 1e3:.2f} ms"
    )
    if path == "triton-interpreter":
        print("(the interpreter runs the Triton kernels in Python on the CPU: these times are not speed)")
