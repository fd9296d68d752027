"""The tolerance table accepts the kernel's result and rejects planted errors of the kinds kernels make."""

import pytest
import torch
from strategies import DTYPES, make_tensor

from fused_tp import kernels
from fused_tp.tolerance import assert_close, linear_reference, tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_table_catches_planted_errors(device, dtype):
    gen = torch.Generator().manual_seed(0)
    M, K, N = 33, 64, 17
    x, w, b = (make_tensor(s, "contiguous", dtype, device, gen) for s in ((M, K), (N, K), (N,)))
    ref, mag = linear_reference(x, w, b)
    limit = tol(dtype, K)

    y = kernels.linear(x, w, b)
    assert_close("y", y, ref, mag, limit)
    one_off = y.clone()
    one_off[3, 5] += 0.02 * mag[3, 5].item()
    planted = {
        "last K column skipped (a K-mask off by one)": kernels.linear(x[:, :-1], w[:, :-1], b),
        "bias added twice": y + b,
        "one element off by 2% of its magnitude": one_off,
        "rounded through a coarser dtype": y.to(torch.float8_e4m3fn).to(dtype),
        "NaN in a row": y.index_fill(0, torch.tensor([0], device=device), float("nan")),
    }
    for what, y in planted.items():
        with pytest.raises(AssertionError, match="outside tolerance"):
            assert_close(f"y ({what})", y, ref, mag, limit)
