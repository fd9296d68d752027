"""A complete tensor-parallel training script: a dense MLP sharded into Column -> GELU -> Row, trained under torchrun.

    CPU (gloo; the kernels through Triton's interpreter):  torchrun --nproc-per-node 2 examples/train_tp_mlp.py
    GPUs (NCCL, one per rank):                             torchrun --nproc-per-node 8 examples/train_tp_mlp.py

Every rank builds the same dense MLP from the same seed and keeps its shards (from_linear); every rank feeds the
same batch, as tensor parallelism needs (the input of a Column layer is replicated). After the last step rank 0
compares the sharded MLP's output with the dense MLP trained the same way.
"""

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

# torchrun's environment says how many ranks there are; a GPU each means NCCL, else gloo ranks on the CPU. Triton's
# interpreter must be chosen before fused_tp's kernels are defined, that is, before fused_tp is imported.
ON_GPU = torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", "1"))
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_tp  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096 if ON_GPU else 64, help="model width (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=1024 if ON_GPU else 16, help="batch rows (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="SGD steps (default: %(default)s)")
    args = parser.parse_args()

    dist.init_process_group("nccl" if ON_GPU else "gloo", timeout=timedelta(minutes=5))
    rank = dist.get_rank()
    if ON_GPU:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda" if ON_GPU else "cpu")
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    try:
        torch.manual_seed(0)  # the same dense weights and batch on every rank
        hidden, ffn = args.hidden, 4 * args.hidden
        dense = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden)).to(device, dtype)
        model = nn.Sequential(
            fused_tp.ColumnParallelLinear.from_linear(dense[0]),
            nn.GELU(),
            fused_tp.RowParallelLinear.from_linear(dense[2]),
        )
        x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
        target = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)

        for net in (model, dense):
            optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
            for step in range(args.steps):
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.mse_loss(net(x).float(), target.float())
                loss.backward()
                optimizer.step()
                if rank == 0 and net is model:
                    print(f"step {step}: loss {loss.item():.5f}")

        with torch.no_grad():
            y, y_dense = model(x).float(), dense(x).float()
        if rank == 0:
            error = ((y - y_dense).norm() / y_dense.norm()).item()
            print(
                f"after {args.steps} steps, the sharded MLP's output against the dense MLP's: "
                f"relative error {error:.2e} ({dist.get_world_size()} ranks, {dist.get_backend()}, {dtype})"
            )
        # torch 2.13 keeps gloo's worker threads past destroy_process_group once torch._dynamo is imported after
        # init (torch.optim imports it; torch.distributed.nn binds group.WORLD as a default argument), and a worker
        # still releasing the last collective's tensors when the interpreter finalises aborts the process. A barrier
        # waits with the GIL released, so they finish first; its own work holds no Python tensors.
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
