"""Launch plans: everything a launch decides, as a pure function of what a trace can see (sizes, strides, dtypes,
16-byte alignment, the device and a few flags), cached, so that a launch's host work is one cache lookup, the
allocations and the launch itself.

    matmul_plan  which implementation runs (compiled Triton, the interpreter, the torch path), which operands are
                 copied into another layout first (layout.py), whether tiles move through tensor descriptors, the
                 config and where it came from (pick_config), the split-K factor, the grid, and the kernel's
                 integer and compile-time arguments
    colsum_plan  the same for a column sum (the bias gradient, where the weight gradient's launch does not write it)

Alignment is an input, not something a plan reads: eager code passes each operand's data_ptr() % 16, a registered
operator the same for the tensors it is called with (ops.py), so a compiled graph takes eager code's path for the
tensors it gets at run time.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch

from . import configs, jit, layout, tables
from .configs import SHARED_MEMORY_BYTES, KernelConfig, choose_split_k, colsum_chunks, fits
from .epilogues import ACTIVATIONS

PLAN_CACHE_SIZE = 4096  # plans kept (least recently used dropped): each holds its compiled kernel (launch.py)


class Device(NamedTuple):
    """Where a launch runs: `path` ("triton", "triton-interpreter" or "torch"), the name tuned tables key it by,
    how many programs a persistent grid starts (one per SM), and whether it has tensor descriptors (sm_90+)."""

    index: int
    path: str
    gpu: str
    slots: int
    has_tma: bool


@functools.cache
def device(index: int) -> Device:
    """The facts of the device of a tensor whose get_device() is `index` (-1: the CPU)."""
    if jit.INTERPRETED:
        return Device(index, "triton-interpreter", "triton-interpreter", configs.INTERPRETER_PROGRAMS, True)
    if index < 0:
        return Device(index, "torch", "cpu", 1, False)
    props = torch.cuda.get_device_properties(index)
    return Device(index, "triton", props.name, props.multi_processor_count, props.major >= 9)


class Launch:
    """One kernel launch: its grid, its integer arguments in the kernel's order, its compile-time arguments
    (`kwargs`), the index of the device its tensors are on (-1: the CPU), once launch.py has compiled it what
    its direct launches need (`direct`: kept here, as a plan lives in a bounded cache), and for a launch through
    tensor descriptors its twin taking them made on the host (`host`: jit.py's HOST_DESC; launch.py says where)."""

    __slots__ = ("grid", "ints", "kwargs", "device", "tma", "direct", "host")

    def __init__(self, grid: tuple[int, int, int], ints: tuple, kwargs: dict, device: int):
        self.grid, self.ints, self.kwargs, self.device, self.direct = grid, ints, kwargs, device, None
        self.tma = bool(kwargs.get("TMA"))  # its kernel makes tensor descriptors, which need global scratch
        self.host = None


class MatmulPlan(NamedTuple):
    """C[M, N] = A[M, K] @ B[K, N]: see matmul_plan. `copy_a` / `copy_b`: None, or the dim an aligned copy keeps
    contiguous (layout.aligned_copy); `counts`: the path_counts keys a run adds; `wide`: C is written in fp32 and
    rounded once after (the interpreter); `tiles`: C's tiles, whose arrival counters a split launch needs;
    `row_sum`: the launch also writes A's row sums [M] (jit.py's ROW_SUM), in the bias's slot;
    `launch` is None where nothing is launched (an empty C, the torch path)."""

    path: str
    copy_a: int | None
    copy_b: int | None
    wide: bool
    splits: int
    tiles: int
    counts: tuple[str, ...]
    launch: Launch | None
    row_sum: bool = False


class ColsumPlan(NamedTuple):
    """out[N] = g[M, N].sum(0) in fp32, in a fixed order: one launch, or with row chunks a second plan summing the
    chunks' partial sums [chunks, N]."""

    N: int
    chunks: int
    launch: Launch
    then: ColsumPlan | None


def pick_config(
    M: int,
    N: int,
    K: int,
    dtype: torch.dtype,
    interpreted: bool,
    tma: bool,
    slots: int,
    product: str = "fwd",
    gpu: str = "",
    pinned: KernelConfig | None = None,
    tf32: bool = False,
    aux_tile: int = 0,
) -> tuple[KernelConfig, str]:
    """(config, source) for a C[M, N] = A[M, K] @ B[K, N] launch of `product` with operands of `dtype` on a
    persistent grid of up to `slots` programs of `gpu`; `tma` when the operands move through tensor descriptors,
    `tf32` when fp32 dot products may use TF32, `aux_tile`: the pre-activation tiles the epilogue reads (aux_tiles).
    `pinned` (pinned_config(), or an autotuned config) wins over the table and the rule. Its split_k is always
    set. source: "pinned", "table" or "rule". A table's config without room for the pre-activation tiles gives way
    to the rule's, narrowed where it has no room either (configs.rule_config; tests/test_tune.py). A pinned config
    whose tiles do not fit in shared memory raises ValueError before the launch."""
    cfg, source = pinned, "pinned"
    if cfg is not None and not fits(cfg, dtype.itemsize, tma, aux_tile):
        raise ValueError(
            f"pinned config {cfg}: needs {cfg.shared_memory(dtype.itemsize, tma, aux_tile)} bytes of shared memory "
            f"for {tables.DTYPE_NAMES[dtype]} operands{' through tensor descriptors' if tma else ''}"
            f"{' and ' + str(int(aux_tile)) + ' pre-activation tile(s)' if aux_tile else ''}; a program has "
            f"{SHARED_MEMORY_BYTES}"
        )
    if cfg is None:
        cfg, source = tables.table_config(gpu, product, M, N, K, dtype, tma, tf32), "table"
    if cfg is None or not fits(cfg, dtype.itemsize, tma, aux_tile):
        cfg, source = (
            configs.rule_config(M, dtype, interpreted, tma, aux_tile),
            "rule",
        )
    return dataclasses.replace(cfg, split_k=choose_split_k(M, N, K, cfg, slots, dtype.itemsize)), source


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def matmul_plan(
    product: str,
    M: int,
    N: int,
    K: int,
    a_strides: tuple[int, int],
    b_strides: tuple[int, int],
    dtype: torch.dtype,
    aligned: tuple[bool, bool, bool, bool],
    bias_stride: int | None,
    activation: str,
    aux: str,
    device_index: int,
    tf32: bool,
    pinned: tuple[KernelConfig, str] | None,
    row_sum: bool = False,
) -> MatmulPlan:
    """The plan of C[M, N] = A[M, K] @ B[K, N] (+ bias) with the activation epilogue, for `product` (configs.PRODUCTS).

    aligned: the 16-byte alignment of A, B, the bias and a given pre-activation (aux == "load"); bias_stride: None
    without a bias; aux: "" (C only), "store" (C = act(P) and P stored) or "load" (C = P * act'(pre)); tf32: fp32
    dot products may use TF32 (F.linear's setting); pinned: (config, "pinned" or "autotuned") over table and rule;
    row_sum: A's row sums are wanted too (the weight gradient's A is grad_y.T: the bias gradient), which the plan
    has the launch write where its K loop is short (configs.ROW_SUM_MAX_K), C small (ROW_SUM_MAX_ELEMENTS) and
    the launch unsplit (the MatmulPlan says).
    A plan is built once per distinct set of these and reused: launches then pay a cache lookup."""
    dev = device(device_index)
    if dev.path == "torch":
        return MatmulPlan("torch", None, None, False, 1, 0, ("torch",), None)
    fp32 = dtype == torch.float32
    wide = dev.path == "triton-interpreter" and not fp32  # see matmul._out: the interpreter's 16-bit arithmetic
    # C's rows, and a stored pre-activation's, are fp32 where wide; a given one (aux == "load") is the caller's,
    # in the operands' dtype, and moves through a descriptor with C's strides: its rows must be aligned too.
    itemsize = dtype.itemsize
    c_itemsize = itemsize if aux == "load" or not wide else 4
    counts = [dev.path]
    # C and a stored pre-activation are fresh allocations (aligned); a given pre-activation may not be.
    c_aligned = aligned[3] or aux != "load"
    route = (
        layout.tma_route(M, N, K, a_strides, b_strides, itemsize, c_itemsize, aligned[0] and aligned[1], c_aligned)
        if dev.has_tma
        else None
    )
    copy_a = copy_b = None
    given = a_strides, b_strides
    for why in ("align_copy", "fp32_copy") if dev.has_tma and M and N else ():
        if why == "align_copy" and route is None:
            copies = layout.align_copies(M, N, K, a_strides, b_strides, itemsize, fp32, tf32, aligned[:2])
        elif why == "fp32_copy" and route is not None and fp32:
            copies = layout.fp32_copies(M, N, route, tf32)
            copies = (None if copy_a is not None else copies[0], None if copy_b is not None else copies[1])
        else:
            continue
        if copies[0] is not None:
            copy_a, a_strides = copies[0], layout.copy_strides(M, K, copies[0], itemsize)
        if copies[1] is not None:
            copy_b, b_strides = copies[1], layout.copy_strides(K, N, copies[1], itemsize)
        if copies != (None, None):
            counts += [why] * ((copies[0] is not None) + (copies[1] is not None))
            ab_aligned = (copy_a is not None or aligned[0]) and (copy_b is not None or aligned[1])
            route = layout.tma_route(M, N, K, a_strides, b_strides, itemsize, c_itemsize, ab_aligned, c_aligned)
    if M == 0 or N == 0:  # nothing to compute: an empty C (and pre-activation)
        return MatmulPlan(dev.path, None, None, wide, 1, 0, tuple(counts), None)
    cfg, source = pick_config(
        M,
        N,
        K,
        dtype,
        jit.INTERPRETED,
        route is not None,
        dev.slots,
        product,
        dev.gpu,
        pinned[0] if pinned else None,
        tf32,
        aux_tile=aux_tiles(activation, aux),
    )
    counts.append("config_" + (pinned[1] if pinned else source))
    if not cfg.descriptors:
        # The GEMV form and a config with tma=False read the operands through pointers as they are: no
        # descriptors, so no copies for them (a copy of the weight would cost a decode product twice its time).
        (a_strides, b_strides), route, copy_a, copy_b = given, None, None, None
        counts = [dev.path, counts[-1]]
    k_tiles = _cdiv(K, cfg.BLOCK_K)
    k_tiles_per_split = _cdiv(k_tiles, cfg.split_k)
    splits = _cdiv(k_tiles, k_tiles_per_split) if k_tiles else 1  # no split without K-steps of its own
    tiles = _cdiv(M, cfg.BLOCK_M) * _cdiv(N, cfg.BLOCK_N)
    items = tiles * splits
    programs = min(items, dev.slots) if cfg.persistent else items
    counts += ["tma"] * (route is not None) + ["split_k"] * (splits > 1)
    row_sum = row_sum and bias_stride is None and splits == 1 and cfg.BLOCK_M > 1
    row_sum = row_sum and K <= configs.ROW_SUM_MAX_K and M * N <= configs.ROW_SUM_MAX_ELEMENTS
    counts += ["row_sum"] * row_sum
    act, gated = None, bool(activation) and ACTIVATIONS[activation].gated
    if activation:
        act = ACTIVATIONS[activation].grad if aux == "load" else ACTIVATIONS[activation].fn
    kwargs = dict(
        HAS_BIAS=bias_stride is not None,
        UPCAST=wide,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
        TMA=route is not None,
        A_T=route is not None and route[0],
        B_T=route is not None and route[1],
        TMA_C=route is not None and route[2] and cfg.tma_c and not gated,
        HOST_DESC=False,
        SPLIT=splits > 1,
        ACT=act,
        AUX=aux,
        GATED=gated,
        ROW_SUM=row_sum,
        **cfg.meta(),
    )
    # C, the pre-activation and the split partials are contiguous; a gated C is half the product's width (the
    # forward, its pre-activation the product's) or twice it (grad_input, its pre-activation C's). The partials'
    # slab stride is 0 without splits (no specialisation on M * N).
    c_width = (N // 2 if aux != "load" else 2 * N) if gated else N
    pre_width = N if gated and aux != "load" else c_width
    ints = (
        M,
        N,
        K,
        *a_strides,
        *b_strides,
        c_width,
        1,
        pre_width,
        1 if row_sum else bias_stride or 0,
        M * N if splits > 1 else 0,
        splits,
        k_tiles_per_split,
        programs,
    )
    spec = Launch((programs, 1, 1), ints, kwargs, device_index)
    if spec.tma and K:  # a descriptor made on the host has no empty dims
        spec.host = Launch(spec.grid, ints, {**kwargs, "HOST_DESC": True}, device_index)
    return MatmulPlan(dev.path, copy_a, copy_b, wide, splits, tiles, tuple(counts), spec, row_sum)


class PairPlan(NamedTuple):
    """grad_input and the weight gradient (its row sums, the bias gradient, where `row_sum`) in one launch of
    jit.pair_kernel: see pair_plan. `counts`: the path_counts keys a run adds (each product's, and "pair")."""

    launch: Launch
    wide: bool
    row_sum: bool
    counts: tuple[str, ...]


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def pair_plan(
    tokens: int,
    N: int,
    K: int,
    g_strides: tuple[int, int],
    w_strides: tuple[int, int],
    x_strides: tuple[int, int],
    dtype: torch.dtype,
    aligned: tuple[bool, bool, bool],
    device_index: int,
    tf32: bool,
    row_sum: bool,
) -> PairPlan | None:
    """The one launch of a layer's grad_input (grad_x [tokens, K] = grad_y [tokens, N] @ w [N, K]) and weight
    gradient (grad_w [N, K] = grad_y.T @ x [tokens, K]; with `row_sum` also grad_y's column sums), or None where
    the two launch apart. Paired over at most configs.ROW_SUM_MAX_K tokens into a weight gradient of at most
    configs.PAIR_MAX_ELEMENTS: there a launch costs the host more than either product costs the GPU, and the pair
    spares one. Both products take configs.PAIR_CONFIG (the interpreter's where interpreted), through pointers,
    unsplit (the paired kernel has one config and no descriptors; tables key single products), each planned as
    matmul_plan plans it alone with that config pinned. aligned: grad_y's, w's and x's 16-byte
    alignment (the kernel is specialised on it)."""
    dev = device(device_index)
    if dev.path == "torch" or not tokens or not N or not K:
        return None
    if tokens > configs.ROW_SUM_MAX_K or N * K > configs.PAIR_MAX_ELEMENTS:
        return None
    cfg = configs.INTERPRETER_CONFIG if jit.INTERPRETED else configs.PAIR_CONFIG
    pinned = (dataclasses.replace(cfg, tma=False, split_k=1), "pair")
    rest = (None, "", "", device_index, tf32, pinned)  # no bias, no epilogue
    g, w, x = aligned
    dgrad = matmul_plan("dgrad", tokens, K, N, g_strides, w_strides, dtype, (g, w, True, True), *rest)
    wgrad = matmul_plan("wgrad", N, K, tokens, g_strides[::-1], x_strides, dtype, (g, x, True, True), *rest, row_sum)
    ints = []
    for p in (dgrad, wgrad):
        # (M, N, K, A's and B's strides) and the K-steps and programs of matmul_plan's integer arguments
        ints += [*p.launch.ints[:7], *p.launch.ints[-2:]]
    meta = {k: dgrad.launch.kwargs[k] for k in ("UPCAST", "INPUT_PRECISION", *pinned[0].meta())}
    spec = Launch((max(ints[8], ints[17]), 2, 1), tuple(ints), {**meta, "ROW_SUM": wgrad.row_sum}, device_index)
    return PairPlan(spec, dgrad.wide, wgrad.row_sum, (*dgrad.counts, *wgrad.counts, "pair"))


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def colsum_plan(
    M: int,
    N: int,
    device_index: int,
    cfg: configs.ColsumConfig,
    g_dtype: torch.dtype,
    out_dtype: torch.dtype,
    g_strides: tuple[int, int] | None = None,
    g_aligned: bool = True,
) -> ColsumPlan:
    """The plan of out[N] = g[M, N].sum(0) (g's strides: row-major contiguous unless given; N > 0). The dtypes and
    g's 16-byte alignment are part of the key because the compiled kernel kept on the plan is specialised on them.

    Few, long columns (a bias gradient over 32768 tokens of 3072 features is 48 column blocks) would leave most SMs
    idle, so the rows are cut into chunks whose fp32 sums a second pass of the same kernel adds up."""
    col_blocks = _cdiv(N, cfg.BLOCK_N)
    chunks = colsum_chunks(M, col_blocks, device(device_index).slots, cfg)
    rows_per_program = max(1, _cdiv(_cdiv(M, chunks), cfg.BLOCK_M)) * cfg.BLOCK_M
    chunks = max(1, _cdiv(M, rows_per_program))
    strides = g_strides or (N, 1)
    launch = Launch((col_blocks, chunks, 1), (M, N, *strides, rows_per_program), cfg.meta(), device_index)
    then = colsum_plan(chunks, N, device_index, cfg, torch.float32, out_dtype) if chunks > 1 else None
    return ColsumPlan(N, chunks, launch, then)


def aux_tiles(activation: str, aux: str) -> int:
    """Output-sized pre-activation tiles the epilogue of a launch reads: grad_input's derivative reads one, a gated
    activation's (gate, up) pairs two; other launches none."""
    return 0 if aux != "load" else 2 if ACTIVATIONS[activation].gated else 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Launches' plans by the raw facts of their tensors (matmul.py's *_prechecked: sizes, strides, dtype, device, 16-byte
# alignment, flags), each with the arguments matmul_plan was derived from: a launch found here skips deriving them,
# the larger part of its host time before the launch (bench/NOTES.md, attempt 57). A key holds every fact a plan
# reads (tests/test_kernels.py::test_a_launch_found_by_its_tensors_facts_runs_the_plan_derived_for_them changes
# each one); pinned and autotuned configs, chosen per launch, are kept out. Emptied when full.
calls: dict = {}


def clear_caches() -> None:
    """Forget every plan and device fact (tests that change a rule or the interpreter switch call it)."""
    for cached in (device, matmul_plan, pair_plan, colsum_plan):
        cached.cache_clear()
    calls.clear()
