"""Launch configurations of the matmul kernel, in one place.

A config is a choice of tile sizes and launch options; it never changes which function the kernel computes,
only the order of its fp32 sums. The choice is a pure function of the problem (sizes, dtype, layout, device
kind), so every rank of a process group picks the same config for the same shape and replicated results stay
bitwise identical across ranks (run-time autotuning per process would not guarantee that).
"""

from __future__ import annotations

import contextlib
import contextvars
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


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, interpreted: bool, tma: bool) -> KernelConfig:
    """The config for a C[M, N] = A[M, K] @ B[K, N] launch with operands of `dtype`; `tma` when the operands
    move through tensor descriptors."""
    pinned = _pinned.get()
    if pinned is not None:
        return pinned
    if interpreted:
        return INTERPRETER_CONFIG
    width = "32bit" if dtype == torch.float32 else "16bit"
    rows = "small_m" if M <= (128 if tma else 64) else "large"
    return CONFIGS[(width, "tma" if tma else "pointers", rows)]
