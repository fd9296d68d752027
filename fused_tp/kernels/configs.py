"""Launch configurations of the matmul kernel: the config type, the space `tune` searches and its pruning rules,
the rule's configs, the split-K model, and the configs a user pins. tables.py holds the tuned tables, autotune.py
run-time autotuning, and plan.pick_config applies the precedence below.

A config is a choice of tile sizes and launch options; it never changes which function the kernel computes,
only the order of its fp32 sums. Every rank of a process group must pick the same config for the same shape, so
that replicated results stay bitwise identical across ranks: the choice is a pure function of the problem
(product, sizes, dtype, layout, GPU model), or, with run-time autotuning, rank 0's. In order of precedence:

    pinned   `with pin_config(cfg):` (process-wide), else FUSED_TP_CONFIG="BLOCK_M=128,BLOCK_N=256,..."
    autotuned  with FUSED_TP_AUTOTUNE=1: every candidate timed at the first launch of a shape in this process
             (autotune.py; inside a layer call on a process group, rank 0's choice is broadcast)
    table    a tuned table shipped in fused_tp/kernels/tuned/ for this GPU: the entry of the product, dtype and
             operand path whose shape bucket is nearest (tables.py; `python -m fused_tp tune` writes them)
    rule     CONFIGS below (and INTERPRETER_CONFIG under Triton's interpreter when no table names it)

`fused_tp.path_counts["config_<source>"]` counts the launches each source configured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch

# y = x @ w.T + b;  grad_x = grad_y @ w;  grad_w = grad_y.T @ x;  and grad_input through a gated activation's
# derivative (SwiGLU), whose epilogue reads two pre-activation tiles and writes both halves' gradients: the best
# tiles for it are not plain dgrad's (bench/NOTES.md, attempt 51), so its table entries are its own.
PRODUCTS = ("fwd", "dgrad", "wgrad", "dgrad_gated")
PIN_ENV = "FUSED_TP_CONFIG"
AUTOTUNE_ENV = "FUSED_TP_AUTOTUNE"
SHARED_MEMORY_BYTES = 232448  # what one program may use on sm_90 (227 KiB)


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 8
    num_stages: int = 3
    persistent: bool = True  # one program per SM walking the tiles, rather than one program per tile
    split_k: int | None = None  # programs sharing one output tile's K loop; None: `choose_split_k` decides
    # False: operands that tensor descriptors could address are read through pointers. Every program of a
    # descriptor launch builds its descriptors in its prologue and fences them at GPU scope before its first load,
    # a quarter of a small decode product's time (bench/NOTES.md, attempt 47); pointers spare that where the tile is
    # small.
    tma: bool = True
    # False: C (and a pre-activation) moves through pointers although descriptors could address it, so that a
    # program builds and fences one descriptor fewer, which a 64- or 128-token product feels (bench/NOTES.md,
    # attempt 50).
    tma_c: bool = True

    def __post_init__(self):
        # tl.dot's smallest tile is 16 a side; BLOCK_M 1 is the GEMV form (no tl.dot: jit.py), whose weight tile may
        # be as narrow as 4 columns (what matters there is a 16-byte load along K per thread).
        gemv = self.BLOCK_M == 1
        rules = {
            "BLOCK_M": (1 if gemv else 16, "1 (the GEMV form) or a power of two of at least 16"),
            "BLOCK_N": (4, "a power of two of at least 4 with BLOCK_M 1")
            if gemv
            else (16, "a power of two of at least 16"),
            "BLOCK_K": (16, "a power of two of at least 16"),
        }
        for name, (least, what) in rules.items():
            v = getattr(self, name)
            if not isinstance(v, int) or v < least or v & (v - 1):
                raise ValueError(f"{name}: expected {what} (tl.dot's smallest tile is 16), got {v!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps: expected 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        for name in ("GROUP_M", "num_stages"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.split_k is not None and (not isinstance(self.split_k, int) or self.split_k < 1):
            raise ValueError(f"split_k: expected None or a positive integer, got {self.split_k!r}")
        for name in ("persistent", "tma", "tma_c"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, fields: dict, where: str) -> KernelConfig:
        """A config from its fields (a tuned table's entry, FUSED_TP_CONFIG); ValueError naming `where` if bad."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{where}: unknown config field {unknown[0]!r} (known: {', '.join(sorted(known))})")
        try:
            return cls(**fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def descriptors(self) -> bool:
        """Whether the config reads operands through tensor descriptors where they allow it (the GEMV form never
        does: jit.py)."""
        return self.tma and self.BLOCK_M > 1

    def shared_memory(self, itemsize: int, tma: bool, aux_tile: int = 0) -> int:
        """Bytes of shared memory a program needs: num_stages A and B tiles, and room for what the epilogue stages:
        one output-sized tile for a descriptor store, or `aux_tile` of them for the pre-activation an epilogue
        reads (grad_input's activation derivative: 1, or 2 for a gated activation's (gate, up) pairs). The
        activation epilogue works on column halves so that C's half and the pre-activation's half share one tile's
        room (whole tiles of both needed 278568 bytes for 128x256x64 in 3 stages on the H100). A lower bound: the
        compiler may add layout-conversion scratch."""
        stages = self.num_stages * (self.BLOCK_M + self.BLOCK_N) * self.BLOCK_K * itemsize
        c_tile = tma and self.descriptors and self.tma_c
        return stages + max(int(c_tile), int(aux_tile)) * self.BLOCK_M * self.BLOCK_N * itemsize

    def meta(self) -> dict:
        """The keyword arguments a kernel launch takes for this config."""
        return dict(
            BLOCK_M=self.BLOCK_M,
            BLOCK_N=self.BLOCK_N,
            BLOCK_K=self.BLOCK_K,
            GROUP_M=self.GROUP_M,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )


# The interpreter costs a few ms per program and K-step whatever the tile size, so large tiles keep the CPU test
# suite fast. Its grid is 3 programs, so that programs walk several tiles as they do on a GPU; multi-config
# autotuning needs a GPU driver and is not used there.
INTERPRETER_CONFIG = KernelConfig(64, 64, 64, num_warps=4, num_stages=1)
INTERPRETER_PROGRAMS = 3

# Compiled configs for sm_90 (H100), from bench/sweep_configs.py (bench/NOTES.md has the table). 16-bit
# operands through tensor descriptors: 128x256 tiles on a persistent grid wherever there are many rows; 3 stages of
# 128x64 + 256x64 tiles are 144 KiB of the 227 KiB of shared memory, the epilogue tile 64 KiB more. Up to 128 rows
# (decode), 64-row tiles with a deeper K-step. The pointer path (operands no descriptor can address) does best
# with one program per tile. fp32 operands are twice the bytes per element, so tiles shrink.
CONFIGS = {
    ("16bit", "tma", "large"): KernelConfig(128, 256, 64, num_warps=8, num_stages=3),
    ("16bit", "tma", "small_m"): KernelConfig(64, 128, 128, num_warps=4, num_stages=4),
    ("16bit", "pointers", "large"): KernelConfig(128, 128, 64, num_warps=8, num_stages=4, persistent=False),
    ("16bit", "pointers", "small_m"): KernelConfig(64, 128, 64, num_warps=4, num_stages=5, persistent=False),
    ("32bit", "tma", "large"): KernelConfig(128, 128, 32, num_warps=8, num_stages=3),
    ("32bit", "tma", "small_m"): KernelConfig(64, 128, 32, num_warps=4, num_stages=4),
    ("32bit", "pointers", "large"): KernelConfig(128, 128, 32, num_warps=8, num_stages=3, persistent=False),
    ("32bit", "pointers", "small_m"): KernelConfig(64, 128, 32, num_warps=4, num_stages=4, persistent=False),
}


# The smallest tile config: it fits every operand width and path, for any shape (tune launches it to find which path
# a product's operands take).
ROUTE_PROBE = KernelConfig(64, 64, 64, num_warps=4, num_stages=3)

# The space `python -m fused_tp tune` searches for each product (the same for all three: the products differ in
# layout, which the tuning measures, not in what tiles are possible). 16-bit and 32-bit operands share it;
# `candidates` drops what does not fit in shared memory for the operand width. Every config of CONFIGS is in it,
# so the tuner always times the rule's choice too.
SPACE = (
    KernelConfig(128, 256, 64, num_warps=8, num_stages=3),
    KernelConfig(128, 256, 64, num_warps=8, num_stages=3, persistent=False),
    KernelConfig(256, 128, 64, num_warps=8, num_stages=3),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=4),
    KernelConfig(128, 128, 64, num_warps=4, num_stages=4),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=4, persistent=False),
    KernelConfig(128, 128, 128, num_warps=8, num_stages=3),
    KernelConfig(128, 128, 32, num_warps=8, num_stages=3),
    KernelConfig(64, 256, 64, num_warps=4, num_stages=4),
    KernelConfig(64, 128, 128, num_warps=4, num_stages=4),
    KernelConfig(64, 128, 64, num_warps=4, num_stages=5, persistent=False),
    KernelConfig(64, 128, 32, num_warps=4, num_stages=4),
    KernelConfig(64, 64, 128, num_warps=4, num_stages=4, persistent=False),
    ROUTE_PROBE,
    # Decode (a few rows): 16-row tiles (mma.sync rather than wgmma) leave room for more weight in flight; the
    # 32-wide one spreads a narrow shard over more programs (the best config in 5 of 16 probe cases: NOTES, attempt
    # 36). Each also through pointers, which spare a small tile the descriptors' prologue (attempt 47), and a
    # 32-row one for 32 tokens, which 16-row tiles read the weight twice for.
    KernelConfig(16, 64, 256, num_warps=4, num_stages=4),
    KernelConfig(16, 64, 128, num_warps=4, num_stages=6),
    KernelConfig(16, 32, 256, num_warps=4, num_stages=4),
    KernelConfig(16, 64, 256, num_warps=4, num_stages=4, tma=False),
    KernelConfig(16, 64, 128, num_warps=4, num_stages=6, tma=False),
    KernelConfig(16, 32, 256, num_warps=4, num_stages=4, tma=False),
    KernelConfig(32, 64, 256, num_warps=4, num_stages=4, tma=False),
    # The 64-row tiles of the H200's 64- and 128-token entries with C through pointers (attempt 50: the operands
    # through pointers lose there, wgmma wants them in shared memory; C's descriptor only costs its prologue).
    KernelConfig(64, 128, 128, num_warps=4, num_stages=4, tma_c=False),
    KernelConfig(64, 64, 128, num_warps=4, num_stages=4, persistent=False, tma_c=False),
    KernelConfig(64, 64, 64, num_warps=4, num_stages=3, tma_c=False),
    KernelConfig(128, 128, 32, num_warps=8, num_stages=3, persistent=False),
    KernelConfig(64, 128, 32, num_warps=4, num_stages=4, persistent=False),
    # Deep pipelines for 64-row tiles over 32-128 tokens (C through pointers, as the table's 64 x 64 decode entries
    # they deepen have it; pruning rule 3 keeps them to decode rows): these launches stream the weight, and how it is
    # staged sets their pace. On the H100 the 64x64x128 tile in 6 stages ran 128 x 14336 -> 4096 at 0.98x cuBLAS's
    # speed where 4 stages ran 0.88x, 3 stages of 64x64x256 (the same bytes in flight) 0.89x and 12 of 64x64x64
    # 0.73x; 64 x 32 tiles in 4-8 stages lift the narrow shards (4096 -> 1536 at 128 tokens 0.77 -> 0.97x;
    # bench/NOTES.md, attempt 104).
    KernelConfig(64, 64, 128, num_warps=4, num_stages=6, persistent=False, tma_c=False),
    KernelConfig(64, 64, 128, num_warps=4, num_stages=6, tma_c=False),
    KernelConfig(64, 32, 256, num_warps=4, num_stages=4, tma_c=False),
    KernelConfig(64, 32, 128, num_warps=4, num_stages=8, tma_c=False),
    # The same trade for 128-row tiles at any size: C's tile given back as a pipeline stage (128x256x64 in 4 stages,
    # 128x128x64 in 6; 196608 bytes each). On the H100 the 128 x 128 one ran 512 x 14336 -> 4096, a Row layer's
    # forward at 512 tokens with 64 of the 128 x 256 tile's programs for 132 SMs, at 0.94x cuBLAS's speed against
    # the table's 0.84x; the 128 x 256 one 512 x 4096 -> 14336 at 0.97x against 0.93x (bench/NOTES.md, attempt 106).
    KernelConfig(128, 256, 64, num_warps=8, num_stages=4, tma_c=False),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=6, tma_c=False),
    # The GEMV form (BLOCK_M 1, for GEMV_MAX_ROWS rows): 4-16 weight rows (output columns) a program, one program
    # per tile, so that every SM streams the weight; the loads alone keep it in flight (one stage beat three). The
    # fastest of a probe at 1 token over 13 shards (bench/NOTES.md, attempt 38b), and a split one for narrow shards
    # of long rows, which the probe did not try.
    KernelConfig(1, 4, 512, num_warps=4, num_stages=1, persistent=False),
    KernelConfig(1, 8, 512, num_warps=4, num_stages=1, persistent=False),
    KernelConfig(1, 16, 256, num_warps=4, num_stages=1, persistent=False),
    KernelConfig(1, 4, 1024, num_warps=4, num_stages=1, persistent=False),
    KernelConfig(1, 4, 512, num_warps=2, num_stages=1, persistent=False),
    KernelConfig(1, 4, 512, num_warps=4, num_stages=1, persistent=False, split_k=2),
)
# The GEMV form reads the weight tile once per row, the rows of one tile's programs back to back (GROUP_M), so that
# all but the first read it from L2; up to this many rows it is timed beside the tiles (bench/NOTES.md, attempt 42).
GEMV_MAX_ROWS = 8
DECODE_MAX_ROWS = 128


def fits(cfg: KernelConfig, itemsize: int, tma: bool, aux_tile: int = 0) -> bool:
    """Pruning rule 1: the program's tiles fit in shared memory."""
    return cfg.shared_memory(itemsize, tma, aux_tile) <= SHARED_MEMORY_BYTES


def with_room(cfg: KernelConfig, itemsize: int, tma: bool, aux_tile: int) -> KernelConfig:
    """`cfg`, or where its tiles leave no room for the epilogue's (a gated derivative loads two pre-activation
    tiles: 278528 bytes for the rule's 128x256x64 in 3 stages), its tile narrowed, then given back the stages that
    keep as many bytes in flight as it had (each stage of the narrower tile is smaller; the rule's 128x128x64 ran
    SwiGLU's grad_input faster in 4 stages than in 3 at every shape: bench/NOTES.md, attempt 51); stages are cut
    only where the narrowest tile still has no room."""
    in_flight = cfg.num_stages * (cfg.BLOCK_M + cfg.BLOCK_N) * cfg.BLOCK_K
    while not fits(cfg, itemsize, tma, aux_tile) and cfg.BLOCK_N > 64:
        cfg = dataclasses.replace(cfg, BLOCK_N=cfg.BLOCK_N // 2)
    deeper = dataclasses.replace(cfg, num_stages=cfg.num_stages + 1)
    while deeper.num_stages * (cfg.BLOCK_M + cfg.BLOCK_N) * cfg.BLOCK_K <= in_flight and fits(
        deeper, itemsize, tma, aux_tile
    ):
        cfg, deeper = deeper, dataclasses.replace(deeper, num_stages=deeper.num_stages + 1)
    while not fits(cfg, itemsize, tma, aux_tile) and cfg.num_stages > 2:
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    return cfg


def not_oversized(cfg: KernelConfig, M: int, N: int) -> bool:
    """Pruning rule 2: a tile no more than twice the next power of two of the output in either dim (a 256-row
    tile over 16 rows of decode computes 94% padding); 64 always passes."""
    return cfg.BLOCK_M <= max(64, 2 * bucket(M)) and cfg.BLOCK_N <= max(64, 2 * bucket(N))


def decode_only(cfg: KernelConfig, M: int) -> bool:
    """Pruning rule 3: the decode tiles, under wgmma's 64 rows or 64-row ones storing C through pointers, for up to
    DECODE_MAX_ROWS rows only (none had won past 128 rows in any tune, and at thousands of rows each costs a tune
    seconds; but on the H100 a neighbour's 64 x 32 x 256 tile storing C through pointers ran grad_input at 256-512
    tokens into 512-2048 features faster than any config this space keeps there, which tune now times as the config
    the table served: bench/NOTES.md, session 52); the GEMV form for up to GEMV_MAX_ROWS."""
    decode = cfg.BLOCK_M < 64 or (cfg.BLOCK_M == 64 and not cfg.tma_c)
    return not decode or M <= (GEMV_MAX_ROWS if cfg.BLOCK_M == 1 else DECODE_MAX_ROWS)


def candidates(M: int, N: int, K: int, dtype: torch.dtype, tma: bool) -> list[KernelConfig]:
    """The configs of SPACE worth timing for C[M, N] = A[M, K] @ B[K, N] with operands of `dtype`; `tma`: the
    operands allow descriptors (else a config's `tma` and `tma_c` change nothing, and only their True form is
    kept)."""
    return [
        c
        for c in SPACE
        if fits(c, dtype.itemsize, tma)
        and not_oversized(c, M, N)
        and decode_only(c, M)
        and (tma or (c.tma and c.tma_c))
    ]


def bucket(n: int) -> int:
    """A size's shape bucket: the next power of two (0 stays 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@dataclass(frozen=True)
class ColsumConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int

    def meta(self) -> dict:
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, num_warps=self.num_warps)


# The bias gradient's column sums: 64 columns a program (224 programs for N = 14336 on 132 SMs), 64 rows a step.
COLSUM_CONFIG = ColsumConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4)


# The weight gradient sums grad_y's columns (the bias gradient) inside its own launch where its K loop, the tokens, is
# at most ROW_SUM_MAX_K long and its output, the weight gradient, at most ROW_SUM_MAX_ELEMENTS: a second launch's host
# time saved (bench/NOTES.md, attempts 68 and 72). Over long K loops the sum halved the product's speed (attempt 3);
# over few tokens it slows a large weight gradient's launch (4096 x 4096 and up, attempt 72), where the product, not
# the host, bounds the call; up to 2048 x 2048 the one launch costs about what the two cost on the GPU and much less
# eager wall time.
ROW_SUM_MAX_K = 128
ROW_SUM_MAX_ELEMENTS = 2048 * 2048

# A small layer's grad_input and weight gradient as one launch (plan.pair_plan), over at most ROW_SUM_MAX_K tokens into
# a weight gradient of at most PAIR_MAX_ELEMENTS, both products with PAIR_CONFIG through pointers. On the H100
# (bench/NOTES.md, attempt 112; GPU time from CUDA graphs, bf16, 1-128 tokens) 64 x 64 x 64 tiles made the pair
# 0.32-0.93x the two launches' time up to 768 x 768 and 1.01-1.02x at 1024 x 512 and 1024 x 1024, where the rule's
# 128-row tiles made it 1.04-1.24x; at 2048 x 2048 1.4-1.7x. The launch it spares is about 20 us of host time a step.
PAIR_MAX_ELEMENTS = 768 * 768
PAIR_CONFIG = KernelConfig(64, 64, 64, num_warps=4, num_stages=4, persistent=False, split_k=1, tma=False)


def colsum_chunks(M: int, col_blocks: int, slots: int, cfg: ColsumConfig) -> int:
    """Row chunks of a column sum: enough programs for two per SM, no chunk under two row blocks."""
    return max(1, min(math.ceil(2 * slots / col_blocks), M // (2 * cfg.BLOCK_M)))


# Split-K cost model (see `choose_split_k`), in H100 units: an SM's share of the bf16 tensor-core rate and of the
# memory bandwidth (their ratio is the card's flops-per-byte balance), the whole card's bandwidth for the partial
# sums, and what starting and finishing a tile costs in K-steps (pipeline fill, epilogue).
SM_FLOPS = 730e12 / 132
MEM_BYTES_PER_S = 3.0e12
SM_BYTES_PER_S = MEM_BYTES_PER_S / 132
TILE_OVERHEAD_STEPS = 2
MAX_SPLIT_K = 16
MEMORY_BOUND_ITEMS = 0.6  # a memory-bound split aims at this share of the SMs (choose_split_k)
MIN_SPLIT_STEPS = 4  # the fewest K-steps a memory-bound split gives each program


def choose_split_k(M: int, N: int, K: int, cfg: KernelConfig, slots: int, itemsize: int) -> int:
    """How many programs share each output tile's K loop, so that an output of fewer tiles than `slots` SMs still
    keeps enough SMs busy. A pure function of the problem, so every rank of a group splits alike.

    Memory-bound products (fewer flops per byte of operands and result than the card's rate over its bandwidth:
    decode rows, which stream the weight) split so that about MEMORY_BOUND_ITEMS of the SMs each read one K-range
    of one tile: on the H200 a narrow shard's 20 tiles ran fastest in 4 splits (80 items), ahead of unsplit and of
    8 splits (more than one wave), and a shard of 112 tiles fastest unsplit (bench/NOTES.md, attempt 34). The
    split is added up inside the launch (jit.py), so it costs no second launch; under MIN_SPLIT_STEPS K-steps a
    split is not worth its partials.

    Compute-bound products split by a cost model: a persistent grid of `slots` programs runs the (split, tile)
    items in waves; the time for s splits is waves(s) * (K-steps per split + TILE_OVERHEAD_STEPS) * step, plus
    writing and reading s fp32 partial sums of C through memory, a step being one BLOCK_M x BLOCK_N x BLOCK_K
    product on the tensor cores. The fewest splits within 2% of the best time win. Outputs with at least `slots`
    tiles are not split (a partial last wave cost less than the partials on the H100: attempt 9).
    """
    if cfg.split_k is not None:
        return cfg.split_k
    tiles = math.ceil(M / cfg.BLOCK_M) * math.ceil(N / cfg.BLOCK_N)
    k_tiles = math.ceil(K / cfg.BLOCK_K)
    if not cfg.persistent or tiles == 0 or tiles >= slots or k_tiles < 2:
        return 1
    if 2 * M * N * K / ((M * K + K * N + M * N) * itemsize) < SM_FLOPS / SM_BYTES_PER_S:  # flops per byte
        most = max(1, min(MAX_SPLIT_K, k_tiles // MIN_SPLIT_STEPS))
        return min(range(1, most + 1), key=lambda s: abs(tiles * s - MEMORY_BOUND_ITEMS * slots))
    step = 2 * cfg.BLOCK_M * cfg.BLOCK_N * cfg.BLOCK_K / SM_FLOPS

    def cost(s: int) -> float:
        waves = math.ceil(tiles * s / slots)
        partials = 0.0 if s == 1 else 2 * s * M * N * 4 / MEM_BYTES_PER_S
        return waves * (math.ceil(k_tiles / s) + TILE_OVERHEAD_STEPS) * step + partials

    costs = {s: cost(s) for s in range(1, min(MAX_SPLIT_K, k_tiles // 2) + 1)}
    best = min(costs.values())
    return min(s for s, c in costs.items() if c <= 1.02 * best)


# A pinned config, for experiments and sweeps: process-wide module state rather than a context variable, so that a
# launch reads one global (context variables cost host time and do not reach autograd's backward thread).
_pinned: KernelConfig | None = None


@contextlib.contextmanager
def pin_config(config: KernelConfig):
    """Run every launch inside the block, in every thread of the process, with exactly `config` (for experiments
    and config sweeps)."""
    global _pinned
    if not isinstance(config, KernelConfig):
        raise TypeError(f"config: expected a KernelConfig, got {type(config).__name__}")
    before, _pinned = _pinned, config
    try:
        yield config
    finally:
        _pinned = before


@functools.lru_cache(maxsize=16)
def parse_config(text: str) -> KernelConfig:
    """FUSED_TP_CONFIG's value: "BLOCK_M=128,BLOCK_N=256,BLOCK_K=64,num_warps=8,num_stages=3", then optionally
    persistent, tma, tma_c as 0 or 1."""
    fields = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"{PIN_ENV}: expected NAME=INTEGER items separated by commas, got {part!r}")
        fields[name.strip()] = int(value)
    for flag in ("persistent", "tma", "tma_c"):
        if flag in fields:
            fields[flag] = bool(fields[flag])
    return KernelConfig.from_dict(fields, PIN_ENV)


_env_pin: str | None = None  # FUSED_TP_CONFIG's text (parsed at the first launch that reads it)
_env_autotune = False  # FUSED_TP_AUTOTUNE


def read_environment() -> None:
    """Read FUSED_TP_CONFIG and FUSED_TP_AUTOTUNE again. fused_tp reads them once, at import, so that a launch
    looks up no environment variables (host time is what a small launch costs most: bench/NOTES.md)."""
    global _env_pin, _env_autotune
    _env_pin = os.environ.get(PIN_ENV) or None
    _env_autotune = os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


def autotune_enabled() -> bool:
    return _env_autotune


def chosen_per_launch() -> bool:
    """Whether a launch's config may be other than its plan's alone: a pinned config or run-time autotuning."""
    return _pinned is not None or _env_pin is not None or _env_autotune


def pinned_config() -> KernelConfig | None:
    """The config pinned for the current context: pin_config's, else FUSED_TP_CONFIG's, else None."""
    cfg = _pinned
    if cfg is None and _env_pin is not None:
        cfg = parse_config(_env_pin)
    return cfg


def rule_config(M: int, dtype: torch.dtype, interpreted: bool, tma: bool, aux_tile: int = 0) -> KernelConfig:
    """The config where no pin and no table decides: INTERPRETER_CONFIG, or CONFIGS by width, path and rows, with
    room for the epilogue's `aux_tile` pre-activation tiles (with_room)."""
    if interpreted:
        return INTERPRETER_CONFIG
    width = "32bit" if dtype == torch.float32 else "16bit"
    rows = "small_m" if M <= (128 if tma else 64) else "large"
    return with_room(CONFIGS[(width, "tma" if tma else "pointers", rows)], dtype.itemsize, tma, aux_tile)


read_environment()
