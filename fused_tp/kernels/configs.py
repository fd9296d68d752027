"""Launch configurations of the matmul kernel, in one place.

A config is a choice of tile sizes and launch options; it never changes which function the kernel computes,
only the order of its fp32 sums. The choice is a pure function of the problem (sizes, dtype, kernel path), so
every rank of a process group picks the same config for the same shape and replicated results stay bitwise
identical across ranks (run-time autotuning per process would not guarantee that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int

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


# The interpreter costs a few ms per program and K-step whatever the tile size, so one large tile keeps the
# CPU test suite fast; multi-config autotuning needs a GPU driver and is not used there.
INTERPRETER_CONFIG = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=1)

# Compiled configs for sm_90 and older. 16-bit operands: 128x128x64 tiles with 8 warps and 3 stages fill an
# H100 SM's shared memory about halfway (2 * 3 * 128 * 64 * 2 B = 96 KiB); narrow problems take 64-row tiles
# so more programs cover the SMs. fp32 operands are twice the bytes, so the K-step halves.
_CONFIGS_16BIT = {
    "large": KernelConfig(128, 128, 64, 8, num_warps=8, num_stages=3),
    "small_m": KernelConfig(64, 128, 64, 8, num_warps=4, num_stages=4),
}
_CONFIGS_32BIT = {
    "large": KernelConfig(128, 128, 32, 8, num_warps=8, num_stages=3),
    "small_m": KernelConfig(64, 128, 32, 8, num_warps=4, num_stages=4),
}


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, interpreted: bool) -> KernelConfig:
    """The config for a C[M, N] = A[M, K] @ B[K, N] launch with operands of `dtype`."""
    if interpreted:
        return INTERPRETER_CONFIG
    space = _CONFIGS_32BIT if dtype == torch.float32 else _CONFIGS_16BIT
    return space["small_m"] if M <= 64 else space["large"]
