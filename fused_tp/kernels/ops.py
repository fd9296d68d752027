"""The kernels as PyTorch operators, `torch.ops.fused_tp.*`, so that torch.compile and CUDA graphs see them.

    op                                                        returns
    linear(x [..., K], weight [N, K], bias [N]?, activation, save_pre)
                                                              (y [..., N], pre [..., N] or [0])
    grad_input(grad_y [..., N], weight [N, K], activation, pre [..., K]?)
                                                              grad_x [..., K]
    grad_weight(grad_y [..., N], x [..., K])                  grad_w [N, K]
    bias_grad(grad_y [..., N])                                grad_b [N]

Every output is a new contiguous tensor in the inputs' dtype. The fake implementations give those shapes from the
inputs' alone, so a trace never runs a kernel; the real ones are the launchers of matmul.py, which read strides and
data pointers when they run: a compiled graph takes the same path (descriptors, pointers, an aligned copy) for the
tensors it is given at run time as eager code would, whatever they were when it was traced. They take a fresh
descriptor scratch each launch (matmul.scratch_per_launch), which CUDA graphs from torch.compile need.

The layers' autograd Functions call these through `linear` and the others below: the operator while torch.compile
traces, the launcher itself in eager mode, where the dispatcher's boundary would cost host time (about 10 us a
call through a custom_op, FIELD-NOTES) for nothing. Both run the same function.
"""

from __future__ import annotations

import torch

from . import matmul

# `pre` when none was saved: the schema of a custom op cannot return None.
_NO_PRE = (0,)


@torch.library.custom_op("fused_tp::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
               save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    with matmul.scratch_per_launch():
        y, pre = matmul.linear_prechecked(x, weight, bias, activation, save_pre)
    return y, pre if pre is not None else x.new_empty(_NO_PRE)


@_linear_op.register_fake
def _(x, weight, bias, activation, save_pre):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_pre else _NO_PRE)


@torch.library.custom_op("fused_tp::grad_input", mutates_args=())
def _grad_input_op(grad_y: torch.Tensor, weight: torch.Tensor, activation: str,
                   pre: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    with matmul.scratch_per_launch():
        return matmul.grad_input(grad_y, weight, activation=activation or None, pre=pre)


@_grad_input_op.register_fake
def _(grad_y, weight, activation, pre):
    return grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1]))


@torch.library.custom_op("fused_tp::grad_weight", mutates_args=())
def _grad_weight_op(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with matmul.scratch_per_launch():
        return matmul.grad_params(grad_y, x, bias=False)[0]


@_grad_weight_op.register_fake
def _(grad_y, x):
    return grad_y.new_empty((grad_y.shape[-1], x.shape[-1]))


@torch.library.custom_op("fused_tp::bias_grad", mutates_args=())
def _bias_grad_op(grad_y: torch.Tensor) -> torch.Tensor:
    return matmul._colsum(matmul._rows(grad_y))  # no descriptors: no scratch


@_bias_grad_op.register_fake
def _(grad_y):
    return grad_y.new_empty((grad_y.shape[-1],))


def linear(x, weight, bias, activation: str = "", save_pre: bool = False):
    """(y, pre or None) of matmul.linear_prechecked, through the operator while torch.compile traces."""
    if torch.compiler.is_compiling():
        y, pre = _linear_op(x, weight, bias, activation, save_pre)
        return y, pre if save_pre else None
    return matmul.linear_prechecked(x, weight, bias, activation, save_pre)


def grad_input(grad_y, weight, activation: str = "", pre=None):
    """matmul.grad_input, through the operator while torch.compile traces."""
    if torch.compiler.is_compiling():
        return _grad_input_op(grad_y, weight, activation, pre)
    return matmul.grad_input(grad_y, weight, activation=activation or None, pre=pre)


def grad_params(grad_y, x, *, weight: bool = True, bias: bool = True):
    """matmul.grad_params, through the operators while torch.compile traces."""
    if torch.compiler.is_compiling():
        return (_grad_weight_op(grad_y, x) if weight else None), (_bias_grad_op(grad_y) if bias else None)
    return matmul.grad_params(grad_y, x, weight=weight, bias=bias)
