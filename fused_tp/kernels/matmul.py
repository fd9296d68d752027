"""One Triton matmul kernel serves the forward and both backward products of a linear layer.

    C[M, N] = A[M, K] @ B[K, N]  (+ bias[N] on the fp32 accumulator)  (then an optional activation epilogue)

A and B are read through their strides, so the three products of y = x @ w.T + b are one kernel:

    op            A                  B                C
    forward       x       [M, K]     w.T    [K, N]    y      [M, N]  + bias
    grad_input    grad_y  [M, N]     w      [N, K]    grad_x [M, K]
    grad_weight   grad_y.T[N, M]     x      [M, K]    grad_w [N, K]

The bias gradient, the column sums of grad_y, is a second kernel: a reduction over rows. (Summing A's rows inside
the grad_weight pass costs that pass half its speed on an H100: bench/NOTES.md.)

Activation epilogue (GELU, exact or tanh), for a Column -> GELU -> Row MLP in fewer launches and passes over memory:

    forward      C = gelu(A @ B + bias), and the pre-activation A @ B + bias stored beside it for the backward
    grad_input   C = (A @ B) * gelu'(pre)   the next layer's grad_input carried through this layer's activation

Both run on the fp32 accumulator, before C is rounded.

Split-K: where a compute-bound C has too few tiles to keep every SM busy (the weight gradient of a narrow layer
over many tokens; configs.choose_split_k says when), the K loop is split over `splits` programs per tile. Each
writes its fp32 partial sum to a workspace [splits, M, N], the bias going into split 0's partial only (as the
row-parallel layer adds it on rank 0 only), and the column-sum kernel adds the partials in split order and
rounds once: the same function, deterministic, no atomics.

Where kernels run: CUDA tensors through compiled Triton; any tensor through Triton's interpreter when
TRITON_INTERPRET=1 was set before this module was imported; CPU tensors otherwise through a torch path that
computes the same function (fp32 accumulation, bias on the accumulator, one rounding). `kernel_path` says which
one a device gets and `path_counts` how many launches took each path.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import time
import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing
from triton import knobs
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from . import configs
from .configs import COLSUM_CONFIG, INTERPRETER_PROGRAMS, SPLIT_SUM_CONFIG, KernelConfig, colsum_chunks, pick_config

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The activations the epilogue computes, by name: F.gelu's `approximate` argument for each.
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


# Sizes are not specialised on their value (divisible by 16, equal to 1): masks and descriptors cover any size,
# and a new shape must not mean a new compile. Strides stay specialised: a unit stride makes loads coalesced.
@triton.jit(do_not_specialize=["M", "N", "K", "num_programs", "splits", "k_tiles_per_split"])
def _matmul_kernel(
    # pointers
    a_ptr,  # [M, K] A operand
    b_ptr,  # [K, N] B operand
    bias_ptr,  # [N]    added to the fp32 accumulator (read only when HAS_BIAS; by split 0 only)
    c_ptr,  # [M, N] output, or with SPLIT the fp32 partial sums [splits, M, N]
    aux_ptr,  # [M, N] with C's strides: the pre-activation, stored (AUX == "store") or read (AUX == "load")
    # sizes
    M,
    N,
    K,
    # strides, in elements
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_bias,
    stride_cs,  # between the partial sums of two splits (SPLIT only)
    # the work: (split, tile) items, split-major; each program walks the items pid, pid + num_programs, ...
    splits,
    k_tiles_per_split,  # every split runs this many K-steps; the last one's tail past K loads as zeros
    num_programs,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # convert operands to fp32 before tl.dot (the interpreter's 16-bit dot is wrong)
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32", for fp32 operands
    TMA: tl.constexpr,  # move A and B tiles with tensor descriptors (Hopper's bulk copy engine), not pointers
    TMA_C: tl.constexpr,  # TMA: store C (and move the pre-activation) through descriptors too: their rows are aligned
    A_T: tl.constexpr,  # TMA: A is stored M-contiguous (stride_am == 1), so its tiles load as [BLOCK_K, BLOCK_M]
    B_T: tl.constexpr,  # TMA: B is stored K-contiguous (stride_bk == 1), so its tiles load as [BLOCK_N, BLOCK_K]
    SPLIT: tl.constexpr,  # C holds fp32 partial sums, one [M, N] slab per split, stored through pointers
    ACTIVATION: tl.constexpr,  # "", "gelu" or "gelu_tanh": applied to C, or with AUX == "load" its derivative
    AUX: tl.constexpr,  # "", "store" (also write the pre-activation) or "load" (C *= ACTIVATION'(aux))
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    num_tiles = num_pid_m * num_pid_n
    if TMA:
        # Descriptors address the operands in their stored order; out-of-bounds parts of a tile load as 0 and
        # are not stored, so no masks are needed.
        if A_T:
            a_desc = tl.make_tensor_descriptor(a_ptr, [K, M], [stride_ak, 1], [BLOCK_K, BLOCK_M])
        else:
            a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
        if B_T:
            b_desc = tl.make_tensor_descriptor(b_ptr, [N, K], [stride_bn, 1], [BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, [K, N], [stride_bk, 1], [BLOCK_K, BLOCK_N])
        if TMA_C and AUX != "":  # the activation epilogue works on column halves (below)
            c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [stride_cm, 1], [BLOCK_M, BLOCK_N // 2])
            aux_desc = tl.make_tensor_descriptor(aux_ptr, [M, N], [stride_cm, 1], [BLOCK_M, BLOCK_N // 2])
        elif TMA_C and not SPLIT:
            c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [stride_cm, 1], [BLOCK_M, BLOCK_N])
    # An activation does not distribute over partial sums: the launcher never splits such a launch.
    tl.static_assert(not (SPLIT and ACTIVATION != ""))

    # flatten=True lets the compiler pipeline the next tile's first loads under this tile's epilogue.
    for item in tl.range(tl.program_id(0), num_tiles * splits, num_programs, flatten=True):
        # Split-major: the programs running at one time share one K-range of A and B in L2.
        split = item // num_tiles
        tile = item % num_tiles
        # Grouped tile order (Triton tutorial 03): GROUP_M row-tiles share each column of B while it is in L2.
        first_pid_m = (tile // num_pid_in_group) * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
        pid_n = (tile % num_pid_in_group) // group_size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        # Every pointer offset is int64 (tests/test_scale.py checks the IR): a tensor of 2^31 elements or more, or
        # a view with a large stride, must not wrap.
        a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
        b_cols = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(k_tiles_per_split):
            k0 = (split * k_tiles_per_split + kt) * BLOCK_K
            if TMA:
                if A_T:
                    a = a_desc.load([k0, pid_m * BLOCK_M]).T
                else:
                    a = a_desc.load([pid_m * BLOCK_M, k0])
                if B_T:
                    b = b_desc.load([pid_n * BLOCK_N, k0]).T
                else:
                    b = b_desc.load([k0, pid_n * BLOCK_N])
            else:
                ks = k0 + offs_k
                a = tl.load(a_rows + ks[None, :].to(tl.int64) * stride_ak, mask=mask_m[:, None] & (ks[None, :] < K),
                            other=0.0)  # fmt: skip
                b = tl.load(b_cols + ks[:, None].to(tl.int64) * stride_bk, mask=(ks[:, None] < K) & mask_n[None, :],
                            other=0.0)  # fmt: skip
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

        if HAS_BIAS:
            bias_n = tl.where(split == 0, N, 0)  # split 0 alone adds the bias
            bias = tl.load(bias_ptr + offs_n.to(tl.int64) * stride_bias, mask=offs_n < bias_n, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if TMA_C and AUX != "":
            # Through descriptors the activation epilogue works on two column halves, each staged in shared memory
            # on its own: whole tiles of C and the pre-activation needed two output tiles beside the operand stages
            # (278568 bytes for 128x256x64 in 3 stages, over the 232448 a program has); halves need one.
            acc_lo, acc_hi = _column_halves(acc, BLOCK_M, BLOCK_N)
            m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
            _activation_epilogue(acc_lo, c_desc, aux_desc, m0, n0, c_ptr.dtype.element_ty,
                                 aux_ptr.dtype.element_ty, ACTIVATION, AUX)  # fmt: skip
            _activation_epilogue(acc_hi, c_desc, aux_desc, m0, n0 + BLOCK_N // 2, c_ptr.dtype.element_ty,
                                 aux_ptr.dtype.element_ty, ACTIVATION, AUX)  # fmt: skip
        else:
            mask_c = mask_m[:, None] & mask_n[None, :]
            if AUX == "load":
                pre = tl.load(_tile(aux_ptr, offs_m, offs_n, stride_cm, stride_cn), mask=mask_c, other=0.0)
                acc *= _activation_grad(pre.to(tl.float32), ACTIVATION == "gelu_tanh")
            elif ACTIVATION != "":
                if AUX == "store":
                    tl.store(_tile(aux_ptr, offs_m, offs_n, stride_cm, stride_cn), acc.to(aux_ptr.dtype.element_ty),
                             mask=mask_c)  # fmt: skip
                acc = _activation(acc, ACTIVATION == "gelu_tanh")
            if SPLIT:
                # fp32 partials, stored in two column halves: the layout change before a store then needs half the
                # shared memory (a whole 128x256 fp32 tile beside 3 operand stages does not fit in 227 KiB).
                c_rows = c_ptr + split.to(tl.int64) * stride_cs + offs_m[:, None].to(tl.int64) * stride_cm
                acc_lo, acc_hi = _column_halves(acc, BLOCK_M, BLOCK_N)
                offs_lo = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
                offs_hi = offs_lo + BLOCK_N // 2
                tl.store(c_rows + offs_lo[None, :].to(tl.int64) * stride_cn, acc_lo,
                         mask=mask_m[:, None] & (offs_lo[None, :] < N))  # fmt: skip
                tl.store(c_rows + offs_hi[None, :].to(tl.int64) * stride_cn, acc_hi,
                         mask=mask_m[:, None] & (offs_hi[None, :] < N))  # fmt: skip
            elif TMA_C:
                c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_ptr.dtype.element_ty))
            else:
                tl.store(_tile(c_ptr, offs_m, offs_n, stride_cm, stride_cn), acc.to(c_ptr.dtype.element_ty),
                         mask=mask_c)  # fmt: skip

@triton.jit
def _column_halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] as its left and right [BLOCK_M, BLOCK_N // 2] halves."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _activation_epilogue(acc, c_desc, aux_desc, m0, n0, C_TYPE: tl.constexpr, AUX_TYPE: tl.constexpr,
                         ACTIVATION: tl.constexpr, AUX: tl.constexpr):  # fmt: skip
    """The activation epilogue of a C block at (m0, n0) through tensor descriptors: C *= activation'(pre), or the
    pre-activation stored and C = activation(C)."""
    if AUX == "load":
        acc *= _activation_grad(aux_desc.load([m0, n0]).to(tl.float32), ACTIVATION == "gelu_tanh")
    else:
        aux_desc.store([m0, n0], acc.to(AUX_TYPE))
        acc = _activation(acc, ACTIVATION == "gelu_tanh")
    c_desc.store([m0, n0], acc.to(C_TYPE))


@triton.jit
def _tile(ptr, offs_m, offs_n, stride_m, stride_n):
    """The pointers of an [M, N] tile, in int64 (see the operands' pointers)."""
    return ptr + offs_m[:, None].to(tl.int64) * stride_m + offs_n[None, :].to(tl.int64) * stride_n


# GELU in fp32, as F.gelu computes it: exact, x * Phi(x), or approximate="tanh", where
# 0.5 * x * (1 + tanh(u)) = x * sigmoid(2u) with u = sqrt(2 / pi) * (x + 0.044715 x^3).
@triton.jit
def _activation(x, TANH: tl.constexpr):
    if TANH:
        return x * _sigmoid_2u(x)
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _activation_grad(x, TANH: tl.constexpr):
    if TANH:
        s = _sigmoid_2u(x)
        return s + x * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * x * x)
    return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def _sigmoid_2u(x):
    # Below -80, exp(-2u) would overflow fp32 (and the interpreter's numpy warn); sigmoid is under 2e-35 there.
    return tl.sigmoid(tl.maximum(1.5957691216057308 * (x + 0.044715 * x * x * x), -80.0))


@triton.jit(do_not_specialize=["M", "N", "rows_per_program"])
def _colsum_kernel(
    g_ptr,  # [M, N] input
    out_ptr,  # [chunks, N] column sums of each chunk of rows_per_program rows (chunks = the grid's second dim)
    M,
    N,
    stride_gm,
    stride_gn,
    rows_per_program,  # a multiple of BLOCK_M
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program (i, j) sums rows [j * rows_per_program, (j + 1) * rows_per_program) of BLOCK_N columns, in a fixed
    # order, so the result is the same on every run and every rank (no atomics).
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    first = tl.program_id(1) * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    cols = g_ptr + offs_n[None, :].to(tl.int64) * stride_gn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(first, last, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        g = tl.load(cols + rows[:, None].to(tl.int64) * stride_gm, mask=(rows[:, None] < last) & mask_n[None, :],
                    other=0.0)  # fmt: skip
        acc += g.to(tl.float32)
    out = out_ptr + tl.program_id(1).to(tl.int64) * N + offs_n.to(tl.int64)
    tl.store(out, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)


INTERPRETED = isinstance(_matmul_kernel, InterpretedFunction)

# How many launches took each path since import, keyed by path name; "tma" counts the matmul launches (of "triton"
# or "triton-interpreter") that moved tiles with tensor descriptors rather than pointers, "split_k" those that split
# their K loop, "config_pinned" / "config_autotuned" / "config_table" / "config_rule" where their config came from
# (configs.py).
path_counts: collections.Counter = collections.Counter()
_warned_torch_path = False


def kernel_path(device: torch.device | str) -> str:
    """Which implementation runs for tensors on `device`: "triton", "triton-interpreter" or "torch"."""
    if INTERPRETED:
        return "triton-interpreter"
    return "triton" if torch.device(device).type == "cuda" else "torch"


def _path(t: torch.Tensor) -> str:
    """kernel_path(t.device), without building a device object on every launch."""
    return "triton-interpreter" if INTERPRETED else "triton" if t.is_cuda else "torch"


def check_dtype(name: str, dtype: torch.dtype) -> None:
    """TypeError naming `name` unless the kernels take `dtype`."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {dtype}")


def check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      names: tuple[str, str, str] = ("input", "weight", "bias")) -> None:  # fmt: skip
    """Raise TypeError / ValueError naming the argument (by `names`) if (x, weight, bias) is not a valid F.linear
    call."""
    in_name, w_name, b_name = names
    args = ((w_name, weight), (in_name, x), (b_name, bias))
    for name, t in args:
        if not isinstance(t, torch.Tensor) and not (t is None and name == b_name):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    # The weight first: a layer turned float64 after construction (model.double()) is the weight's fault, not the
    # input's.
    for name, t in args:
        if t is not None:
            check_dtype(name, t.dtype)
    # The weight is the reference: it is what a layer owns, the input and bias are what the caller passes.
    for name, t in ((in_name, x), (b_name, bias)):
        if t is not None and t.dtype != weight.dtype:
            raise TypeError(f"{name}: expected dtype {weight.dtype} (the {w_name}'s), got {t.dtype}")
        if t is not None and t.device != weight.device:
            raise ValueError(f"{name}: expected device {weight.device} (the {w_name}'s), got {t.device}")
    if weight.dim() != 2:
        raise ValueError(f"{w_name}: expected 2 dims [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{in_name}: expected last dim {weight.shape[1]} ({w_name}.shape[1]), got shape {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{b_name}: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _out(shape, like: torch.Tensor, path: str) -> torch.Tensor:
    """An output buffer for a kernel: in the operands' dtype, or fp32 where the interpreter must not round.

    The interpreter multiplies bf16 bit patterns in tl.dot, gets bf16 elementwise ops and sums wrong, and truncates
    fp32 -> bf16 casts (FIELD-NOTES). Its fp32 arithmetic and bf16 -> fp32 casts are exact, so there 16-bit
    operands are widened before any arithmetic, the kernels write fp32, and `_rounded` rounds once to nearest
    even: the same function the compiled kernels compute, up to the order of fp32 sums.
    """
    wide = path == "triton-interpreter" and like.dtype != torch.float32
    return torch.empty(shape, device=like.device, dtype=torch.float32 if wide else like.dtype)


def _rounded(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return out if out.dtype == dtype else out.to(dtype)


def _matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, product: str, activation: str = "",
            pre: torch.Tensor | None = None, save_pre: bool = False) -> tuple:  # fmt: skip
    """(C, the pre-activation or None). C = A @ B (+ bias); A [M, K], B [K, N] with any strides; C [M, N]
    contiguous. `product` (configs.PRODUCTS) names which of the layer's products this is, for the tuned tables.

    activation ("" or a key of ACTIVATIONS): C = activation(A @ B + bias), and with save_pre the pre-activation
    [M, N] is returned too; or with `pre` ([M, N], contiguous) C = (A @ B) * activation'(pre)."""
    (M, K), N = a.shape, b.shape[1]
    path = _path(a)
    path_counts[path] += 1
    if path == "torch":
        _warn_torch_path_once()
        c = a.float() @ b.float()
        c = c if bias is None else c + bias.float()
        saved = c.to(a.dtype) if save_pre else None
        if pre is not None:
            c = torch.ops.aten.gelu_backward(c, pre.float(), approximate=ACTIVATIONS[activation])
        elif activation:
            c = F.gelu(c, approximate=ACTIVATIONS[activation])
        return c.to(a.dtype), saved

    c = _out((M, N), a, path)
    aux = _out((M, N), a, path) if save_pre else pre
    tma = _tma_layout(a, b, c, aux)
    tf32 = a.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32  # follow F.linear's setting
    if tma is None and M and N and K and _has_tma(a.device):
        a2, b2 = _aligned_operands(a, b, tf32)
        if a2 is not a or b2 is not b:
            a, b, tma = a2, b2, _tma_layout(a2, b2, c, aux)
    if a.dtype == torch.float32 and tma is not None and (tma[0] or tma[1] != tf32):
        a2, b2 = _fp32_layout(a, b, tma, tf32)
        if a2 is not a or b2 is not b:
            a, b, tma = a2, b2, _tma_layout(a2, b2, c, aux)
    pinned, source = configs.pinned_config(), None
    if pinned is None and configs.autotune_enabled():
        pinned, source = _autotuned(a, b, bias, product, tma, tf32, pre is not None), "autotuned"
    aux_mode = "load" if pre is not None else "store" if save_pre else ""
    if M == 0 or N == 0:
        return _rounded(c, a.dtype), _rounded(aux, a.dtype) if save_pre else None
    cfg, plan_source, splits, k_tiles_per_split, programs, meta = _launch_plan(
        M, N, K, a.dtype, tma, tf32, bias is not None, c.dtype != a.dtype, _program_slots(a.device), product,
        gpu_name(a.device), pinned, activation, aux_mode)  # fmt: skip
    bias_arg, aux_arg = bias if bias is not None else c, aux if aux is not None else c
    path_counts["config_" + (source or plan_source)] += 1
    # Split partials are fp32 whatever the operands; every element of every slab is written.
    out = torch.empty((splits, M, N), device=a.device, dtype=torch.float32) if splits > 1 else c
    path_counts["tma"] += tma is not None
    path_counts["split_k"] += splits > 1
    if tma is not None and not INTERPRETED:
        # Triton keeps its allocator in a context variable, which autograd's backward thread does not inherit.
        triton.set_allocator(_descriptor_scratch)
    strides = (*a.stride(), *b.stride(), N, 1,  # C and the partials are contiguous
               bias.stride(0) if bias is not None else 0,
               M * N if splits > 1 else 0)  # between two splits' partials (0 otherwise: no specialisation on M * N)
    tensors = (a, b, bias_arg, out, aux_arg)
    _launch(_matmul_kernel, (programs, 1, 1), (*tensors, M, N, K, *strides, splits, k_tiles_per_split, programs),
            meta, tensors, strides, max(M, N, K))  # fmt: skip
    if splits > 1:
        _launch_colsum(out.view(splits, M * N), c.view(M * N), SPLIT_SUM_CONFIG)
    return _rounded(c, a.dtype), _rounded(aux, a.dtype) if save_pre else None


# fp32 products are slow on an H100 where an operand is not in the layout its instructions read: TF32's wgmma reads
# both operands K-major (a transposed B costs 4x: bench/NOTES.md attempt 13); IEEE's FMA dot reads A K-major and B
# N-major (row-major [K, N]), and ran 19-58x slower otherwise (attempt 16). Copying an operand into that layout
# reads and writes it once, which pays where the product reuses each of its elements over at least this many rows
# or columns of the other operand: with TF32, decode-sized products, which read the weight about once, keep it as it
# is; in IEEE the slow layout costs more than the copy even at 16 tokens (1.7 against 32.6 ms, attempt 16).
FP32_COPY_MIN_REUSE = {"tf32": 256, "ieee": 1}


def _fp32_layout(a: torch.Tensor, b: torch.Tensor, tma: tuple[bool, bool, bool], tf32: bool):
    """(A, B) with each fp32 operand not in the layout the product reads copied into it where the copy pays
    (FP32_COPY_MIN_REUSE); counted in path_counts["fp32_copy"]."""
    M, N = a.shape[0], b.shape[1]
    reuse = FP32_COPY_MIN_REUSE["tf32" if tf32 else "ieee"]
    if tma[0] and N >= reuse:
        a = _aligned_copy(a, inner=1)
        path_counts["fp32_copy"] += 1
    if tma[1] != tf32 and M >= reuse:
        b = _aligned_copy(b, inner=0 if tf32 else 1)
        path_counts["fp32_copy"] += 1
    return a, b


# An operand no descriptor can address (rows not a multiple of 16 bytes long: odd widths; stride-0 or unaligned
# views) sends a product down the pointer path, whose loads of such rows cannot be vectorised: 0.27-1.04x of cuBLAS
# from 512 tokens up on the H100, and grad_input at 16-128 tokens 0.11-0.47x (bench/NOTES.md, attempt 23). Copying
# the operand into rows padded to 16 bytes reads and writes it once and puts the product on descriptors: 1.07-4.9x
# faster from 512 tokens up. Where the product's reduction is short (the weight gradient over a few tokens), the
# pointer path reads each element of the operands a few times only, and two more launches cost more than it saves.
ALIGN_COPY_MIN_K = 256


def _aligned_operands(a: torch.Tensor, b: torch.Tensor, tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with each operand that no descriptor can address copied into 16-byte aligned rows, where the product's
    reduction is at least ALIGN_COPY_MIN_K long; counted in path_counts["align_copy"]. A 16-bit operand keeps its
    major order; an fp32 one is copied straight into the order its product reads (_fp32_layout), not twice."""
    if a.shape[1] < ALIGN_COPY_MIN_K:
        return a, b
    fp32 = a.dtype == torch.float32
    a_inner, b_inner = (1, 0 if tf32 else 1) if fp32 else (_major(a), _major(b))
    fix = (not _addressable(a), not _addressable(b))
    a = _aligned_copy(a, a_inner) if fix[0] else a
    b = _aligned_copy(b, b_inner) if fix[1] else b
    path_counts["align_copy"] += sum(fix)
    return a, b


def _major(t: torch.Tensor) -> int:
    """The dim a copy of t keeps contiguous: 0 for a column-major matrix, else 1."""
    return 0 if t.stride(0) == 1 and t.stride(1) != 1 else 1


def _aligned_copy(t: torch.Tensor, inner: int) -> torch.Tensor:
    """t [R, C] copied with dim `inner` contiguous and the other stride padded to a multiple of 16 bytes: a view of
    the same shape and values, which a descriptor can address (torch's allocations are 512-byte aligned)."""
    if inner == 0:
        return _aligned_copy(t.t(), 1).t()
    rows, cols = t.shape
    step = 16 // t.element_size()
    return torch.empty(rows, -(-cols // step) * step, device=t.device, dtype=t.dtype)[:, :cols].copy_(t)


def autotune_timer(fn) -> float:
    """ms of fn() for run-time autotuning: do_bench's median on a GPU, the wall clock's under the interpreter."""
    if INTERPRETED:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def _autotuned(a: torch.Tensor, b: torch.Tensor, bias, product: str, tma, tf32: bool,
               aux_tile: bool) -> KernelConfig | None:  # fmt: skip
    """FUSED_TP_AUTOTUNE=1: the config this process chose for this launch's key, timing every candidate on these
    operands the first time. Inside a new layer call on a process group (configs.Tuning), every rank takes part in
    the consensus for every launch, cached or not and empty or not, so that the collectives pair up, and all
    ranks keep rank 0's choice. `aux_tile`: only candidates with room for the epilogue's pre-activation tile."""
    (M, K), N = a.shape, b.shape[1]
    key = (gpu_name(a.device), product, a.dtype, tf32, tma is not None, aux_tile, M, N, K)
    cfg, scope = configs.autotuned.get(key), configs.current_tuning()
    if cfg is None and M and N:
        cands = [c for c in configs.candidates(M, N, K, a.dtype, tma is not None)
                 if configs.fits(c, a.dtype.itemsize, tma is not None, aux_tile)]  # fmt: skip
        counts = path_counts.copy()  # the timing launches are not the caller's: they are not counted

        def timed(cand):
            with configs.pin_config(cand):
                return autotune_timer(lambda: _matmul(a, b, bias, product))  # epilogue-free: the same tiles

        rule = configs.rule_config(M, a.dtype, INTERPRETED, tma is not None)
        times = [[timed(cand)] for cand in cands]
        again = configs.contenders(cands, [t[0] for t in times], rule)
        for _ in range(configs.CONFIRM_ROUNDS):
            for i in again:
                times[i].append(timed(cands[i]))
        path_counts.clear()
        path_counts.update(counts)
        cfg = configs.choose(cands, [min(t) for t in times], rule)
    if scope is not None and scope.consensus is not None:
        chosen = scope.consensus(cfg)
        # rank 0's config, unless this rank's operands take the other path and its tiles do not fit there
        if chosen is not None and configs.fits(chosen, a.dtype.itemsize, tma is not None, aux_tile):
            cfg = chosen
    if cfg is not None:
        configs.autotuned[key] = cfg
    return cfg


@functools.lru_cache(maxsize=4096)
def _launch_plan(M: int, N: int, K: int, dtype: torch.dtype, tma: tuple[bool, bool, bool] | None, tf32: bool,
                 has_bias: bool, upcast: bool, slots: int, product: str, gpu: str, pinned, activation: str,
                 aux_mode: str) -> tuple:  # fmt: skip
    """(config, its source, splits, K-steps per split, programs, the launch's meta-parameters) of a launch; cached,
    so that the table lookup, the split rule's search and the keyword arguments are not paid in host time on every
    launch. `pinned`: the pinned or autotuned config."""
    cfg, source = pick_config(M, N, K, dtype, interpreted=INTERPRETED, tma=tma is not None, slots=slots,
                              product=product, gpu=gpu, pinned=pinned, tf32=tf32,
                              aux_tile=aux_mode == "load")  # fmt: skip
    k_tiles = _cdiv(K, cfg.BLOCK_K)
    k_tiles_per_split = _cdiv(k_tiles, 1 if activation else cfg.split_k)
    splits = _cdiv(k_tiles, k_tiles_per_split) if k_tiles else 1  # no split without K-steps of its own
    items = _cdiv(M, cfg.BLOCK_M) * _cdiv(N, cfg.BLOCK_N) * splits
    meta = _Meta(dict(HAS_BIAS=has_bias, UPCAST=upcast, INPUT_PRECISION="tf32" if tf32 else "ieee",
                      TMA=tma is not None, A_T=tma is not None and tma[0], B_T=tma is not None and tma[1],
                      TMA_C=tma is not None and tma[2],
                      SPLIT=splits > 1, ACTIVATION=activation, AUX=aux_mode, **cfg.meta()))  # fmt: skip
    return cfg, source, splits, k_tiles_per_split, min(items, slots) if cfg.persistent else items, meta


class _Meta:
    """A launch's meta-parameters: `kwargs` for kernel[grid](...), and for calling the compiled kernel directly a
    hashable `key` and `values(kernel)`, the constexpr values in the kernel's argument order."""

    def __init__(self, kwargs: dict):
        self.kwargs, self.key, self._values = kwargs, tuple(kwargs.items()), {}

    def values(self, kernel: JITFunction) -> tuple:
        v = self._values.get(id(kernel))  # kernels live as long as the module: ids are stable, and cheap to hash
        if v is None:
            v = self._values[id(kernel)] = tuple(self.kwargs[p.name] for p in kernel.params if p.is_constexpr)
        return v


# Triton's JITFunction.run binds and specialises every argument of a launch: 32-41 us of host time for the matmul
# kernel on the H100 host, against 11-13 us for calling the compiled kernel with the same arguments, and 16-31 us
# for all of F.linear (bench/NOTES.md, attempt 18). So the first launch of a specialisation goes through run, which
# compiles it and returns the compiled kernel, and later launches call that kernel directly. The key holds all that
# Triton specialises on, more finely: the device, the meta-parameters, each tensor's dtype and address mod 16, the
# value of each specialised integer (the strides), and whether a size needs 64 bits. So a hit is the kernel run
# would have chosen. Launch hooks (profilers) are passed on as run passes them, but for an empty hook chain (Triton
# keeps the hooks in chains that are never None), which is passed as None: the launcher then skips it, and the launch
# metadata only hooks read is not built (a profile of the direct path on the H100 host: bench/NOTES.md, attempt 24).
_compiled: dict = {}


def _hook(chain):
    """A launch hook as the launcher takes it: None for an empty chain (or none)."""
    return chain if chain is not None and getattr(chain, "calls", True) else None


def _launch(kernel, grid: tuple[int, int, int], args: tuple, meta: _Meta, tensors: tuple, strides: tuple,
            largest: int) -> None:  # fmt: skip
    """kernel[grid](*args, **meta.kwargs), directly through the compiled kernel after the first time; `tensors`
    and `strides` are the tensor and the specialised integer arguments among `args`, `largest` the largest of the
    others. path_counts["direct_launch"] counts the direct launches."""
    if INTERPRETED or not isinstance(kernel, JITFunction):
        kernel[grid](*args, **meta.kwargs)
        return
    device = torch._C._cuda_getDevice()  # torch.cuda.current_device() without its lazy-init check: CUDA is up here
    key = (id(kernel), meta.key, device, strides, largest > 0x7FFFFFFF,
           *[(t.dtype, t.data_ptr() & 15) for t in tensors])  # fmt: skip
    compiled = _compiled.get(key)
    if compiled is None:
        _compiled[key] = kernel[grid](*args, **meta.kwargs)
        return
    stream, values = triton.runtime.driver.active.get_current_stream(device), meta.values(kernel)
    enter, leave = _hook(knobs.runtime.launch_enter_hook), _hook(knobs.runtime.launch_exit_hook)
    hooked = enter is not None or leave is not None
    launch_metadata = compiled.launch_metadata(grid, stream, *args, *values) if hooked else None
    compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, launch_metadata, enter, leave, *args,
                 *values)  # fmt: skip
    path_counts["direct_launch"] += 1


def _colsum(g: torch.Tensor) -> torch.Tensor:
    """g [M, N] with any strides -> g.sum(0) [N], summed in fp32 and rounded once."""
    M, N = g.shape
    path = _path(g)
    path_counts[path] += 1
    if path == "torch":
        _warn_torch_path_once()
        return g.float().sum(0).to(g.dtype)
    out = _out((N,), g, path)
    _launch_colsum(g, out, COLSUM_CONFIG)
    return _rounded(out, g.dtype)


def _launch_colsum(g: torch.Tensor, out: torch.Tensor, cfg) -> None:
    """out[N] (contiguous) = g[M, N].sum(0), summed in fp32 in a fixed order.

    Few, long columns (a bias gradient over 32768 tokens of 3072 features is 48 column blocks) would leave most
    SMs idle, so the rows are cut into chunks whose fp32 sums a second pass of the same kernel adds up."""
    M, N = g.shape
    if N == 0:
        return
    col_blocks, chunks, rows_per_program, meta = _colsum_plan(M, N, _program_slots(g.device), cfg)
    partial = out if chunks == 1 else torch.empty((chunks, N), device=g.device, dtype=torch.float32)
    strides = g.stride()
    _launch(_colsum_kernel, (col_blocks, chunks, 1), (g, partial, M, N, *strides, rows_per_program), meta,
            (g, partial), strides, max(M, N, rows_per_program))  # fmt: skip
    if chunks > 1:
        _launch_colsum(partial, out, cfg)


@functools.lru_cache(maxsize=4096)
def _colsum_plan(M: int, N: int, slots: int, cfg) -> tuple[int, int, int, _Meta]:
    """(column blocks, row chunks, rows per program, meta-parameters) of a column sum; cached, like _launch_plan."""
    col_blocks = _cdiv(N, cfg.BLOCK_N)
    chunks = colsum_chunks(M, col_blocks, slots, cfg)
    rows_per_program = max(1, _cdiv(_cdiv(M, chunks), cfg.BLOCK_M)) * cfg.BLOCK_M
    return col_blocks, max(1, _cdiv(M, rows_per_program)), rows_per_program, _Meta(cfg.meta())


def _cdiv(a: int, b: int) -> int:
    # not triton.cdiv: in triton 3.9 that is a ConstexprFunction, whose call from Python costs microseconds a launch
    return -(-a // b)


@functools.cache
def _program_slots(device: torch.device) -> int:
    """How many programs a persistent launch starts: one per SM."""
    if INTERPRETED:
        return INTERPRETER_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def gpu_name(device: torch.device) -> str:
    """The name tuned tables are keyed by: the CUDA device's, or "triton-interpreter" under the interpreter."""
    return "triton-interpreter" if INTERPRETED else torch.cuda.get_device_name(device)


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """Tensor descriptors need sm_90 or newer."""
    return INTERPRETED or torch.cuda.get_device_capability(device)[0] >= 9


_scratch: dict = {}  # (device index, stream) -> the descriptor scratch of the launches on that stream
_reuse_scratch = True  # off while a registered operator runs (scratch_per_launch)


@contextlib.contextmanager
def scratch_per_launch():
    """Launches inside take a fresh descriptor scratch each, kept nowhere. For the registered operators (ops.py):
    torch.compile's CUDA graphs warm up with this thread's allocations routed to the graph's private pool, where
    a buffer kept past the graph counts as a leak; eager launches, which skip the operators, keep reusing theirs."""
    global _reuse_scratch
    before, _reuse_scratch = _reuse_scratch, False
    try:
        yield
    finally:
        _reuse_scratch = before


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the descriptors a kernel makes on the device: one buffer per (device, stream), reused.

    Launches on one stream run in order, so a kernel's descriptors are dead before the next one writes its own.
    Reuse saves an allocation per launch (host time) and keeps the scratch out of each step's peak memory. A
    stream being captured into a CUDA graph gets its own buffer from the graph's pool, not kept here, and so does
    a launch from a registered operator (scratch_per_launch)."""
    if not _reuse_scratch or torch.cuda.is_current_stream_capturing():
        return torch.empty(size, device="cuda", dtype=torch.int8)
    key = (torch._C._cuda_getDevice(), stream)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < size:  # torch's blocks are 512-byte aligned, past any `alignment` asked for
        buf = _scratch[key] = torch.empty(size, device="cuda", dtype=torch.int8)
    return buf


def _tma_layout(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                aux: torch.Tensor | None = None) -> tuple[bool, bool, bool] | None:  # fmt: skip
    """(A_T, B_T, TMA_C) where tensor descriptors can address A and B, else None (the kernel then uses pointers);
    TMA_C: C (and aux, laid out as C) can be stored through descriptors too, else through pointers.

    A descriptor needs a unit stride in one dim, the other stride a positive multiple of 16 bytes, and a
    16-byte aligned base: odd widths, stride-0 views and unaligned slices take the pointer path, unless
    _aligned_operands copies them.
    """
    if not _has_tma(a.device):
        return None
    aligned = (not a.data_ptr() % 16 and not b.data_ptr() % 16,
               not c.data_ptr() % 16 and (aux is None or not aux.data_ptr() % 16))  # fmt: skip
    return _tma_route(a.shape, a.stride(), b.shape, b.stride(), c.stride(), a.element_size(), c.element_size(),
                      aligned)  # fmt: skip


@functools.lru_cache(maxsize=4096)
def _tma_route(a_shape, a_strides, b_shape, b_strides, c_strides, itemsize: int, c_itemsize: int,
               aligned: tuple[bool, bool]) -> tuple[bool, bool, bool] | None:  # fmt: skip
    """_tma_layout's decision from the operands' sizes, strides and alignment (of A and B, of C and aux): cached,
    it is paid once per layout."""
    if not aligned[0] or 0 in (*a_shape, *b_shape):
        return None
    a_dim, b_dim = _descriptor_dim(a_strides, itemsize), _descriptor_dim(b_strides, itemsize)
    if a_dim is None or b_dim is None:
        return None
    return a_dim == 0, b_dim == 0, aligned[1] and _descriptor_dim(c_strides, c_itemsize) == 1


def _descriptor_dim(strides, itemsize: int) -> int | None:
    """The dim of a matrix's unit stride where a descriptor can address it (the other stride a positive multiple of
    16 bytes), else None."""
    for inner, outer in ((1, 0), (0, 1)):
        if strides[inner] == 1 and strides[outer] > 0 and strides[outer] * itemsize % 16 == 0:
            return inner
    return None


def _addressable(t: torch.Tensor) -> bool:
    """A descriptor can address t (a matrix with no empty dim)."""
    return not t.data_ptr() % 16 and _descriptor_dim(t.stride(), t.element_size()) is not None


def _warn_torch_path_once() -> None:
    global _warned_torch_path
    if not _warned_torch_path:
        _warned_torch_path = True
        warnings.warn(
            "fused_tp: CPU tensors run a torch path, not the Triton kernels; set TRITON_INTERPRET=1 before "
            "importing fused_tp to run the kernels through Triton's interpreter",
            stacklevel=3,
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., D] as a matrix [prod(...), D]; a view where strides allow (reshape copies only otherwise)."""
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def check_activation(activation, allow_none: bool = True) -> str:
    """The kernel's name for `activation` (None -> ""); ValueError naming the argument if it is not one of
    ACTIVATIONS, or None where `allow_none` (an MLP has an activation: ParallelMLP passes False)."""
    if activation is None and allow_none:
        return ""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        choices = ["None"] * allow_none + [repr(name) for name in ACTIVATIONS]
        expected = ", ".join(choices[:-1]) + " or " + choices[-1]
        raise ValueError(f"activation: expected {expected}, got {activation!r}")
    return activation


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           activation: str | None = None) -> torch.Tensor:  # fmt: skip
    """y = x @ weight.T + bias, the contract of F.linear; with activation="gelu" (or "gelu_tanh"),
    F.gelu(x @ weight.T + bias) (approximate="tanh"), computed on the fp32 accumulator before rounding.

    x [..., K], weight [N, K], bias [N] or None  ->  y [..., N] contiguous, in x's dtype.
    """
    check_linear_args(x, weight, bias)
    return linear_prechecked(x, weight, bias, check_activation(activation))[0]


def linear_prechecked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "",
                      save_pre: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(y, pre) of linear() for arguments that check_linear_args has passed (the layers check theirs before any
    collective); `activation` as check_activation returns it. With save_pre, pre [..., N] is the pre-activation
    x @ weight.T + bias (rounded), else None."""
    N, K = weight.shape
    y, pre = _matmul(_rows(x), weight.t(), bias, "fwd", activation, save_pre=save_pre)
    return y.view(*x.shape[:-1], N), None if pre is None else pre.view(*x.shape[:-1], N)


def grad_input(grad_y: torch.Tensor, weight: torch.Tensor, *, activation: str | None = None,
               pre: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """grad_x = grad_y @ weight.   grad_y [..., N], weight [N, K]  ->  grad_x [..., K].

    With `activation` and `pre` [..., K], the pre-activation of the layer whose activation made this one's input
    x = activation(pre): grad_pre = (grad_y @ weight) * activation'(pre), in the same launch.
    """
    N, K = weight.shape
    act = check_activation(activation)
    if (pre is None) != (act == ""):
        raise ValueError("pre: expected a tensor exactly when activation is given")
    if pre is not None and (pre.shape != (*grad_y.shape[:-1], K) or pre.dtype != grad_y.dtype):
        raise ValueError(f"pre: expected shape {(*grad_y.shape[:-1], K)} and dtype {grad_y.dtype}, got "
                         f"{tuple(pre.shape)} {pre.dtype}")  # fmt: skip
    pre2 = None if pre is None else _rows(pre).contiguous()
    grad_x, _ = _matmul(_rows(grad_y), weight, None, "dgrad", act, pre=pre2)
    return grad_x.view(*grad_y.shape[:-1], K)


def grad_params(
    grad_y: torch.Tensor, x: torch.Tensor, *, weight: bool = True, bias: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_w, grad_b) = (grad_y.T @ x, grad_y summed over rows): the matmul kernel and the column-sum kernel;
    either may be skipped (None).

    grad_y [..., N], x [..., K]  ->  grad_w [N, K], grad_b [N]
    """
    g2 = _rows(grad_y)
    grad_w = _matmul(g2.t(), _rows(x), None, "wgrad")[0] if weight else None
    grad_b = _colsum(g2) if bias else None
    return grad_w, grad_b
