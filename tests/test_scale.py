"""64-bit indexing: tensors of 2^31 elements or more, and views whose offsets pass 2^31, compute correctly.

Three layers of proof:
  - the IR: every pointer offset in the compiled kernels is int64, for every switch of the matmul kernel (a
    compile for sm_90, which runs on the CPU too; it fails if a cast to int64 is dropped anywhere);
  - on the CPU, through the interpreter: views with a row stride of 2^20 over 2049 rows (offsets up to 2^31 + 2^20,
    in a 4 GiB buffer of which only the viewed pages are ever touched) give the float64 reference;
  - on a GPU with room for it: real tensors of more than 2^31 elements through forward and both backward products.
"""

import json
import os
import subprocess
import sys

import ir_offsets as ir_offsets_script
import pytest
import torch
from strategies import make_tensor

from fused_tp import kernels, path_counts
from fused_tp.kernels import layout
from fused_tp.tolerance import assert_close, linear_reference, tol


@pytest.fixture(scope="module")
def ir_offsets():
    """{kernel variant: the element types of its pointer offsets}, from tests/ir_offsets.py in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "ir_offsets.py")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("variant", [*ir_offsets_script.VARIANTS, "paired backward", "column sum"])
def test_every_pointer_offset_in_the_kernels_is_64_bit(ir_offsets, variant):
    types = ir_offsets[variant]
    if "descriptors" not in variant:
        assert len(types) >= 3, f"expected the loads and stores to go through tt.addptr, got {types}"
    assert set(types) <= {"i64"}, f"32-bit pointer offsets in the IR of {variant}: {types}"


def test_the_ir_check_sees_a_32_bit_offset(ir_offsets):
    """The check can fail: a kernel that indexes rows * stride in int32 shows i32 offsets."""
    assert "i32" in ir_offsets["int32 indexing"]


ROWS, ROW_STRIDE = 2049, 2**20  # the last row starts 2049 * 2^20 > 2^31 elements past the first


@pytest.mark.parametrize("aligned", [True, False], ids=["descriptors", "pointers"])
def test_offsets_past_2_31_on_views(device, aligned, monkeypatch, fresh_plans):
    """Forward, grad_input, grad_weight and grad_bias read operands whose element offsets pass 2^31 (unaligned: on
    the pointer path, with no alignment copies)."""
    monkeypatch.setattr(layout, "ALIGN_COPY_MIN_K", 2**62)
    if device == "cuda" and torch.cuda.mem_get_info()[0] < 6 * 2**30:
        pytest.skip("needs 6 GiB of free GPU memory")
    K, N, first = 16, 8, 0 if aligned else 1  # an odd first element makes rows unaligned: the pointer path
    # Untouched pages of the buffer are never backed by memory on the CPU: only the viewed rows are written.
    buf = torch.empty(ROWS, ROW_STRIDE, dtype=torch.bfloat16, device=device)
    gen = torch.Generator().manual_seed(0)
    window = lambda start, width: buf[:, first + start : first + start + width]  # noqa: E731
    x, grad_y, w_tall = window(0, K), window(64, N), window(128, K)
    for view in (x, grad_y, w_tall):
        view.copy_(make_tensor(view.shape, "contiguous", torch.bfloat16, "cpu", gen))
    w, b = w_tall[:N], make_tensor((N,), "contiguous", torch.bfloat16, device, gen)
    path_counts.clear()

    y = kernels.linear(x, w, b)  # A's rows 2^20 apart
    grad_x = kernels.grad_input(grad_y[:, :N], w)
    grad_tall = kernels.grad_input(x, w_tall.t())  # B's K-steps 2^20 apart: [2049, 16] @ [16, 2049]
    grad_w, grad_b = kernels.grad_params(grad_y, x)  # both operands' K-steps (the tokens) 2^20 apart

    # grad_tall's output rows of 2049 are not 16-byte multiples: stored through pointers, its operands through
    # descriptors
    assert path_counts["tma"] == (4 if aligned else 0)
    assert_close("y", y, *linear_reference(x, w, b), tol(torch.bfloat16, K))
    assert_close("grad_x", grad_x, *linear_reference(grad_y, w.t()), tol(torch.bfloat16, N))
    assert_close("x @ w_tall.T", grad_tall, *linear_reference(x, w_tall), tol(torch.bfloat16, K))
    assert_close("grad_w", grad_w, *linear_reference(grad_y.t(), x.t()), tol(torch.bfloat16, ROWS))
    g64 = grad_y.double().cpu()
    assert_close("grad_b", grad_b, g64.sum(0), g64.abs().sum(0), tol(torch.bfloat16, ROWS))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.mem_get_info()[0] < 40 * 2**30, reason="needs a GPU with 40 GiB free"
)
@pytest.mark.parametrize("aligned", [True, False], ids=["descriptors", "pointers"])
def test_tensors_of_more_than_2_31_elements(aligned, monkeypatch, fresh_plans):
    """x [2^20 + 64, 2048] and grad_x of the same shape hold 2^31 + 2^17 elements each: forward, grad_input and
    grad_weight + grad_bias against float64 (grad_w and grad_b in full; y and grad_x on the rows past 2^31
    elements and a sample of the others). Unaligned: on the pointer path, with no alignment copies."""
    monkeypatch.setattr(layout, "ALIGN_COPY_MIN_K", 2**62)
    M, K, N, dtype = 2**20 + 64, 2048, 256, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    first = 0 if aligned else 1
    x = torch.randn(M * K + first, generator=gen, device="cuda").to(dtype)[first:].view(M, K)
    w = torch.randn(N, K, generator=gen, device="cuda").to(dtype)
    b = torch.randn(N, generator=gen, device="cuda").to(dtype)
    grad_y = torch.randn(M, N, generator=gen, device="cuda").to(dtype)
    assert x.numel() > 2**31
    path_counts.clear()

    y = kernels.linear(x, w, b)
    grad_x = kernels.grad_input(grad_y, w)
    grad_w, grad_b = kernels.grad_params(grad_y, x)
    torch.cuda.synchronize()

    assert path_counts["tma"] == (3 if aligned else 1)  # grad_input's operands are aligned either way
    last = 2**31 // K - 8  # from 8 rows before the 2^31st element of x (and of grad_x) to the end
    rows = torch.cat([torch.randperm(last, generator=gen, device="cuda")[:4096], torch.arange(last, M, device="cuda")])
    assert_close("y rows", y[rows], *linear_reference(x[rows], w, b), tol(dtype, K))
    assert_close("grad_x rows", grad_x[rows], *linear_reference(grad_y[rows], w.t()), tol(dtype, N))
    # grad_w over all 2^20 tokens, in float64 on the GPU, chunked to bound the float64 copies.
    ref = torch.zeros(N, K, dtype=torch.float64, device="cuda")
    mag = torch.zeros_like(ref)
    for start in range(0, M, 2**17):
        g, xs = grad_y[start : start + 2**17].double(), x[start : start + 2**17].double()
        ref += g.T @ xs
        mag += g.abs().T @ xs.abs()
    assert_close("grad_w", grad_w, ref.cpu(), mag.cpu(), tol(dtype, M))
    g64 = grad_y.double()
    assert_close("grad_b", grad_b, g64.sum(0).cpu(), g64.abs().sum(0).cpu(), tol(dtype, M))
