"""Triton kernels, their launch plans and launchers, and the operators (torch.ops.fused_tp.*) over them. Nothing here
calls torch.distributed.

    jit.py        the Triton kernels (matmul with bias and activation epilogue, column sum)
    epilogues.py  the activations the epilogue computes, as one table
    matmul.py     the products of a linear layer as functions: check, plan, allocate, launch
    plan.py       launch plans: a pure, cached function of sizes, strides, dtypes, alignment, device and flags
    layout.py     which operands tensor descriptors address, and which to copy into another layout first
    launch.py     the launch itself (directly through the compiled kernel after the first), descriptor scratch
    configs.py    kernel configs: the space, the rule, the split-K model, pinned configs
    tables.py     tuned tables (tuned/*.json)
    autotune.py   run-time autotuning, and the selection rules `tune` shares
    ops.py        the registered operators
"""

from . import ops  # registers torch.ops.fused_tp.*
from .configs import KernelConfig
from .epilogues import ACTIVATIONS, check_activation
from .launch import path_counts
from .matmul import (
    INTERPRETED,
    SUPPORTED_DTYPES,
    check_dtype,
    check_gated_width,
    check_linear_args,
    grad_input,
    grad_params,
    kernel_path,
    linear,
    linear_prechecked,
)
from .plan import pick_config

__all__ = [
    "ACTIVATIONS",
    "INTERPRETED",
    "KernelConfig",
    "SUPPORTED_DTYPES",
    "check_activation",
    "check_dtype",
    "check_gated_width",
    "check_linear_args",
    "grad_input",
    "grad_params",
    "kernel_path",
    "linear",
    "linear_prechecked",
    "ops",
    "path_counts",
    "pick_config",
]
