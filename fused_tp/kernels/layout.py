"""Operand layout: which operands tensor descriptors (TMA) can address, and which operands to copy into a layout the
product reads faster. Decisions are pure functions of shapes, strides, element sizes and 16-byte alignment (plan.py
caches them); `aligned_copy` carries a decision out.

A descriptor needs a unit stride in one dim, the other stride a positive multiple of 16 bytes, and a 16-byte aligned
base: odd widths, stride-0 or unaligned views take the pointer path, unless copied.
"""

from __future__ import annotations

import torch

# An operand no descriptor can address sends a product down the pointer path, whose loads of such rows cannot be
# vectorised (slow against cuBLAS from 512 tokens up on the H100, and grad_input at any token count). Copying the
# operand into rows padded to 16 bytes reads and writes it once and puts the product on descriptors, faster from
# 512 tokens up (bench/NOTES.md, attempt 23). Where the product's reduction is short (the
# weight gradient over a few tokens), the pointer path reads each element a few times only, and two more launches
# cost more than they save.
ALIGN_COPY_MIN_K = 256

# fp32 products are slow on an H100 where an operand is not in the layout its instructions read: TF32's wgmma reads
# both operands K-major (a transposed B costs 4x: bench/NOTES.md attempt 13); IEEE's FMA dot reads A K-major and B
# N-major (row-major [K, N]), and ran 19-58x slower otherwise (attempt 16). Copying an operand into that layout
# reads and writes it once, which pays where the product reuses each of its elements over at least this many rows
# or columns of the other operand: with TF32, decode-sized products, which read the weight about once, keep it as it
# is; in IEEE the slow layout costs more than the copy even at 16 tokens (attempt 16).
FP32_COPY_MIN_REUSE = {"tf32": 256, "ieee": 1}


def descriptor_dim(strides: tuple[int, int], itemsize: int) -> int | None:
    """The dim of a matrix's unit stride where a descriptor can address it (the other stride a positive multiple of
    16 bytes), else None."""
    for inner, outer in ((1, 0), (0, 1)):
        if strides[inner] == 1 and strides[outer] > 0 and strides[outer] * itemsize % 16 == 0:
            return inner
    return None


def tma_route(
    M: int, N: int, K: int, a_strides, b_strides, itemsize: int, c_itemsize: int, ab_aligned: bool, c_aligned: bool
) -> tuple[bool, bool, bool] | None:
    """(A_T, B_T, TMA_C) where descriptors can address A [M, K] and B [K, N], else None (pointers); A_T / B_T: the
    operand is stored M- / K-contiguous; TMA_C: C [M, N] (contiguous) and the pre-activation beside it can be
    stored through descriptors too. `ab_aligned`, `c_aligned`: the 16-byte alignment of A and B, of C and aux."""
    if not ab_aligned or 0 in (M, N, K):
        return None
    a_dim, b_dim = descriptor_dim(a_strides, itemsize), descriptor_dim(b_strides, itemsize)
    if a_dim is None or b_dim is None:
        return None
    return a_dim == 0, b_dim == 0, c_aligned and descriptor_dim((N, 1), c_itemsize) == 1


def align_copies(
    M: int, N: int, K: int, a_strides, b_strides, itemsize: int, fp32: bool, tf32: bool, aligned: tuple[bool, bool]
) -> tuple[int | None, int | None]:
    """(A's copy, B's copy) for a product no descriptor can address as it is (tma_route gave None), on a GPU with
    descriptors: each None or the dim the copy keeps contiguous (aligned_copy). The operands descriptors cannot
    address are copied where the reduction is at least ALIGN_COPY_MIN_K long: a 16-bit one keeping its major
    order, an fp32 one straight into the order its product reads (fp32_copies then has nothing left to do)."""
    if K < ALIGN_COPY_MIN_K or 0 in (M, N, K):
        return None, None
    a_inner, b_inner = (1, 0 if tf32 else 1) if fp32 else (major(a_strides), major(b_strides))
    fix_a = not aligned[0] or descriptor_dim(a_strides, itemsize) is None
    fix_b = not aligned[1] or descriptor_dim(b_strides, itemsize) is None
    return a_inner if fix_a else None, b_inner if fix_b else None


def fp32_copies(M: int, N: int, route: tuple[bool, bool, bool], tf32: bool) -> tuple[int | None, int | None]:
    """(A's copy, B's copy) for fp32 operands that descriptors address (`route`) in an order their product reads
    slowly, where the reuse pays (FP32_COPY_MIN_REUSE)."""
    reuse = FP32_COPY_MIN_REUSE["tf32" if tf32 else "ieee"]
    copy_a = 1 if route[0] and N >= reuse else None
    copy_b = (0 if tf32 else 1) if route[1] != tf32 and M >= reuse else None
    return copy_a, copy_b


def major(strides) -> int:
    """The dim a copy of a matrix keeps contiguous: 0 for a column-major one, else 1."""
    return 0 if strides[0] == 1 and strides[1] != 1 else 1


def copy_strides(rows: int, cols: int, inner: int, itemsize: int) -> tuple[int, int]:
    """The strides of aligned_copy(t [rows, cols], inner)."""
    step = 16 // itemsize
    if inner == 0:
        return 1, -(-rows // step) * step
    return -(-cols // step) * step, 1


def aligned_copy(t: torch.Tensor, inner: int) -> torch.Tensor:
    """t [R, C] copied with dim `inner` contiguous and the other stride padded to a multiple of 16 bytes: a view of
    the same shape and values, which a descriptor can address (torch's allocations are 512-byte aligned)."""
    if inner == 0:
        return aligned_copy(t.t(), 1).t()
    rows, cols = t.shape
    step = 16 // t.element_size()
    return torch.empty(rows, -(-cols // step) * step, device=t.device, dtype=t.dtype)[:, :cols].copy_(t)


def rows_stride(shape, strides) -> int | None:
    """The row stride of t [..., D] viewed as a matrix [prod(...), D] without a copy, else None (reshape copies)."""
    if len(shape) <= 1:
        return shape[0] if shape else 1  # one row: any stride; its width keeps row-major views row-major
    stride, span = None, 1
    for size, s in zip(reversed(shape[:-1]), reversed(strides[:-1])):
        if size == 1:
            continue
        if stride is None:
            stride = s
        elif s != stride * span:
            return None
        span *= size
    return shape[-1] if stride is None else stride
