"""Hypothesis strategies and tensor builders shared by the tests."""

import torch
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Sizes around the interpreter's 64-wide tiles: 0, 1, small primes, primes that straddle tile edges, and multiples
# of 8 and 16, which make rows 16-byte aligned so that the tensor-descriptor (TMA) path runs too.
dims = st.one_of(
    st.sampled_from([0, 1, 2, 3, 5, 7, 13, 31, 61, 67, 127, 131]),
    st.sampled_from([8, 16, 24, 64, 72, 128, 136]),
    st.integers(0, 150),
)
dtypes = st.sampled_from(DTYPES)
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
layouts = st.sampled_from(LAYOUTS)
seeds = st.integers(0, 2**31 - 1)


def make_tensor(shape, layout, dtype, device, gen) -> torch.Tensor:
    """A tensor of `shape` with the given memory layout (the values depend on the layout; read them back).

    contiguous  row-major
    transposed  column-major: the last two dims swapped in storage (stride(-1) != 1)
    sliced      a window of a wider buffer (row stride larger than the row)
    expanded    the first dim broadcast from size 1 (stride 0)
    """
    shape = tuple(shape)
    values = lambda s: torch.randn(s, generator=gen, dtype=torch.float32).to(dtype).to(device)  # noqa: E731
    if layout == "contiguous" or len(shape) == 0:
        return values(shape)
    if layout == "transposed" and len(shape) >= 2:
        return values(shape[:-2] + shape[:-3:-1]).transpose(-1, -2)
    if layout == "sliced":
        return values(shape[:-1] + (shape[-1] + 3,))[..., 1 : 1 + shape[-1]]
    if layout == "expanded":
        return values((1,) + shape[1:]).expand(shape)
    return values(shape)
