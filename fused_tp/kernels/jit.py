"""The Triton kernels: one matmul kernel for the forward and both backward products of a linear layer, a
column-sum kernel for the bias gradient and the split-K partial sums, and a paired kernel that runs a small layer's
two backward products as one launch, the matmul kernel's code on each of its grid's two rows. Nothing but kernel
code: what to launch and how is plan.py's, the launch itself launch.py's.

    C[M, N] = A[M, K] @ B[K, N]  (+ bias[N] on the fp32 accumulator)  (then an optional activation epilogue)

A and B are read through their strides, so the three products of y = x @ w.T + b are one kernel:

    op            A                  B                C
    forward       x       [M, K]     w.T    [K, N]    y      [M, N]  + bias
    grad_input    grad_y  [M, N]     w      [N, K]    grad_x [M, K]
    grad_weight   grad_y.T[N, M]     x      [M, K]    grad_w [N, K]

The bias gradient, the column sums of grad_y, is the second kernel: a reduction over rows. Summing A's rows inside
the grad_weight pass costs a long K loop half its speed on an H100 (bench/NOTES.md, attempt 3); over a few tokens,
a K loop of a few steps, it should cost less than a launch of its own (attempt 68), so there (ROW_SUM) every program
sums the rows of its A tiles beside the product and the programs of the first column of tiles store them.

A config with BLOCK_M == 1 is the GEMV form, for one token: one row of A a program against a [BLOCK_K, BLOCK_N]
tile of B, the products on the CUDA cores in fp32 in B's tile layout, summed over K once after the loop; the
epilogue and split K as below.

The activation epilogue (epilogues.py) runs on the fp32 accumulator, before C is rounded: the forward applies it and
stores the pre-activation beside C; grad_input multiplies by its derivative at a stored pre-activation.

Split-K: where C has too few tiles to keep every SM busy (configs.choose_split_k says when), the K loop is split
over `splits` programs per tile. Each writes its fp32 partial sum to a workspace [splits, M, N] and counts its
arrival at the tile on an int32 counter; the program that arrives last adds the partials in split order and runs the
epilogue (bias, activation, the one rounding) as an unsplit tile would, then zeroes the counter for the next launch.
The atomic only counts: the sums and their order are the same whichever program arrives last, so the result is
deterministic, and no second launch adds the partials.

Descriptors made on the host (HOST_DESC): where tiles move through tensor descriptors, each program normally makes
them in its prologue, in global memory, fenced at GPU scope before its first load: a fixed cost on the critical
path of every program, which a decode product's few microseconds feel (bench/NOTES.md, attempts 47-52). With
HOST_DESC the launch passes descriptors Triton encodes on the host (triton.tools.tensor_descriptor) in the slots of
a_ptr, b_ptr and, with TMA_C, c_ptr and aux_ptr; the tiles, their order and the sums are the same, so the bits are
too. Encoding costs host time every launch, so launch.py takes it where the host's time is paid once: launches
captured into a CUDA graph.

Under Triton's interpreter (TRITON_INTERPRET=1 set before this module is imported) the same code runs on the CPU:
INTERPRETED says so.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


# Triton specialises an integer argument on being divisible by 16 (or equal to 1). M and the work counts are not
# specialised: masks and descriptors cover any size, and a new token count must not mean a new compile. Strides
# are: a unit stride makes loads coalesced. So are K and N, the dims an operand may be contiguous along: a mask
# against a size not known to be a multiple of 8 may split the pointer path's 16-byte vector loads, the way the
# GEMV form reads its weight (bench/NOTES.md, attempt 39); it costs a second compile for other sizes.
@triton.jit(do_not_specialize=["M", "num_programs", "splits", "k_tiles_per_split"])
def matmul_kernel(
    # pointers
    a_ptr,  # [M, K] A operand (HOST_DESC: its descriptor)
    b_ptr,  # [K, N] B operand (HOST_DESC: its descriptor)
    bias_ptr,  # [N]    added to the fp32 accumulator (read only when HAS_BIAS); ROW_SUM: [M], A's row sums, written
    c_ptr,  # [M, N] output (HOST_DESC and TMA_C: its descriptor)
    ws_ptr,  # [splits, M, N] fp32 partial sums (SPLIT only)
    aux_ptr,  # [M, N] with C's strides: the pre-activation, stored (AUX == "store") or read (AUX == "load")
    # (HOST_DESC, TMA_C and AUX: its descriptor)
    count_ptr,  # [tiles] int32 arrival counters (SPLIT only): zero before the launch, left zero after it
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
    stride_xm,  # between the pre-activation's rows: C's, or with GATED the product's width (fwd) or C's (grad)
    stride_bias,  # (ROW_SUM: between the row sums)
    stride_ws,  # between the partial sums of two splits (SPLIT only; each split's [M, N] is contiguous)
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
    HOST_DESC: tl.constexpr,  # TMA: the descriptors come made on the host, in the operands' slots (above)
    A_T: tl.constexpr,  # TMA: A is stored M-contiguous (stride_am == 1), so its tiles load as [BLOCK_K, BLOCK_M]
    B_T: tl.constexpr,  # TMA: B is stored K-contiguous (stride_bk == 1), so its tiles load as [BLOCK_N, BLOCK_K]
    SPLIT: tl.constexpr,  # the K loop is split `splits` ways; the last program at a tile adds the partials
    ACT: tl.constexpr,  # None, or an activation of epilogues.py: its fn (applied to C) or with AUX == "load" its grad
    AUX: tl.constexpr,  # "", "store" (also write the pre-activation) or "load" (C *= ACT(aux))
    GATED: tl.constexpr,  # ACT is gated (epilogues.py): C is half the product's width (fwd) or twice it (grad)
    ROW_SUM: tl.constexpr,  # also write A's row sums, in fp32 and rounded once, to bias_ptr (not with SPLIT or GEMV)
):
    # BLOCK_M == 1 is the GEMV form (decode): one row of A a program, its products on the CUDA cores, operands
    # through pointers (the plan never routes it through descriptors), A's row loaded as a vector.
    GEMV: tl.constexpr = BLOCK_M == 1
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    num_tiles = num_pid_m * num_pid_n
    c_desc = None  # C and the pre-activation through descriptors (TMA_C)
    aux_desc = None
    if TMA and HOST_DESC:
        a_desc = a_ptr
        b_desc = b_ptr
        if TMA_C:
            c_desc = c_ptr
            if AUX != "":
                aux_desc = aux_ptr
    elif TMA:
        # Descriptors address the operands in their stored order; out-of-bounds parts of a tile load as 0 and
        # are not stored, so no masks are needed. launch.host_descriptors makes the same ones on the host.
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
        elif TMA_C:
            c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [stride_cm, 1], [BLOCK_M, BLOCK_N])
    # flatten=True lets the compiler pipeline the next tile's first loads under this tile's epilogue. Not with
    # SPLIT: Triton 3.6 cannot flatten a loop whose body holds the partials' loop under a runtime branch
    # (TritonGPUFuseNestedLoops fails; bench/NOTES.md, attempt 34).
    for item in tl.range(tl.program_id(0), num_tiles * splits, num_programs, flatten=not (SPLIT or GEMV)):
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
        if not TMA:
            a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
            b_cols = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if ROW_SUM:
            row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if GEMV:
            acc_kn = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
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
                # B (the weight, in the forward) first: the GEMV form's A row goes through a layout conversion,
                # a barrier, that would otherwise hold back the weight's load; issued first, the weight streams
                # while A's row converts (bench/NOTES.md, attempt 41).
                b = tl.load(
                    b_cols + ks[:, None].to(tl.int64) * stride_bk, mask=(ks[:, None] < K) & mask_n[None, :], other=0.0
                )
                if GEMV:  # A's row as a column [BLOCK_K, 1]: a vector load, broadcast along B's tile as it lies
                    a_row = a_ptr + pid_m.to(tl.int64) * stride_am
                    a = tl.load(a_row + ks.to(tl.int64) * stride_ak, mask=ks < K, other=0.0)[:, None]
                else:
                    a = tl.load(
                        a_rows + ks[None, :].to(tl.int64) * stride_ak,
                        mask=mask_m[:, None] & (ks[None, :] < K),
                        other=0.0,
                    )
            if GEMV:
                # One row: every product of the tile on the CUDA cores, in fp32 and in the weight tile's own
                # layout (no conversion, no reduction in the loop); the K sum runs once, after the loop.
                acc_kn += b.to(tl.float32) * a.to(tl.float32)
            else:
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if ROW_SUM:  # in every program: a branch on pid_n inside the K loop stops the tile loop's flattening
                    row_sum += tl.sum(a.to(tl.float32), axis=1)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if GEMV:
            acc = tl.sum(acc_kn, axis=0)[None, :]
        if ROW_SUM:  # a masked store, not a branch, for the same reason; the K-steps summed in order: deterministic
            sums = bias_ptr + offs_m.to(tl.int64) * stride_bias
            first_column = (tl.zeros((BLOCK_M,), tl.int32) + pid_n) == 0  # (the interpreter refuses scalar masks)
            tl.store(sums, row_sum.to(bias_ptr.dtype.element_ty), mask=mask_m & first_column)

        last = True  # this program runs the tile's epilogue: every program without a split, else the last to arrive
        if SPLIT:
            # fp32 partials, stored in two column halves: the layout change before a store then needs half the
            # shared memory (a whole 128x256 fp32 tile beside 3 operand stages does not fit in 227 KiB).
            ws_rows = ws_ptr + offs_m[:, None].to(tl.int64) * N
            acc_lo, acc_hi = _column_halves(acc, BLOCK_M, BLOCK_N)
            offs_lo = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
            offs_hi = offs_lo + BLOCK_N // 2
            ws_split = ws_rows + split.to(tl.int64) * stride_ws
            tl.store(ws_split + offs_lo[None, :].to(tl.int64), acc_lo, mask=mask_m[:, None] & (offs_lo[None, :] < N))
            tl.store(ws_split + offs_hi[None, :].to(tl.int64), acc_hi, mask=mask_m[:, None] & (offs_hi[None, :] < N))
            # Every thread's partial is stored before the arrival is counted; the counter's acquire-release at GPU
            # scope then makes all splits' partials visible to the program that arrives last, which reads them
            # from L2 (.cg: another SM wrote them).
            tl.debug_barrier()
            counter = count_ptr + tile.to(tl.int64)
            last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == splits - 1
            if last:
                tile_ptrs = ws_rows + offs_n[None, :].to(tl.int64)
                mask_c = mask_m[:, None] & mask_n[None, :]
                acc = tl.load(tile_ptrs, mask=mask_c, other=0.0, cache_modifier=".cg")
                for s in range(1, splits):
                    acc += tl.load(
                        tile_ptrs + tl.cast(s, tl.int64) * stride_ws, mask=mask_c, other=0.0, cache_modifier=".cg"
                    )
                tl.store(counter, 0)
        if last:
            _epilogue(
                acc,
                bias_ptr,
                c_ptr,
                aux_ptr,
                c_desc,
                aux_desc,
                pid_m,
                pid_n,
                offs_m,
                offs_n,
                mask_m,
                mask_n,
                N,
                stride_cm,
                stride_cn,
                stride_xm,
                stride_bias,
                BLOCK_M,
                BLOCK_N,
                HAS_BIAS,
                TMA_C,
                ACT,
                AUX,
                GATED,
            )


@triton.jit
def _epilogue(
    acc,
    bias_ptr,
    c_ptr,
    aux_ptr,
    c_desc,
    aux_desc,
    pid_m,
    pid_n,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    N,
    stride_cm,
    stride_cn,
    stride_xm,
    stride_bias,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TMA_C: tl.constexpr,
    ACT: tl.constexpr,
    AUX: tl.constexpr,
    GATED: tl.constexpr,
):
    """A C tile's epilogue on its whole fp32 sum `acc`: the bias, the activation (or its derivative at the stored
    pre-activation), and the one rounding as C is stored."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n.to(tl.int64) * stride_bias, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    mask_c = mask_m[:, None] & mask_n[None, :]
    if GATED:
        # Through pointers only (the plan never sends a gated C through descriptors): C's tile is not the product's.
        if AUX == "load":
            # acc is the gradient of the activation's output; the (gate, up) pairs of its 2 * BLOCK_N
            # pre-activation columns load as one contiguous tile, and both gradients store interleaved the same way.
            offs_p = 2 * pid_n * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
            mask_p = mask_m[:, None] & (offs_p[None, :] < 2 * N)
            pairs = tl.load(_tile(aux_ptr, offs_m, offs_p, stride_xm, 1), mask=mask_p, other=0.0)
            gate, up = tl.split(tl.reshape(pairs.to(tl.float32), (BLOCK_M, BLOCK_N, 2)))
            d_gate, d_up = ACT(gate, up)
            # acc joined with itself meets the derivatives' pairs in one layout: as acc * d_gate and acc * d_up the
            # compiler moved four fp32 [BLOCK_M, BLOCK_N] tiles between layouts through shared memory, this way one
            # [BLOCK_M, 2 * BLOCK_N] (the same bits, and faster than autograd's unfused backward only this way:
            # bench/NOTES.md, attempt 51).
            grads = tl.reshape(tl.join(acc, acc), (BLOCK_M, 2 * BLOCK_N)) * tl.reshape(
                tl.join(d_gate, d_up), (BLOCK_M, 2 * BLOCK_N)
            )
            tl.store(_tile(c_ptr, offs_m, offs_p, stride_cm, stride_cn), grads.to(c_ptr.dtype.element_ty), mask=mask_p)
        else:
            if AUX == "store":
                tl.store(_tile(aux_ptr, offs_m, offs_n, stride_xm, 1), acc.to(aux_ptr.dtype.element_ty), mask=mask_c)
            gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
            offs_h = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            tl.store(
                _tile(c_ptr, offs_m, offs_h, stride_cm, stride_cn),
                ACT(gate, up).to(c_ptr.dtype.element_ty),
                mask=mask_m[:, None] & (offs_h[None, :] < N // 2),
            )
    elif TMA_C and AUX != "":
        # Through descriptors the activation epilogue works on two column halves, each staged in shared memory
        # on its own: whole tiles of C and the pre-activation needed two output tiles beside the operand stages
        # (278568 bytes for 128x256x64 in 3 stages, over the 232448 a program has); halves need one.
        acc_lo, acc_hi = _column_halves(acc, BLOCK_M, BLOCK_N)
        m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
        _activation_epilogue(acc_lo, c_desc, aux_desc, m0, n0, ACT, AUX)
        _activation_epilogue(acc_hi, c_desc, aux_desc, m0, n0 + BLOCK_N // 2, ACT, AUX)
    else:
        if AUX == "load":
            pre = tl.load(_tile(aux_ptr, offs_m, offs_n, stride_cm, stride_cn), mask=mask_c, other=0.0)
            acc *= ACT(pre.to(tl.float32))
        elif ACT is not None:
            if AUX == "store":
                tl.store(
                    _tile(aux_ptr, offs_m, offs_n, stride_cm, stride_cn), acc.to(aux_ptr.dtype.element_ty), mask=mask_c
                )
            acc = ACT(acc)
        if TMA_C:
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_desc.dtype))
        else:
            tl.store(_tile(c_ptr, offs_m, offs_n, stride_cm, stride_cn), acc.to(c_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _column_halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] as its left and right [BLOCK_M, BLOCK_N // 2] halves."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _activation_epilogue(acc, c_desc, aux_desc, m0, n0, ACT: tl.constexpr, AUX: tl.constexpr):
    """The activation epilogue of a C block at (m0, n0) through tensor descriptors: C *= activation'(pre), or the
    pre-activation stored and C = activation(C); ACT is the activation's grad or fn accordingly."""
    if AUX == "load":
        acc *= ACT(aux_desc.load([m0, n0]).to(tl.float32))
    else:
        aux_desc.store([m0, n0], acc.to(aux_desc.dtype))
        acc = ACT(acc)
    c_desc.store([m0, n0], acc.to(c_desc.dtype))


@triton.jit
def _tile(ptr, offs_m, offs_n, stride_m, stride_n):
    """The pointers of an [M, N] tile, in int64 (see the operands' pointers)."""
    return ptr + offs_m[:, None].to(tl.int64) * stride_m + offs_n[None, :].to(tl.int64) * stride_n


# The paired launch takes no split, no descriptors and no epilogue: plan.pair_plan sends it only small products
# through pointers, which one program per tile covers.
@triton.jit(do_not_specialize=["M0", "k_tiles0", "programs0", "M1", "K1", "k_tiles1", "programs1"])
def pair_kernel(
    a0,  # grad_y [M0, K0]            product 0, grad_input: c0 [M0, N0] = a0 @ b0
    b0,  # weight read as [K0, N0]
    c0,  # grad_x [M0, N0]
    a1,  # grad_y.T read as [M1, K1]  product 1, the weight gradient: c1 [M1, N1] = a1 @ b1
    b1,  # x [K1, N1]
    sums1,  # [M1] a1's row sums, the bias gradient (ROW_SUM)
    c1,  # grad_w [M1, N1]
    M0,
    N0,
    K0,
    stride_am0,
    stride_ak0,
    stride_bk0,
    stride_bn0,
    k_tiles0,
    programs0,
    M1,
    N1,
    K1,
    stride_am1,
    stride_ak1,
    stride_bk1,
    stride_bn1,
    k_tiles1,
    programs1,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ROW_SUM: tl.constexpr,
):
    """A layer's grad_input and weight gradient (with the bias gradient as A's row sums) in one launch, over a grid
    of (programs, 2): the second grid dim picks the product, whose programs each run matmul_kernel's tiles as a
    launch of it alone would; where one product has fewer programs than the grid's first dim, its extra programs
    find no tile. A small layer's backward then costs the host one launch, not two (bench/NOTES.md, attempt 112).
    C is contiguous in both (stride N)."""
    if tl.program_id(1) == 0:
        matmul_kernel(
            a0, b0, c0, c0, c0, c0, c0, M0, N0, K0, stride_am0, stride_ak0, stride_bk0, stride_bn0, N0, 1, N0, 0, 0,
            1, k_tiles0, programs0, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
            HAS_BIAS=False, UPCAST=UPCAST, INPUT_PRECISION=INPUT_PRECISION, TMA=False, TMA_C=False, HOST_DESC=False,
            A_T=False, B_T=False, SPLIT=False, ACT=None, AUX="", GATED=False, ROW_SUM=False,
        )  # fmt: skip
    else:
        matmul_kernel(
            a1, b1, sums1, c1, c1, c1, c1, M1, N1, K1, stride_am1, stride_ak1, stride_bk1, stride_bn1, N1, 1, N1, 1,
            0, 1, k_tiles1, programs1, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
            HAS_BIAS=False, UPCAST=UPCAST, INPUT_PRECISION=INPUT_PRECISION, TMA=False, TMA_C=False, HOST_DESC=False,
            A_T=False, B_T=False, SPLIT=False, ACT=None, AUX="", GATED=False, ROW_SUM=ROW_SUM,
        )  # fmt: skip


@triton.jit(do_not_specialize=["M", "N", "rows_per_program"])
def colsum_kernel(
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
        g = tl.load(
            cols + rows[:, None].to(tl.int64) * stride_gm, mask=(rows[:, None] < last) & mask_n[None, :], other=0.0
        )
        acc += g.to(tl.float32)
    out = out_ptr + tl.program_id(1).to(tl.int64) * N + offs_n.to(tl.int64)
    tl.store(out, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)


INTERPRETED = isinstance(matmul_kernel, InterpretedFunction)
