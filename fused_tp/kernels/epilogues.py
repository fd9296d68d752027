"""The activations the matmul kernel can apply in its epilogue, as one table: each entry holds the function and its
derivative as Triton code (run on the fp32 accumulator, before the one rounding) and as torch code (the CPU torch
path, the references, the nn.Module a dense model uses in its place). A new activation is a new entry; the kernel
takes an entry's two functions as compile-time arguments and calls them, with no branch per activation.

    forward      C = fn(A @ B + bias), and the pre-activation A @ B + bias stored beside it for the backward
    grad_input   C = (A @ B) * grad(pre)   the next layer's grad_input carried back through this activation

A gated activation (SwiGLU, GeGLU) reads its pre-activation as interleaved pairs of columns, gate then up: P [..., 2H]
holds gate_j at column 2j and up_j at 2j + 1, and C [..., H] = fn(gate, up). Its grad_input reads the pairs of pre
and writes the gradient of both, interleaved the same way: C [..., 2H] = (A @ B) [..., H] times grad(gate, up),
one factor for each. Interleaving keeps a pair in one output tile whatever the tile's width, so the layout of the
weight does not depend on a launch config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn


# GELU in fp32: exact, x * Phi(x), or approximate="tanh", where 0.5 * x * (1 + tanh(u)) = x * sigmoid(2u) with
# u = sqrt(2 / pi) * (x + 0.044715 x^3).
@triton.jit
def gelu(x):
    phi, _ = _normal_cdf(x)
    return x * phi


@triton.jit
def gelu_grad(x):
    phi, density = _normal_cdf(x)
    return phi + x * 0.3989422804014327 * density


@triton.jit
def _normal_cdf(x):
    """(Phi(x), exp(-x^2 / 2)). Phi is erfc(|x| / sqrt 2) / 2 or 1 minus it, with erfc from Abramowitz & Stegun
    7.1.26 (|error| <= 1.5e-7): one division, one exp (shared with the derivative), a degree-5 polynomial. With
    libdevice's erf, as F.gelu has it, a 128 x 256 tile's epilogue took 63 instructions an element (sm_90a) and
    spilled; this takes 38, and the form timed (45: erf, then 1 + erf) cost the 512 x 4096 x 14336 forward about
    10 us where libdevice's took 28 (bench/NOTES.md, attempt 97). Rounded to bf16 or fp16 it gives the exactly
    rounded value about as often as F.gelu's fp32 does (within 0.01% of elements on normal inputs), and more often
    below x = -3, where F.gelu's 1 + erf(x / sqrt 2) cancels (every digit by x = -5) and erfc of |x| has nothing
    to cancel."""
    a = tl.abs(x) * 0.7071067811865476
    t = 1.0 / (1.0 + 0.3275911 * a)
    density = tl.exp(-a * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    half_erfc = 0.5 * poly * density
    return tl.where(x < 0, half_erfc, 1.0 - half_erfc), density


@triton.jit
def gelu_tanh(x):
    return x * _sigmoid_2u(x)


@triton.jit
def gelu_tanh_grad(x):
    s = _sigmoid_2u(x)
    return s + x * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * x * x)


@triton.jit
def _sigmoid_2u(x):
    # Below -80, exp(-2u) would overflow fp32 (and the interpreter's numpy warn); sigmoid is under 2e-35 there.
    return tl.sigmoid(tl.maximum(1.5957691216057308 * (x + 0.044715 * x * x * x), -80.0))


# SwiGLU, silu(gate) * up in fp32, with silu(x) = x * sigmoid(x) as F.silu computes it, and its two partial
# derivatives: d/dgate = up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))), d/dup = silu(gate).
@triton.jit
def swiglu(gate, up):
    return gate * _sigmoid(gate) * up


@triton.jit
def swiglu_grad(gate, up):
    s = _sigmoid(gate)
    return up * s * (1.0 + gate * (1.0 - s)), gate * s


@triton.jit
def _sigmoid(x):
    # exp(-x) overflows fp32 below -88 (and the interpreter's numpy warns); sigmoid is under 2e-35 there.
    return tl.sigmoid(tl.maximum(x, -80.0))


# GeGLU with the tanh GELU, gelu_tanh(gate) * up (Gemma's MLP, whose act_fn is gelu_pytorch_tanh), and its two
# partial derivatives: d/dgate = up * gelu_tanh'(gate), d/dup = gelu_tanh(gate).
@triton.jit
def geglu_tanh(gate, up):
    return gelu_tanh(gate) * up


@triton.jit
def geglu_tanh_grad(gate, up):
    return up * gelu_tanh_grad(gate), gelu_tanh(gate)


@dataclass(frozen=True)
class Activation:
    """One entry of the table: `fn` and `grad` for the kernel, `torch_fn(x)` and `torch_grad(grad_y, pre)` (the
    gradient through the activation at `pre`) computing the same in torch, `module()` the dense model's layer.
    `gated`: fn takes interleaved (gate, up) column pairs and halves the width (see above)."""

    fn: Callable
    grad: Callable
    torch_fn: Callable[[torch.Tensor], torch.Tensor]
    torch_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    module: Callable[[], nn.Module]
    gated: bool = False

    def width(self, pre_width: int) -> int:
        """The width of fn's output for a pre-activation `pre_width` wide."""
        return pre_width // 2 if self.gated else pre_width


def _gelu(approximate: str) -> dict:
    return dict(
        torch_fn=lambda x: torch.nn.functional.gelu(x, approximate=approximate),
        torch_grad=lambda g, pre: torch.ops.aten.gelu_backward(g, pre, approximate=approximate),
        module=lambda: nn.GELU(approximate),
    )


def _silu_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return grad * s * (1 + x * (1 - s))


def _gated(gate_fn, gate_grad) -> dict:
    """The torch forms of gate_fn(gate) * up over interleaved (gate, up) column pairs [..., 2H] -> [..., H], where
    gate_grad(g, gate) is g * gate_fn'(gate); the gradient comes back interleaved the same way."""

    def fn(pre: torch.Tensor) -> torch.Tensor:
        return gate_fn(pre[..., 0::2]) * pre[..., 1::2]

    def grad(g: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        gate, up = pre[..., 0::2], pre[..., 1::2]
        return torch.stack((gate_grad(g * up, gate), g * gate_fn(gate)), -1).flatten(-2)

    return dict(torch_fn=fn, torch_grad=grad, module=lambda: Gated(fn), gated=True)


class Gated(nn.Module):
    """A gated activation of interleaved (gate, up) column pairs [..., 2H] -> [..., H]: the dense model's layer
    between a Linear whose output rows interleave gate and up projections and the down projection."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        return self.fn(pre)


def _gelu_tanh_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")


ACTIVATIONS = {
    "gelu": Activation(gelu, gelu_grad, **_gelu("none")),  # F.gelu
    "gelu_tanh": Activation(gelu_tanh, gelu_tanh_grad, **_gelu("tanh")),  # F.gelu(approximate="tanh")
    "swiglu": Activation(swiglu, swiglu_grad, **_gated(torch.nn.functional.silu, _silu_grad)),  # Llama's MLP
    # Gemma's MLP
    "geglu_tanh": Activation(
        geglu_tanh,
        geglu_tanh_grad,
        **_gated(lambda x: torch.nn.functional.gelu(x, approximate="tanh"), _gelu_tanh_grad),
    ),
}


def check_activation(activation, allow_none: bool = True) -> str:
    """The table's name for `activation` (None -> ""); ValueError naming the argument if it is not one of
    ACTIVATIONS, or None where `allow_none` (an MLP has an activation: ParallelMLP passes False)."""
    if activation is None and allow_none:
        return ""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        choices = ["None"] * allow_none + [repr(name) for name in ACTIVATIONS]
        expected = ", ".join(choices[:-1]) + " or " + choices[-1]
        raise ValueError(f"activation: expected {expected}, got {activation!r}")
    return activation
