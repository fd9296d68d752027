"""One tolerance table for every comparison against a float64 reference: the bounds the tests hold fused_tp to, and
the demo's PASS/FAIL verdict.

A result r computed in floating point differs from its exact value by at most tol.rel * mag + tol.abs
elementwise, where mag is the same computation run on absolute values (|x| @ |w|.T + |b| for a linear layer), the
quantity that rounding errors scale with, and tol comes from the table below:

    rel = 2 * TF32_INPUT      (fp32 operands cut to tf32, only where tf32 is on)
        + 2 * k * ACC         (k products summed in fp32; 2x for tensor cores that truncate rather than round)
        + rounds * UNIT[dtype]   (each rounding of a partial result to the output dtype: one for a plain GEMM,
                                  one more for each partial sum an all-reduce adds in the output dtype)
    abs = rounds * TINY[dtype]   (results in the subnormal range round to a fixed spacing, not a relative one)

Compositions (a Column -> GELU -> Row MLP and its gradients) multiply both by the number of rounded stages on the
longest chain. An activation in a kernel's epilogue (act_tol) acts on the unrounded fp32 product: its error grows
by at most max |gelu'| and gains the activation's own fp32 evaluation. A test shows the table rejects planted
errors (tests/test_tolerance.py).
"""

from typing import NamedTuple

import torch

from .kernels.tables import DTYPE_NAMES

UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # unit roundoff of the result
TINY = {torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}  # half the subnormal spacing
ACC = 2.0**-24  # fp32 accumulation
# A 10-bit mantissa, truncated: Triton hands fp32 bits to the tensor cores, which drop the low 13, where cuBLAS
# rounds to nearest first (2^-11); Triton's maintainers matched torch only after an explicit cvt.rna.tf32.f32
# (triton-lang/triton#4574). Rounding the operands in the kernel, as cuBLAS does, would restore 2^-11: not done.
# Seen on the H100: the 16-token case of test_fp32_operands_are_copied_into_the_layout_the_product_reads failed
# under 2^-11 and passes under 2^-10.
TF32_INPUT = 2.0**-10


GELU_SLOPE = 1.13  # max |gelu'(x)| (and of the tanh form): how much an error in the pre-activation can grow
ACT_EVAL = 2.0**-20  # GELU or its derivative evaluated in fp32 (erf or exp and a few operations: a few ulp each)


# Norm-wise relative error, ||out - ref|| / ||ref||, allowed where fused_tp's output is checked against a baseline
# computed another way (cuBLAS, the nn.Linear stack, torch) before it is timed: by `tune` for every config and by
# the bench scripts. A check that the result is right, not a bound on its accuracy (the elementwise bounds above
# are that): a few roundings of the output dtype (fp32: summation orders; tf32: its 10-bit operands), where a wrong
# config or a wrong sum is off by orders of magnitude. Keyed by the tuned tables' dtype names.
NORM_CHECK = {"bf16": 2e-2, "fp16": 4e-3, "fp32": 1e-4, "tf32": 4e-3}


def norm_check(dtype: torch.dtype, tf32: bool = False) -> float:
    """NORM_CHECK's bound for operands of `dtype` (fp32 with `tf32`: products through TF32)."""
    return NORM_CHECK["tf32" if tf32 and dtype == torch.float32 else DTYPE_NAMES[dtype]]


def rel_err(out, ref) -> float:
    """The error norm_check bounds: ||out - ref|| / ||ref|| in float64 (||out - ref|| where ref is zero); of tuples,
    the largest over their pairs."""
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    errs = []
    for o, r in zip(outs, refs):
        den = r.double().norm().item()
        errs.append((o.double() - r.double()).norm().item() / (den or 1.0))
    return max(errs)


class Tol(NamedTuple):
    rel: float
    abs: float


def tol(dtype: torch.dtype, k: int, rounds: int = 1, stages: int = 1, tf32: bool = False) -> Tol:
    rel = (2 * TF32_INPUT if tf32 and dtype == torch.float32 else 0.0) + 2 * k * ACC + rounds * UNIT[dtype]
    return Tol(stages * rel, stages * rounds * TINY[dtype])


def act_tol(dtype: torch.dtype, k: int, tf32: bool = False) -> Tol:
    """activation(A @ B + bias), or (A @ B) * activation'(pre), computed on the fp32 accumulator and rounded once,
    against the float64 value: relative to the product's magnitude (|activation| <= |x|, |activation'| <= 1.13)."""
    base = tol(dtype, k, tf32=tf32)
    return Tol(GELU_SLOPE * base.rel + ACT_EVAL, base.abs)


def bound_ratio(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, tol: Tol) -> torch.Tensor:
    """Elementwise |out - ref| / (tol.rel * mag + tol.abs), float64 (NaN where out is NaN): <= 1 is within the
    bound. ref and mag are float64."""
    err = (out.detach().to(device=ref.device, dtype=torch.float64) - ref).abs()
    return err / (tol.rel * mag + tol.abs).clamp_min(1e-300)


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, tol: Tol) -> None:
    """|out - ref| <= tol.rel * mag + tol.abs everywhere (NaN fails); ref and mag are float64."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    ratio = bound_ratio(out, ref, mag, tol)
    bad = ~(ratio <= 1)
    if bad.any():
        worst = ratio.nan_to_num(float("inf")).flatten().argmax()
        limit = tol.rel * mag.flatten()[worst] + tol.abs
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {ratio.numel()} elements outside tolerance {tol.rel:.3g} * |magnitude| "
            f"+ {tol.abs:.3g}; worst at flat index {int(worst)}: got {out.flatten()[worst].item()!r}, "
            f"want {ref.flatten()[worst].item()!r} +- {limit.item():.3g}"
        )


def linear_reference(x, w, b=None):
    """(y, mag) of y = x @ w.T + b in float64; mag is the same on absolute values."""
    x64, w64 = x.detach().double().cpu(), w.detach().double().cpu()
    y = x64 @ w64.T
    mag = x64.abs() @ w64.abs().T
    if b is not None:
        b64 = b.detach().double().cpu()
        y, mag = y + b64, mag + b64.abs()
    return y, mag


def layer_reference(x, w, b, grad_y):
    """{name: (value, magnitude)} in float64 for y, grad_x, grad_w (and grad_b) of y = x @ w.T + b, x [M, K]."""
    g64 = grad_y.detach().double().cpu()
    ref = {
        "y": linear_reference(x, w, b),
        "grad_x": linear_reference(grad_y, w.t()),
        "grad_w": linear_reference(grad_y.t(), x.t()),
    }
    if b is not None:
        ref["grad_b"] = (g64.sum(0), g64.abs().sum(0))
    return ref


# Rounded stages on the longest chain of the MLP's gradients: h, then grad_a, grad_h and the last GEMM.
MLP_STAGES = 4


def _mlp64(x, w1, b1, w2, b2, grad_y, act):
    leaves = dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    leaves = {k: v.detach().double().cpu().requires_grad_() for k, v in leaves.items() if v is not None}
    h = leaves["x"] @ leaves["w1"].T + leaves.get("b1", 0.0)
    y = act(h) @ leaves["w2"].T + leaves.get("b2", 0.0)
    y.backward(grad_y.double().cpu())
    return {"y": y.detach(), **{"grad_" + k: v.grad for k, v in leaves.items()}}


def _gelu_magnitude(h):
    # |gelu(h)| <= |h| and |gelu'| <= 1.13: a = 1.13 h; |gelu''| <= 0.8 carries an error in h into gelu'(h): the
    # derivative is taken as 1.13 + 0.8 h (the same bounds hold for the tanh form).
    return 1.13 * h + 0.8 * h.detach() * (h - h.detach())


def _gated_magnitude(slope: float, curvature: float):
    """The magnitude of a = f(g) * u over interleaved pairs, for a gate function with |f(g)| <= |g|, |f'| <= slope
    and |f''| <= curvature (SiLU: 1.1 and 0.5; the tanh GELU: 1.13 and 0.8). An error in g reaches a through
    u f'(g), one in u through f(g), so a = (1 + slope) g u bounds both, and a itself. Backward, grad_g = grad_a u
    f'(g) takes errors of grad_a (slope u), of u (slope grad_a) and of g (curvature u g grad_a), so d/dg is taken as
    2 slope u + curvature u g; grad_u = grad_a f(g) takes (1 + slope) g."""

    def magnitude(h):
        g, u = h[..., 0::2], h[..., 1::2]
        gd, ud = g.detach(), u.detach()
        return (1 + slope) * g * u + ((slope - 1) * ud + curvature * ud * gd) * (g - gd)

    return magnitude


# (slope, curvature) of a gated activation's gate function, as _gated_magnitude takes them
_GATE_BOUNDS = {"swiglu": (1.1, 0.5), "geglu_tanh": (GELU_SLOPE, 0.8)}
_MAGNITUDES = {
    "gelu": _gelu_magnitude,
    "gelu_tanh": _gelu_magnitude,
    **{name: _gated_magnitude(*bounds) for name, bounds in _GATE_BOUNDS.items()},
}


def activation_reference(activation: str, pre, pre_mag):
    """(value, magnitude) in float64 of activation(pre) from the pre-activation's (value, magnitude), for act_tol
    (whose GELU_SLOPE covers a GELU's derivative: its magnitude is the pre-activation's; a gated one's is
    (1 + slope) |gate| |up|, _gated_magnitude)."""
    from .kernels.epilogues import ACTIVATIONS

    value = ACTIVATIONS[activation].torch_fn(pre)
    return value, _MAGNITUDES[activation](pre_mag).detach() if ACTIVATIONS[activation].gated else pre_mag


def activation_grad_reference(activation: str, grad, grad_mag, pre):
    """(value, magnitude) in float64 of the gradient through the activation at a given (exact) pre-activation `pre`,
    from the incoming gradient's (value, magnitude), for act_tol: an error in grad reaches it times |activation'|
    (GELU: <= GELU_SLOPE; a gated one: its gate function's slope times |up| for the gate, |f(gate)| <= |gate| for
    up)."""
    from .kernels.epilogues import ACTIVATIONS

    pre64 = pre.detach().double().cpu().requires_grad_()
    ACTIVATIONS[activation].torch_fn(pre64).backward(grad)
    if not ACTIVATIONS[activation].gated:
        return pre64.grad, GELU_SLOPE * grad_mag
    gate, up = pre64.detach()[..., 0::2].abs(), pre64.detach()[..., 1::2].abs()
    slope = _GATE_BOUNDS[activation][0]
    return pre64.grad, torch.stack((slope * up * grad_mag, gate * grad_mag), -1).flatten(-2)


def mlp_reference(x, w1, b1, w2, b2, grad_y, activation="gelu"):
    """(values, magnitudes) of the dense Linear -> activation -> Linear in float64 (`activation`: an entry of
    fused_tp.kernels.ACTIVATIONS; "swiglu" reads w1's output rows as interleaved (gate, up) pairs): dicts with y
    and grad_<name> of x, w1, b1, w2, b2. The magnitudes run the same graph on absolute values with the activation
    replaced by a bound of it whose derivative bounds the errors the backward carries (_MAGNITUDES)."""
    from .kernels.epilogues import ACTIVATIONS

    ref = _mlp64(x, w1, b1, w2, b2, grad_y, ACTIVATIONS[activation].torch_fn)
    absolute = [None if t is None else t.detach().abs() for t in (x, w1, b1, w2, b2, grad_y)]
    mag = _mlp64(*absolute, _MAGNITUDES[activation])
    return ref, mag
