"""The kernels as PyTorch operators, `torch.ops.fused_tp.*`, so that torch.compile and CUDA graphs see them.

    op                                                        returns
    linear(x [..., K], weight [N, K], bias [N]?, activation)  y [..., N]  (a gated activation: [..., N / 2])
    linear_pre(x, weight, bias, activation)                   (y, pre [..., N]): the pre-activation too
    grad_input(grad_y [..., N], weight [N, K], activation, pre [..., K]?)
                                                              grad_x [..., K]  (gated: pre and grad_x [..., 2K])
    grad_weight(grad_y [..., N], x [..., K])                  grad_w [N, K]
    bias_grad(grad_y [..., N])                                grad_b [N]
    grad_weight_bias(grad_y [..., N], x [..., K])             (grad_w [N, K], grad_b [N]): over a few tokens one
                                                              launch (matmul.grad_params_prechecked), so one op
    linear_grads(grad_y [..., N], weight [N, K], x [..., K], bias, fuse_bias)
                                                              (grad_x, grad_w, grad_b [N] or [0] without bias):
                                                              for a small layer one launch (matmul.paired_grads)

Every output is a new contiguous tensor in the inputs' dtype. The fake implementations give those shapes from the
inputs' alone, so a trace never runs a kernel. The real ones are matmul.py's functions, which plan the launch when
they run, from the tensors they get (alignment included): a compiled graph takes the path eager code takes for the
same tensors, an unaligned input included, and one graph serves every token count. Off the device's default
stream, where torch.compile's CUDA graphs warm up and capture, they take fresh scratch (descriptors, split-K
counters) each launch, kept nowhere (launch.scratch_per_launch); on it they reuse eager launches' buffers.

Opaque operators defined with torch.library.Library, not triton_op: a triton_op's launcher runs once, at trace
time, on FakeTensors, so every decision that depends on the token count (config, split-K, copies) would become a
guard and a recompile per shape bucket, and eager and compiled results could differ in their fp32 summation order;
and under Triton's interpreter (the CPU suite) its kernels cannot be traced at all. Not custom_op either: its
Python wrappers cost more host time per call than the dispatcher itself (bench/NOTES.md, session 11).

The layers' autograd Functions call these through `linear` and the others below: the operator while torch.compile
traces, the function itself in eager mode, where the dispatcher's boundary would cost host time for nothing.
Neither has an autograd formula of its own: gradients come from the layers' Functions, which torch.compile and
torch.export trace through. A formula registered on the operators (torch.library.register_autograd) would run a
Python autograd kernel before every call, gradient or not, a sixth of a compiled forward's host time under no_grad
(bench/NOTES.md, attempt 70). An exported program is therefore for inference.
"""

from __future__ import annotations

import torch

from . import launch, matmul
from .epilogues import ACTIVATIONS

_lib = torch.library.Library("fused_tp", "DEF")
_lib.define("linear(Tensor x, Tensor weight, Tensor? bias, str activation) -> Tensor")
_lib.define("linear_pre(Tensor x, Tensor weight, Tensor? bias, str activation) -> (Tensor, Tensor)")
_lib.define("grad_input(Tensor grad_y, Tensor weight, str activation, Tensor? pre) -> Tensor")
_lib.define("grad_weight(Tensor grad_y, Tensor x) -> Tensor")
_lib.define("bias_grad(Tensor grad_y) -> Tensor")
_lib.define("grad_weight_bias(Tensor grad_y, Tensor x) -> (Tensor, Tensor)")
_lib.define(
    "linear_grads(Tensor grad_y, Tensor weight, Tensor x, bool bias, bool fuse_bias) -> (Tensor, Tensor, Tensor)"
)


def _linear_impl(x, weight, bias, activation):
    with launch.scratch_per_launch():
        return matmul.linear_prechecked(x, weight, bias, activation)[0]


def _linear_pre_impl(x, weight, bias, activation):
    with launch.scratch_per_launch():
        return matmul.linear_prechecked(x, weight, bias, activation, save_pre=True)


def _grad_input_impl(grad_y, weight, activation, pre):
    with launch.scratch_per_launch():
        return matmul.grad_input_prechecked(grad_y, weight, activation, pre)


def _grad_weight_impl(grad_y, x):
    with launch.scratch_per_launch():
        return matmul.grad_params_prechecked(grad_y, x, bias=False)[0]


def _grad_weight_bias_impl(grad_y, x):
    with launch.scratch_per_launch():
        return matmul.grad_params_prechecked(grad_y, x)


def _linear_grads_impl(grad_y, weight, x, bias, fuse_bias):
    with launch.scratch_per_launch():
        grad_x, grad_w, grad_b = _grads(grad_y, weight, x, bias, fuse_bias)
    return grad_x, grad_w, grad_b if grad_b is not None else grad_y.new_empty(0)


def _grads(grad_y, weight, x, bias, fuse_bias):
    grads = matmul.paired_grads(grad_y, weight, x, bias=bias, fuse_bias=fuse_bias)
    if grads is None:
        grad_w, grad_b = matmul.grad_params_prechecked(grad_y, x, bias=bias, fuse_bias=fuse_bias)
        grads = matmul.grad_input_prechecked(grad_y, weight), grad_w, grad_b
    return grads


def _bias_grad_impl(grad_y):
    return matmul.grad_params_prechecked(grad_y, None, weight=False)[1]  # no descriptors: no scratch


for _name, _impl in (
    ("linear", _linear_impl),
    ("linear_pre", _linear_pre_impl),
    ("grad_input", _grad_input_impl),
    ("grad_weight", _grad_weight_impl),
    ("bias_grad", _bias_grad_impl),
    ("grad_weight_bias", _grad_weight_bias_impl),
    ("linear_grads", _linear_grads_impl),
):
    for _key in ("CPU", "CUDA"):
        _lib.impl(_name, _impl, _key)


def _width(activation: str, pre_width: int) -> int:
    return ACTIVATIONS[activation].width(pre_width) if activation else pre_width


@torch.library.register_fake("fused_tp::linear", lib=_lib)
def _(x, weight, bias, activation):
    return x.new_empty((*x.shape[:-1], _width(activation, weight.shape[0])))


@torch.library.register_fake("fused_tp::linear_pre", lib=_lib)
def _(x, weight, bias, activation):
    lead, n = x.shape[:-1], weight.shape[0]
    return x.new_empty((*lead, _width(activation, n))), x.new_empty((*lead, n))


@torch.library.register_fake("fused_tp::grad_input", lib=_lib)
def _(grad_y, weight, activation, pre):
    return grad_y.new_empty(pre.shape if pre is not None else (*grad_y.shape[:-1], weight.shape[1]))


@torch.library.register_fake("fused_tp::grad_weight", lib=_lib)
def _(grad_y, x):
    return grad_y.new_empty((grad_y.shape[-1], x.shape[-1]))


@torch.library.register_fake("fused_tp::bias_grad", lib=_lib)
def _(grad_y):
    return grad_y.new_empty((grad_y.shape[-1],))


@torch.library.register_fake("fused_tp::grad_weight_bias", lib=_lib)
def _(grad_y, x):
    return grad_y.new_empty((grad_y.shape[-1], x.shape[-1])), grad_y.new_empty((grad_y.shape[-1],))


@torch.library.register_fake("fused_tp::linear_grads", lib=_lib)
def _(grad_y, weight, x, bias, fuse_bias):
    n, k = weight.shape
    return grad_y.new_empty((*grad_y.shape[:-1], k)), grad_y.new_empty((n, k)), grad_y.new_empty((n if bias else 0,))


def linear(x, weight, bias, activation: str = "", save_pre: bool = False):
    """(y, pre or None) of matmul.linear_prechecked, through the operator while torch.compile traces."""
    if torch.compiler.is_compiling():
        if save_pre:
            return torch.ops.fused_tp.linear_pre(x, weight, bias, activation)
        return torch.ops.fused_tp.linear(x, weight, bias, activation), None
    return matmul.linear_prechecked(x, weight, bias, activation, save_pre)


def grad_input(grad_y, weight, activation: str = "", pre=None):
    """matmul.grad_input_prechecked, through the operator while torch.compile traces."""
    if torch.compiler.is_compiling():
        return torch.ops.fused_tp.grad_input(grad_y, weight, activation, pre)
    return matmul.grad_input_prechecked(grad_y, weight, activation, pre)


def grad_params(grad_y, x, *, weight: bool = True, bias: bool = True, fuse_bias: bool = True):
    """matmul.grad_params_prechecked, through the operators while torch.compile traces."""
    if torch.compiler.is_compiling():
        if weight and bias and fuse_bias:  # one operator, so that a graph takes eager code's launches and bits
            return torch.ops.fused_tp.grad_weight_bias(grad_y, x)
        return (
            (torch.ops.fused_tp.grad_weight(grad_y, x) if weight else None),
            (torch.ops.fused_tp.bias_grad(grad_y) if bias else None),
        )
    return matmul.grad_params_prechecked(grad_y, x, weight=weight, bias=bias, fuse_bias=fuse_bias)


def grads(grad_y, weight, x, *, bias: bool = True, fuse_bias: bool = True):
    """(grad_x, grad_w, grad_b or None) of a layer whose grad_x no collective waits on alone: matmul.paired_grads's
    one launch where it pairs them, else grad_input and grad_params apart; through the operator while torch.compile
    traces, whose run makes the same choice, so a graph takes eager code's launches and bits."""
    if torch.compiler.is_compiling():
        grad_x, grad_w, grad_b = torch.ops.fused_tp.linear_grads(grad_y, weight, x, bias, fuse_bias)
        return grad_x, grad_w, grad_b if bias else None
    return _grads(grad_y, weight, x, bias, fuse_bias)
