"""fused_tp: tensor-parallel linear layers whose shard matmul and bias run in one Triton kernel.

kernels/     Triton kernels and launchers (no torch.distributed)
autograd.py  the autograd Functions and functional forms (with guard.py, the only code calling torch.distributed)
guard.py     the optional rank-consistency guard
modules.py   ColumnParallelLinear / RowParallelLinear, drop-ins for nn.Linear; ParallelMLP, Column -> GELU -> Row
parallelize.py  parallelize(model): a whole model's attention and MLP projections sharded (Hugging Face Llama family)
checkpoint.py   sharded models to and from the dense model's state dict or safetensors file (resharding)
grads.py     clip_grad_norm_ (the dense model's gradient norm on every rank), sequence_parallel_grads
"""

from . import checkpoint
from .autograd import column_parallel_linear, row_parallel_linear
from .grads import clip_grad_norm_, sequence_parallel_grads
from .guard import RankMismatchError, check_ranks
from .kernels import kernel_path, path_counts
from .modules import ColumnParallelLinear, ParallelMLP, RowParallelLinear
from .parallelize import parallelize

__version__ = "0.1.0"

__all__ = [
    "ColumnParallelLinear",
    "ParallelMLP",
    "RankMismatchError",
    "RowParallelLinear",
    "check_ranks",
    "checkpoint",
    "clip_grad_norm_",
    "column_parallel_linear",
    "kernel_path",
    "parallelize",
    "path_counts",
    "row_parallel_linear",
    "sequence_parallel_grads",
]
