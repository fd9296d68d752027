"""What the rank-consistency guard (FUSED_TP_CHECK_RANKS) costs: a Column -> GELU -> Row MLP step, forward +
backward, with the guard off and on, interleaved, on local ranks.

    python bench/bench_guard.py [--world-size 2] [--backend gloo|nccl] [--dtype bf16] [--steps 50]
                                [--tokens 16 2048] [--hidden 4096]

The guard adds one all-gather of a 1 KiB record per layer call (two per MLP step) and a host sync. Each step is
timed on every rank from a barrier to the end of backward (device synchronised); a step's time is the max over
ranks, the figure is the median over steps. nccl needs a GPU per rank; with fewer GPUs the ranks share them over
gloo. Writes bench/results/<gpu>[-x<world>]/bench_guard_<backend>_<dtype>_world<N>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import DTYPES, env, markdown_table, results_dir, write  # noqa: E402


def _rank(rank: int, args, backend: str, init_method: str, results) -> None:
    import torch.distributed as dist
    from torch import nn

    import fused_tp

    gpus = torch.cuda.device_count()
    device = torch.device("cuda", rank % gpus) if gpus else torch.device("cpu")
    if gpus:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=args.world_size, timeout=timedelta(seconds=120)
    )
    sync = torch.cuda.synchronize if gpus else (lambda: None)
    dtype, hidden = DTYPES[args.dtype], args.hidden
    torch.manual_seed(0)
    mlp = nn.Sequential(
        fused_tp.ColumnParallelLinear(hidden, 4 * hidden, device=device, dtype=dtype),
        nn.GELU(),
        fused_tp.RowParallelLinear(4 * hidden, hidden, device=device, dtype=dtype),
    )
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
        grad_y = torch.randn(tokens, hidden, device=device, dtype=dtype)
        times = {"off": [], "on": []}
        for i in range(args.steps + 3):  # 3 warm-up steps
            for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
                with fused_tp.check_ranks(mode == "on"):
                    sync()
                    dist.barrier()
                    start = time.perf_counter()
                    mlp(x).backward(grad_y)
                    sync()
                    seconds = time.perf_counter() - start
                if i >= 3:
                    times[mode].append(seconds)
        # A step lasts as long as its slowest rank.
        gathered = [None] * args.world_size
        dist.all_gather_object(gathered, times)
        worst = {m: [max(g[m][s] for g in gathered) for s in range(args.steps)] for m in times}
        off, on = (statistics.median(worst[m]) * 1e3 for m in ("off", "on"))
        rows.append(
            dict(
                tokens=tokens,
                hidden=hidden,
                ffn=4 * hidden,
                dtype=args.dtype,
                world_size=args.world_size,
                backend=backend,
                step_ms_guard_off=off,
                step_ms_guard_on=on,
                overhead_ms=on - off,
                overhead_per_layer_call_ms=(on - off) / 2,
                ratio=off / on,
            )
        )
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def main():
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument(
        "--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with a GPU per rank, else gloo"
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 2048])
    p.add_argument("--hidden", type=int, default=4096)
    args = p.parse_args()
    gpus = torch.cuda.device_count()
    backend = args.backend or ("nccl" if gpus >= args.world_size else "gloo")
    if not gpus:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # fresh rank processes: the kernels through the interpreter
    info = env()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_method = "file://" + os.path.join(tmp, "store")
        mp.spawn(_rank, args=(args, backend, init_method, results), nprocs=args.world_size)
    rows = [dict(r, **info) for r in results.get()]
    # Ranks sharing a card write beside the single-card results; one GPU per rank, in <gpu>-x<N>.
    out = results_dir(info["gpu"] + (f"-x{args.world_size}" if backend == "nccl" else "")) / (
        f"bench_guard_{backend}_{args.dtype}_world{args.world_size}.json"
    )
    write(out, {"env": info, "rows": rows})
    print(
        markdown_table(
            rows,
            [
                "tokens",
                "hidden",
                "ffn",
                "world_size",
                "backend",
                "step_ms_guard_off",
                "step_ms_guard_on",
                "overhead_ms",
                "overhead_per_layer_call_ms",
            ],
        )
    )


if __name__ == "__main__":
    main()
