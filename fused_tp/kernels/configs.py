"""Launch configurations of the matmul kernel, in one place.

A config is a choice of tile sizes and launch options; it never changes which function the kernel computes,
only the order of its fp32 sums. The choice is a pure function of the problem (sizes, dtype, layout, device
kind), so every rank of a process group picks the same config for the same shape and replicated results stay
bitwise identical across ranks (run-time autotuning per process would not guarantee that).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import dataclass

import torch


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

    def __post_init__(self):
        if self.split_k is not None and (not isinstance(self.split_k, int) or self.split_k < 1):
            raise ValueError(f"split_k: expected None or a positive integer, got {self.split_k!r}")

    def meta(self) -> dict:
        """The keyword arguments a kernel launch takes for this config."""
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, BLOCK_K=self.BLOCK_K, GROUP_M=self.GROUP_M,
                    num_warps=self.num_warps, num_stages=self.num_stages)  # fmt: skip


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


@dataclass(frozen=True)
class ColsumConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int

    def meta(self) -> dict:
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N, num_warps=self.num_warps)


# The bias gradient's column sums: 64 columns a program (224 programs for N = 14336 on 132 SMs), 64 rows a step.
COLSUM_CONFIG = ColsumConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4)
# The same kernel adds split-K partials [splits, M * N]: few rows, many columns, so wide blocks of few rows.
SPLIT_SUM_CONFIG = ColsumConfig(BLOCK_M=8, BLOCK_N=512, num_warps=4)


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


def choose_split_k(M: int, N: int, K: int, cfg: KernelConfig, slots: int, itemsize: int) -> int:
    """How many programs share each output tile's K loop, so that fewer tiles than `slots` SMs, each with a long
    K loop, still keep every SM busy (the weight gradient of a narrow layer over many tokens).

    A persistent grid of `slots` programs runs the (split, tile) items in waves. The model's time for s splits:
    waves(s) * (K-steps per split + TILE_OVERHEAD_STEPS) * step, plus writing and reading s fp32 partial sums of
    C through memory; a step is one BLOCK_M x BLOCK_N x BLOCK_K product on the tensor cores. The fewest splits
    within 2% of the best time win. Not split, as measured slower on the H100 (bench/NOTES.md, attempt 9):
    memory-bound products, fewer flops per byte of operands and result than the card's rate over its bandwidth
    (decode rows stream the weight, and fewer SMs already fill the memory bus), and outputs with at least `slots`
    tiles (a partial last wave cost less than the partials). A pure function of the problem, so every rank of a
    group splits alike.
    """
    if cfg.split_k is not None:
        return cfg.split_k
    tiles = math.ceil(M / cfg.BLOCK_M) * math.ceil(N / cfg.BLOCK_N)
    k_tiles = math.ceil(K / cfg.BLOCK_K)
    if not cfg.persistent or tiles == 0 or tiles >= slots or k_tiles < 2:
        return 1
    if 2 * M * N * K / ((M * K + K * N + M * N) * itemsize) < SM_FLOPS / SM_BYTES_PER_S:  # flops per byte
        return 1
    step = 2 * cfg.BLOCK_M * cfg.BLOCK_N * cfg.BLOCK_K / SM_FLOPS

    def cost(s: int) -> float:
        waves = math.ceil(tiles * s / slots)
        partials = 0.0 if s == 1 else 2 * s * M * N * 4 / MEM_BYTES_PER_S
        return waves * (math.ceil(k_tiles / s) + TILE_OVERHEAD_STEPS) * step + partials

    costs = {s: cost(s) for s in range(1, min(MAX_SPLIT_K, k_tiles // 2) + 1)}
    best = min(costs.values())
    return min(s for s, c in costs.items() if c <= 1.02 * best)


_pinned: contextvars.ContextVar[KernelConfig | None] = contextvars.ContextVar("fused_tp_pinned", default=None)


@contextlib.contextmanager
def pin_config(config: KernelConfig):
    """Run every launch inside the block with exactly `config` (for experiments and config sweeps)."""
    if not isinstance(config, KernelConfig):
        raise TypeError(f"config: expected a KernelConfig, got {type(config).__name__}")
    token = _pinned.set(config)
    try:
        yield config
    finally:
        _pinned.reset(token)


def pinned_config() -> KernelConfig | None:
    """The config `pin_config` set for the current context, if any."""
    return _pinned.get()


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, interpreted: bool, tma: bool, slots: int) -> KernelConfig:
    """The config for a C[M, N] = A[M, K] @ B[K, N] launch with operands of `dtype` on a persistent grid of up to
    `slots` programs; `tma` when the operands move through tensor descriptors. Its split_k is always set."""
    cfg = _pinned.get()
    if cfg is None and interpreted:
        cfg = INTERPRETER_CONFIG
    elif cfg is None:
        width = "32bit" if dtype == torch.float32 else "16bit"
        rows = "small_m" if M <= (128 if tma else 64) else "large"
        cfg = CONFIGS[(width, "tma" if tma else "pointers", rows)]
    return dataclasses.replace(cfg, split_k=choose_split_k(M, N, K, cfg, slots, dtype.itemsize))
