"""Triton kernels and their launchers. Nothing here calls torch.distributed."""

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
    "path_counts",
    "pick_config",
]
