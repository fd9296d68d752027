"""Triton kernels, their launchers, and the operators (torch.ops.fused_tp.*) over them. Nothing here calls
torch.distributed."""

from . import ops  # registers torch.ops.fused_tp.*
from .configs import KernelConfig, pick_config
from .matmul import (
    ACTIVATIONS,
    INTERPRETED,
    SUPPORTED_DTYPES,
    check_activation,
    check_dtype,
    check_linear_args,
    grad_input,
    grad_params,
    kernel_path,
    linear,
    linear_prechecked,
    path_counts,
)

__all__ = [
    "ACTIVATIONS",
    "INTERPRETED",
    "KernelConfig",
    "SUPPORTED_DTYPES",
    "check_activation",
    "check_dtype",
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
