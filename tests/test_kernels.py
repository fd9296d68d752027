"""The kernels against a float64 reference: forward, grad_input, grad_weight and grad_bias, any shape and stride."""

import dataclasses
import warnings

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from strategies import dims, dtypes, layouts, make_tensor, seeds

from fused_tp import kernels
from fused_tp.kernels import ACTIVATIONS, configs, jit, launch, layout, matmul, plan
from fused_tp.tolerance import (
    act_tol,
    activation_grad_reference,
    activation_reference,
    assert_close,
    linear_reference,
    tol,
)


def _tf32(device):
    return device == "cuda" and torch.backends.cuda.matmul.allow_tf32


def _clones(*ts):
    return [None if t is None else (t.clone(), t.stride()) for t in ts]


def _assert_unmodified(before, *ts):
    for saved, t in zip(before, ts):
        if t is not None:
            assert torch.equal(t, saved[0]) and t.stride() == saved[1], "an argument was modified"


@pytest.mark.parametrize("g_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_small_layers_grad_input_and_weight_gradient_run_as_one_launch(device, g_layout, dtype, monkeypatch):
    """matmul.paired_grads: over at most configs.ROW_SUM_MAX_K tokens into a weight gradient of at most
    configs.PAIR_MAX_ELEMENTS, grad_x, grad_w and grad_b in one launch of the paired kernel (path_counts["pair"],
    each product counted under its path), the bias gradient written by it (fuse_bias) or by the column-sum kernel;
    each against the float64 reference, nothing it was given modified. Past either bound None: the caller launches
    the products apart."""
    gen = torch.Generator().manual_seed(0)
    path = matmul.kernel_path(device)
    weight = make_tensor((40, 24), "contiguous", dtype, device, gen)  # [N, K]
    for tokens in (1, 5, configs.ROW_SUM_MAX_K, configs.ROW_SUM_MAX_K + 1):
        grad_y = make_tensor((tokens, 40), g_layout, dtype, device, gen)
        x = make_tensor((tokens, 24), "contiguous", dtype, device, gen)
        for bias, fuse_bias in ((True, True), (True, False), (False, True)):
            before_args, before = _clones(grad_y, weight, x), kernels.path_counts.copy()
            grads = matmul.paired_grads(grad_y, weight, x, bias=bias, fuse_bias=fuse_bias)
            counts = kernels.path_counts - before
            _assert_unmodified(before_args, grad_y, weight, x)
            if tokens > configs.ROW_SUM_MAX_K:
                assert grads is None and not counts, dict(counts)
                continue
            grad_x, grad_w, grad_b = grads
            column_sum = bias and not fuse_bias
            assert counts["pair"] == 1 and counts[path] == 2 + column_sum, dict(counts)
            assert counts["row_sum"] == (bias and fuse_bias), dict(counts)
            ref, mag = linear_reference(grad_y, weight.t())
            assert_close("grad_x", grad_x, ref, mag, tol(dtype, 40, tf32=_tf32(device)))
            ref, mag = linear_reference(grad_y.t(), x.t())
            assert_close("grad_w", grad_w, ref, mag, tol(dtype, tokens, tf32=_tf32(device)))
            if bias:
                g64 = grad_y.double().cpu()
                assert_close("grad_b", grad_b, g64.sum(0), g64.abs().sum(0), tol(dtype, tokens))
            else:
                assert grad_b is None
    monkeypatch.setattr(configs, "PAIR_MAX_ELEMENTS", 40 * 24 - 1)
    plan.clear_caches()
    try:
        assert matmul.paired_grads(grad_y[:1], weight, x[:1]) is None
    finally:
        plan.clear_caches()  # no plan made under the patched bound outlives this test


@pytest.mark.parametrize("g_layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_bias_gradient_over_a_few_tokens_comes_from_the_weight_gradients_launch(
    device, g_layout, dtype, monkeypatch
):
    """Over at most configs.ROW_SUM_MAX_K tokens the weight gradient's launch also writes grad_y's column sums, the
    bias gradient (one launch, path_counts["row_sum"]), where its K loop is not split and the weight gradient not
    over configs.ROW_SUM_MAX_ELEMENTS; else a column-sum launch of its own does. Both against the float64 reference."""
    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 16, configs.ROW_SUM_MAX_K, configs.ROW_SUM_MAX_K + 1):
        # 64 features: rows of 16-byte multiples, so the interpreter and sm_90 move A through descriptors where the
        # layout lets them, as well as through pointers (transposed, sliced)
        grad_y = make_tensor((tokens, 64), g_layout, dtype, device, gen)
        x = make_tensor((tokens, 48), "contiguous", dtype, device, gen)
        before = kernels.path_counts.copy()
        grad_w, grad_b = kernels.grad_params(grad_y, x)
        counts = kernels.path_counts - before
        launches = counts[matmul.kernel_path(device)]
        fused = tokens <= configs.ROW_SUM_MAX_K and not counts["split_k"]
        assert counts["row_sum"] == fused and launches == 2 - fused, (tokens, dict(counts))
        g64 = grad_y.double().cpu()
        assert_close("grad_b", grad_b, g64.sum(0), g64.abs().sum(0), tol(dtype, tokens))
        ref, mag = linear_reference(grad_y.t(), x.t())
        assert_close("grad_w", grad_w, ref, mag, tol(dtype, tokens, tf32=_tf32(device)))
    # a weight gradient of more than configs.ROW_SUM_MAX_ELEMENTS elements keeps the column-sum launch
    monkeypatch.setattr(configs, "ROW_SUM_MAX_ELEMENTS", 64 * 48 - 1)
    plan.clear_caches()
    before = kernels.path_counts.copy()
    try:
        grad_w, grad_b = kernels.grad_params(grad_y[:1], x[:1])
    finally:
        plan.clear_caches()  # no plan made under the patched bound outlives this test
    counts = kernels.path_counts - before
    assert not counts["row_sum"] and counts[matmul.kernel_path(device)] == 2, dict(counts)
    g64 = grad_y[:1].double().cpu()
    assert_close("grad_b", grad_b, g64.sum(0), g64.abs().sum(0), tol(dtype, 1))


@given(
    M=dims,
    K=dims,
    N=dims,
    dtype=dtypes,
    has_bias=st.booleans(),
    x_layout=layouts,
    w_layout=layouts,
    lead=st.sampled_from([(), (2,), (1, 3)]),
    seed=seeds,
)
@example(
    M=0, K=5, N=3, dtype=torch.float32, has_bias=True, x_layout="contiguous", w_layout="contiguous", lead=(), seed=0
)
@example(
    M=4, K=0, N=3, dtype=torch.bfloat16, has_bias=True, x_layout="contiguous", w_layout="contiguous", lead=(), seed=0
)
@example(M=4, K=0, N=3, dtype=torch.float16, has_bias=False, x_layout="sliced", w_layout="contiguous", lead=(), seed=0)
@example(
    M=4, K=5, N=0, dtype=torch.float32, has_bias=True, x_layout="contiguous", w_layout="contiguous", lead=(), seed=0
)
@example(
    M=1, K=1, N=1, dtype=torch.bfloat16, has_bias=True, x_layout="expanded", w_layout="transposed", lead=(), seed=0
)
@example(
    M=67,
    K=131,
    N=61,
    dtype=torch.bfloat16,
    has_bias=True,
    x_layout="transposed",
    w_layout="transposed",
    lead=(1, 3),
    seed=1,
)
def test_forward(device, M, K, N, dtype, has_bias, x_layout, w_layout, lead, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_tensor(lead + (M, K), x_layout, dtype, device, gen)
    w = make_tensor((N, K), w_layout, dtype, device, gen)
    b = make_tensor((N,), "contiguous", dtype, device, gen) if has_bias else None
    before = _clones(x, w, b)

    y = kernels.linear(x, w, b)

    ref, mag = linear_reference(x, w, b)
    assert y.dtype == dtype and y.device == x.device and y.is_contiguous()
    assert_close("y", y, ref, mag, tol(dtype, K, tf32=_tf32(device)))
    _assert_unmodified(before, x, w, b)


@given(M=dims, K=dims, N=dims, dtype=dtypes, g_layout=layouts, w_layout=layouts, seed=seeds)
@example(M=67, K=131, N=61, dtype=torch.bfloat16, g_layout="transposed", w_layout="sliced", seed=2)
@example(M=3, K=4, N=0, dtype=torch.float16, g_layout="contiguous", w_layout="contiguous", seed=2)
def test_grad_input(device, M, K, N, dtype, g_layout, w_layout, seed):
    gen = torch.Generator().manual_seed(seed)
    grad_y = make_tensor((M, N), g_layout, dtype, device, gen)
    w = make_tensor((N, K), w_layout, dtype, device, gen)
    before = _clones(grad_y, w)

    grad_x = kernels.grad_input(grad_y, w)

    ref, mag = linear_reference(grad_y, w.t())
    assert_close("grad_x", grad_x, ref, mag, tol(dtype, N, tf32=_tf32(device)))
    _assert_unmodified(before, grad_y, w)


@given(
    M=dims,
    K=dims,
    N=dims,
    dtype=dtypes,
    need=st.sampled_from([(True, True), (True, False), (False, True)]),
    g_layout=layouts,
    x_layout=layouts,
    lead=st.sampled_from([(), (2,)]),
    seed=seeds,
)
@example(
    M=0, K=3, N=4, dtype=torch.float32, need=(True, True), g_layout="contiguous", x_layout="contiguous", lead=(), seed=0
)
@example(
    M=5,
    K=0,
    N=4,
    dtype=torch.bfloat16,
    need=(True, True),
    g_layout="contiguous",
    x_layout="contiguous",
    lead=(),
    seed=0,
)
@example(
    M=131,
    K=67,
    N=61,
    dtype=torch.bfloat16,
    need=(False, True),
    g_layout="expanded",
    x_layout="sliced",
    lead=(2,),
    seed=3,
)
@example(
    M=150,
    K=3,
    N=5,
    dtype=torch.bfloat16,
    need=(False, True),
    g_layout="transposed",
    x_layout="contiguous",
    lead=(2,),
    seed=4,
)  # 300 rows of 5 columns: the column sum runs in row chunks and a second pass
def test_grad_params(device, M, K, N, dtype, need, g_layout, x_layout, lead, seed):
    gen = torch.Generator().manual_seed(seed)
    grad_y = make_tensor(lead + (M, N), g_layout, dtype, device, gen)
    x = make_tensor(lead + (M, K), x_layout, dtype, device, gen)
    before = _clones(grad_y, x)

    grad_w, grad_b = kernels.grad_params(grad_y, x, weight=need[0], bias=need[1])

    rows = M * (lead[0] if lead else 1)
    g2, x2 = grad_y.reshape(rows, N), x.reshape(rows, K)
    if need[0]:
        ref, mag = linear_reference(g2.t(), x2.t())
        assert_close("grad_w", grad_w, ref, mag, tol(dtype, rows, tf32=_tf32(device)))
    else:
        assert grad_w is None
    if need[1]:
        g64 = g2.double().cpu()
        assert_close("grad_b", grad_b, g64.sum(0), g64.abs().sum(0), tol(dtype, rows))
    else:
        assert grad_b is None
    _assert_unmodified(before, grad_y, x)


@given(
    M=dims,
    K=dims,
    N=dims,
    dtype=dtypes,
    activation=st.sampled_from(list(kernels.ACTIVATIONS)),
    has_bias=st.booleans(),
    x_layout=layouts,
    w_layout=layouts,
    seed=seeds,
)
@example(
    M=40,
    K=64,
    N=96,
    dtype=torch.bfloat16,
    activation="gelu",
    has_bias=True,
    x_layout="contiguous",
    w_layout="contiguous",
    seed=0,
)  # every operand through tensor descriptors
@example(
    M=3,
    K=0,
    N=5,
    dtype=torch.float16,
    activation="gelu_tanh",
    has_bias=True,
    x_layout="contiguous",
    w_layout="contiguous",
    seed=0,
)  # no K-steps: gelu(bias)
@example(
    M=70,
    K=40,
    N=67,
    dtype=torch.bfloat16,
    activation="swiglu",
    has_bias=True,
    x_layout="contiguous",
    w_layout="transposed",
    seed=0,
)  # pairs across several output tiles, a partial last one
@example(
    M=33,
    K=24,
    N=20,
    dtype=torch.float16,
    activation="geglu_tanh",
    has_bias=True,
    x_layout="contiguous",
    w_layout="contiguous",
    seed=1,
)  # Gemma's gate: the tanh GELU's derivative in the gated pairs
@example(
    M=1,
    K=8,
    N=4,
    dtype=torch.float16,
    activation="gelu",
    has_bias=False,
    x_layout="contiguous",
    w_layout="transposed",
    seed=0,
)  # grad_input's pre-activation rows of 8 bytes beside C's, which the interpreter writes in fp32 (16 bytes)
def test_activation_epilogue(device, M, K, N, dtype, activation, has_bias, x_layout, w_layout, seed):
    """linear(..., activation) is the activation of the product on the fp32 accumulator, and its saved
    pre-activation is the product; grad_input through the activation is (grad_y @ w) * activation'(pre), all
    against float64. A gated activation (SwiGLU) reads 2N interleaved (gate, up) columns and writes N; its
    grad_input writes the 2N gradients of the pairs."""
    gen = torch.Generator().manual_seed(seed)
    width = 2 * N if ACTIVATIONS[activation].gated else N  # the pre-activation's
    x = make_tensor((M, K), x_layout, dtype, device, gen)
    w = make_tensor((width, K), w_layout, dtype, device, gen)
    b = make_tensor((width,), "contiguous", dtype, device, gen) if has_bias else None
    w_next = make_tensor((K, N), w_layout, dtype, device, gen)  # a layer reading activation(pre) [M, N]
    grad_next = make_tensor((M, K), "contiguous", dtype, device, gen)
    before = _clones(x, w, b, w_next, grad_next)

    y, pre = kernels.linear_prechecked(x, w, b, activation, save_pre=True)
    grad_pre = kernels.grad_input(grad_next, w_next, activation=activation, pre=pre)

    ref, mag = linear_reference(x, w, b)
    tf32 = _tf32(device)
    assert_close("pre", pre, ref, mag, tol(dtype, K, tf32=tf32))
    assert_close("y", y, *activation_reference(activation, ref, mag), act_tol(dtype, K, tf32))
    assert torch.equal(kernels.linear(x, w, b, activation=activation), y)
    # The derivative at the pre-activation the forward saved, as the layers' backward uses it.
    d, d_mag = linear_reference(grad_next, w_next.t())
    grad_ref = activation_grad_reference(activation, d, d_mag, pre)
    assert_close("grad_pre", grad_pre, *grad_ref, act_tol(dtype, N, tf32))
    _assert_unmodified(before, x, w, b, w_next, grad_next)


def test_gelu_keeps_its_digits_below_minus_three(device):
    """The exact GELU's epilogue takes Phi(x) from erfc(|x| / sqrt 2), so below x = -3, where 1 + erf(x / sqrt 2)
    in fp32 cancels (F.gelu's relative error reaches 0.27 by x = -5 and 1 beyond), its values keep their relative
    accuracy: within 2% of the float64 value down to x = -8.875 (the form's own error: 1.4e-2 at most there)."""
    x = (-3 - torch.arange(48, dtype=torch.float32) / 8).reshape(3, 16)  # exact in bf16 and TF32 too
    y = kernels.linear(x.to(device), torch.eye(16, device=device), None, activation="gelu")  # y = gelu(x)
    x64 = x.double()
    exact = x64 * 0.5 * torch.special.erfc(-x64 / 2**0.5)
    assert ((y.cpu().double() - exact).abs() / exact.abs()).max() < 2e-2


def _product(op, M, K, N, dtype, a_layout, b_layout, device, seed):
    """(run, its float64 reference and magnitude, the product's output width) for one product on fresh operands:
    "forward" (x [M, K] @ w.T + b), "forward_<activation>" (then the activation), "grad_input" (grad_y [M, K] @
    w [K, N]) or "grad_weight" (grad_y [K, M] and x [K, N]: grad_w = grad_y.T @ x sums over the K rows)."""
    gen = torch.Generator().manual_seed(seed)
    if op.startswith("forward"):
        act = op[len("forward_") :] or None
        width = 2 * N if act and ACTIVATIONS[act].gated else N
        a = make_tensor((M, K), a_layout, dtype, device, gen)
        w = make_tensor((width, K), b_layout, dtype, device, gen)
        b = make_tensor((width,), "contiguous", dtype, device, gen)
        ref = linear_reference(a, w, b)
        return (
            (lambda: kernels.linear(a, w, b, activation=act)),
            (ref if act is None else activation_reference(act, *ref)),
            width,
        )
    if op == "grad_input":
        a, w = make_tensor((M, K), a_layout, dtype, device, gen), make_tensor((K, N), b_layout, dtype, device, gen)
        return (lambda: kernels.grad_input(a, w)), linear_reference(a, w.t()), N
    a, x = make_tensor((K, M), a_layout, dtype, device, gen), make_tensor((K, N), b_layout, dtype, device, gen)
    return (lambda: kernels.grad_params(a, x, bias=False)[0]), linear_reference(a.t(), x.t()), N


@given(
    M=dims,
    K=st.integers(0, 600),
    N=dims,
    dtype=dtypes,
    op=st.sampled_from(["forward", "forward_gelu", "forward_swiglu", "grad_input", "grad_weight"]),
    split_k=st.sampled_from([None, 1, 2, 3, 5, 16]),
    a_layout=layouts,
    b_layout=layouts,
    seed=seeds,
)
@example(
    M=8, K=512, N=8, dtype=torch.bfloat16, op="forward", split_k=2, a_layout="contiguous", b_layout="contiguous", seed=0
)  # one tile, 8 K-steps in two splits
@example(
    M=5, K=200, N=3, dtype=torch.float16, op="forward", split_k=16, a_layout="expanded", b_layout="sliced", seed=0
)  # more splits asked for than K-steps
@example(
    M=70,
    K=300,
    N=130,
    dtype=torch.float32,
    op="forward_gelu",
    split_k=3,
    a_layout="contiguous",
    b_layout="contiguous",
    seed=0,
)  # several tiles, each summed by whichever split arrives last, then GELU
@example(
    M=20,
    K=600,
    N=45,
    dtype=torch.bfloat16,
    op="forward_swiglu",
    split_k=3,
    a_layout="contiguous",
    b_layout="transposed",
    seed=0,
)  # SwiGLU's pairs from the added partials
def test_split_k_computes_the_same_function(device, M, K, N, dtype, op, split_k, a_layout, b_layout, seed):
    """Splitting the K loop over programs (fp32 partials; the last program at a tile adds them in split order, then
    the bias and the activation) gives the float64 result within the same tolerance, bitwise the same on a second
    run; path_counts says it split."""
    run, ref, width = _product(op, M, K, N, dtype, a_layout, b_layout, device, seed)
    base, _ = plan.pick_config(M, width, K, dtype, interpreted=matmul.INTERPRETED, tma=False, slots=1)
    cfg = dataclasses.replace(base, split_k=split_k)
    slots = plan.device(torch.empty(0, device=device).get_device()).slots
    k_tiles = -(-K // cfg.BLOCK_K)
    expect_split = M * N > 0 and k_tiles > 1 and configs.choose_split_k(M, width, K, cfg, slots, dtype.itemsize) > 1
    before = kernels.path_counts["split_k"]
    with configs.pin_config(cfg):
        out, again = run(), run()
    assert kernels.path_counts["split_k"] - before == 2 * expect_split
    assert_close(op, out, *ref, (act_tol if op.startswith("forward_") else tol)(dtype, K, tf32=_tf32(device)))
    assert torch.equal(out, again), "split-K must be deterministic"
    kept = [buf for key, buf in launch._kept.items() if key[0] == "counters"]
    assert not any(buf.any() for buf in kept), "a split launch leaves its tiles' arrival counters at zero"


@given(
    M=st.integers(0, configs.GEMV_MAX_ROWS),  # every token count a table may give the form
    K=st.integers(0, 300),
    N=st.integers(0, 40),
    dtype=dtypes,
    op=st.sampled_from(["forward", "forward_gelu", "forward_swiglu", "grad_input"]),
    split_k=st.sampled_from([None, 2, 3]),
    a_layout=layouts,
    b_layout=layouts,
    form=st.sampled_from(["gemv", "tile", "c_pointers"]),
    seed=seeds,
)
@example(
    M=1,
    K=300,
    N=9,
    dtype=torch.bfloat16,
    op="forward",
    split_k=None,
    a_layout="contiguous",
    b_layout="contiguous",
    form="gemv",
    seed=0,
)  # the decode case: a row against a row-major weight, a partial last tile of 4 columns and of K
@example(
    M=1,
    K=200,
    N=6,
    dtype=torch.float16,
    op="forward_swiglu",
    split_k=2,
    a_layout="sliced",
    b_layout="transposed",
    form="gemv",
    seed=0,
)  # SwiGLU's pairs from added partials, through odd strides
@example(
    M=5,
    K=300,
    N=40,
    dtype=torch.bfloat16,
    op="forward",
    split_k=None,
    a_layout="contiguous",
    b_layout="contiguous",
    form="tile",
    seed=0,
)  # a decode tile on operands descriptors could address
@example(
    M=7,
    K=300,
    N=40,
    dtype=torch.float16,
    op="forward_gelu",
    split_k=2,
    a_layout="contiguous",
    b_layout="contiguous",
    form="c_pointers",
    seed=0,
)  # A and B through descriptors (on a GPU), C and the stored pre-activation through pointers
def test_pointer_forms_compute_the_same_function(device, M, K, N, dtype, op, split_k, a_layout, b_layout, form, seed):
    """The configs that read the operands through pointers as they lie, even where descriptors could address them
    (no descriptors and no copies, whatever their layout): the GEMV form (BLOCK_M 1: one row a program, products
    on the CUDA cores) and a tile with tma=False (a decode tile spared the descriptors' prologue); and a tile with
    tma_c=False, which moves A and B as the layout allows but C through pointers. Each gives the float64 result
    within the tolerance, bitwise the same on a second run, for every epilogue and with split K."""
    run, ref, _ = _product(op, M, K, N, dtype, a_layout, b_layout, device, seed)
    if form == "gemv":
        cfg = configs.KernelConfig(1, 4, 64, num_warps=4, num_stages=1, persistent=False, split_k=split_k)
    else:
        cfg = configs.KernelConfig(
            16, 16, 64, num_warps=4, num_stages=2, split_k=split_k, tma=form != "tile", tma_c=form != "c_pointers"
        )
    before = kernels.path_counts.copy()
    with configs.pin_config(cfg):
        out, again = run(), run()
    assert_close(op, out, *ref, (act_tol if op.startswith("forward_") else tol)(dtype, K, tf32=_tf32(device)))
    assert torch.equal(out, again), f"the {form} form must be deterministic"
    for key in ("tma", "align_copy", "fp32_copy") if form != "c_pointers" else ():
        assert kernels.path_counts[key] == before[key], f"a {form} launch counted {key}"


@given(
    # multiples of 8: rows of 16 bytes, which descriptors can address (others take copies or pointers)
    M=st.integers(1, 20).map(lambda i: 8 * i),
    K=st.integers(1, 40).map(lambda i: 8 * i),
    N=st.integers(1, 20).map(lambda i: 8 * i),
    dtype=dtypes,
    op=st.sampled_from(
        [
            "forward",
            "forward_gelu",
            "forward_swiglu",
            "forward_gelu_pre",
            "grad_input",
            "grad_input_gelu",
            "grad_weight",
        ]
    ),
    tile=st.sampled_from([(64, 64, 64), (64, 128, 32), (128, 64, 32)]),
    split_k=st.sampled_from([None, 2, 3]),
    tma_c=st.booleans(),
    a_layout=layouts,
    b_layout=layouts,
    seed=seeds,
)
@example(
    M=72,
    K=320,
    N=136,
    dtype=torch.bfloat16,
    op="forward_gelu_pre",
    tile=(64, 128, 32),
    split_k=2,
    tma_c=True,
    a_layout="contiguous",
    b_layout="contiguous",
    seed=0,
)  # C and the stored pre-activation through descriptors (column halves), from added partials
@example(
    M=64,
    K=128,
    N=96,
    dtype=torch.float16,
    op="grad_input_gelu",
    tile=(64, 64, 64),
    split_k=3,
    tma_c=True,
    a_layout="contiguous",
    b_layout="contiguous",
    seed=0,
)  # the pre-activation read through a descriptor
def test_descriptors_made_on_the_host_give_the_device_made_ones_bits(
    device, M, K, N, dtype, op, tile, split_k, tma_c, a_layout, b_layout, seed
):
    """jit.py's HOST_DESC: the same launch with the descriptors made on the host (as launches captured into a CUDA
    graph take them) gives the bits of the device-made ones, with every epilogue (the pre-activation stored and
    read included), split K and either C path; path_counts["host_descriptors"] counts exactly the launches that
    moved tiles through descriptors."""
    gen = torch.Generator().manual_seed(seed)
    if op == "forward_gelu_pre":  # y and the stored pre-activation
        x, w, b = (
            make_tensor(s, lay, dtype, device, gen)
            for s, lay in (((M, K), a_layout), ((N, K), b_layout), ((N,), "contiguous"))
        )
        run = lambda: torch.stack(matmul.linear_prechecked(x, w, b, "gelu", save_pre=True))  # noqa: E731
    elif op == "grad_input_gelu":  # times GELU's derivative at a given pre-activation
        g, w, pre = (
            make_tensor(s, lay, dtype, device, gen)
            for s, lay in (((M, N), a_layout), ((N, K), b_layout), ((M, K), "contiguous"))
        )
        run = lambda: kernels.grad_input(g, w, activation="gelu", pre=pre)  # noqa: E731
    else:
        run, _, _ = _product(op, M, K, N, dtype, a_layout, b_layout, device, seed)
    cfg = configs.KernelConfig(*tile, num_warps=4, num_stages=2, split_k=split_k, tma_c=tma_c)
    out = {}
    for where in ("never", "always"):
        before = kernels.path_counts.copy()
        with pytest.MonkeyPatch.context() as mp, configs.pin_config(cfg):
            mp.setattr(launch, "HOST_DESCRIPTORS", where)
            out[where] = run()
        made = kernels.path_counts["host_descriptors"] - before["host_descriptors"]
        assert made == (kernels.path_counts["tma"] - before["tma"] if where == "always" else 0)
    assert torch.equal(out["never"], out["always"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_a_launch_captured_into_a_cuda_graph_takes_descriptors_made_on_the_host():
    """HOST_DESCRIPTORS's default: an eager launch makes its descriptors on the device, the same launch captured
    into a CUDA graph takes them made on the host (its kernel compiled during the capture), and the replay gives
    the eager launch's bits."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = (make_tensor(s, "contiguous", torch.bfloat16, "cuda", gen) for s in ((100, 256), (384, 256), (384,)))
    assert launch.HOST_DESCRIPTORS == "graphs"
    with configs.pin_config(dataclasses.replace(configs.ROUTE_PROBE, num_stages=2)):  # a plan no other test has
        before = kernels.path_counts.copy()
        eager = kernels.linear(x, w, b, activation="gelu")
        assert kernels.path_counts["tma"] == before["tma"] + 1
        assert kernels.path_counts["host_descriptors"] == before["host_descriptors"]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            captured = kernels.linear(x, w, b, activation="gelu")
        assert kernels.path_counts["host_descriptors"] == before["host_descriptors"] + 1
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(eager, captured)


def test_split_k_rule():
    """The rule splits a compute-bound product whose few tiles would leave SMs idle, and a memory-bound one so that
    about 60% of the SMs stream a K-range each (the best split measured on the H200); not one with a tile per SM
    or more; and stays within its bounds."""
    big = configs.CONFIGS[("16bit", "tma", "large")]
    small = configs.CONFIGS[("16bit", "tma", "small_m")]
    decode = configs.KernelConfig(16, 64, 256, num_warps=4, num_stages=4)
    assert configs.choose_split_k(8192, 14336, 8192, big, 132, 2) == 1  # 1792 tiles
    assert configs.choose_split_k(1792, 4096, 16384, big, 132, 2) == 1  # 224 tiles: a partial second wave
    assert configs.choose_split_k(16, 8192, 14336, small, 132, 2) == 1  # decode: 64 tiles already stream
    assert configs.choose_split_k(1, 1280, 8192, decode, 132, 2) == 4  # 20 tiles: 80 items, measured best
    assert configs.choose_split_k(32, 1280, 8192, decode, 132, 2) == 2  # 40 tiles, measured best
    assert configs.choose_split_k(1, 7168, 8192, decode, 132, 2) == 1  # 112 tiles, measured best unsplit
    assert configs.choose_split_k(1, 64, 1024, decode, 132, 2) == 1  # 4 K-steps: too few to share
    assert configs.choose_split_k(3072, 768, 32768, big, 132, 2) > 1  # narrow weight gradient: 72 long tiles
    assert configs.choose_split_k(3, 3, 64, small, 132, 2) == 1  # one K-step: nothing to split
    assert configs.choose_split_k(1, 8192, 14336, dataclasses.replace(small, split_k=3), 132, 2) == 3  # pinned
    for M, N, K in [(1, 64, 10**6), (128, 128, 256), (64, 4096, 4096)]:
        s = configs.choose_split_k(M, N, K, small, 132, 2)
        assert 1 <= s <= min(configs.MAX_SPLIT_K, max(1, -(-K // small.BLOCK_K) // 2))
    # the bias gradient's column sums: few long columns are cut into row chunks, many short ones are not
    assert configs.colsum_chunks(32768, 48, 132, configs.COLSUM_CONFIG) > 1
    assert configs.colsum_chunks(128, 224, 132, configs.COLSUM_CONFIG) == 1
    with pytest.raises(ValueError, match="split_k: expected None or a positive integer, got 0"):
        dataclasses.replace(small, split_k=0)


def test_kernel_code_runs(device, monkeypatch):
    """The suite exercises Triton kernel code: compiled on a GPU, the interpreter on CPU; never the torch path."""
    launches = []
    kernel = jit.matmul_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(jit, "matmul_kernel", Spy())
    x, w, b = (torch.randn(s, device=device) for s in ((9, 7), (5, 7), (5,)))
    before = kernels.path_counts.copy()
    y = kernels.linear(x, w, b)
    ref, mag = linear_reference(x, w, b)
    assert_close("y", y, ref, mag, tol(torch.float32, 7, tf32=_tf32(device)))
    assert launches, "the Triton kernel was not launched"
    expected = "triton" if device == "cuda" else "triton-interpreter"
    assert kernels.kernel_path(device) == expected
    assert kernels.path_counts[expected] == before[expected] + 1 and kernels.path_counts["torch"] == before["torch"]
    if device == "cpu":
        assert kernels.INTERPRETED, "CPU tests must run the kernels through TRITON_INTERPRET=1"


@pytest.mark.parametrize(
    "shape, layout, tma",
    [
        ((40, 64, 72), "contiguous", True),
        ((40, 64, 72), "transposed", True),
        ((40, 63, 72), "contiguous", False),
        ((40, 64, 72), "sliced", False),
        ((40, 64, 72), "expanded", False),
        ((40, 64, 37), "contiguous", True),
    ],
)
def test_tensor_descriptor_path_is_taken_where_it_can_be(device, shape, layout, tma):
    """Aligned operands (either major order) move through tensor descriptors; others fall back to pointers (a
    reduction under ALIGN_COPY_MIN_K copies none), and path_counts says which happened. An output whose rows no
    descriptor can address (37 columns of bf16) is stored through pointers beside operands that move through
    descriptors. All give the right result. The config is one that reads through descriptors (a table's decode
    tile may not: configs.KernelConfig.tma)."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90")
    M, K, N = shape
    gen = torch.Generator().manual_seed(0)
    x = make_tensor((M, K), layout, torch.bfloat16, device, gen)
    w = make_tensor((N, K), layout, torch.bfloat16, device, gen)
    before = kernels.path_counts.copy()
    with configs.pin_config(configs.ROUTE_PROBE):
        y = kernels.linear(x, w)
    assert kernels.path_counts["tma"] - before["tma"] == int(tma)
    assert kernels.path_counts["align_copy"] == before["align_copy"]
    ref, mag = linear_reference(x, w)
    assert_close("y", y, ref, mag, tol(torch.bfloat16, K))


@pytest.mark.parametrize("dtype, tf32", [(torch.bfloat16, False), (torch.float32, False), (torch.float32, True)])
@pytest.mark.parametrize("tokens, copies", [(24, (2, 2, 2)), (8, (2, 2, 0))])
def test_operands_no_descriptor_can_address_are_copied_where_it_pays(
    device, monkeypatch, set_tf32, fresh_plans, tokens, copies, dtype, tf32
):
    """Operands whose rows are not a multiple of 16 bytes long are copied into aligned rows where the product's
    reduction is at least ALIGN_COPY_MIN_K long, and the product then moves them through descriptors, its odd-width
    output through pointers. The forward reduces over the in-features, grad_input over the out-features, the
    weight gradient over the tokens: at 8 tokens (under the threshold) it stays on the pointer path.
    path_counts["align_copy"] counts the copies; an fp32 operand is copied once, straight into the layout its
    product reads (no fp32 layout copy after it). Same results, inputs untouched. The config reads through
    descriptors (a table's decode tile may not, and then copies nothing: configs.KernelConfig.tma)."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90")
    assert layout.ALIGN_COPY_MIN_K == 256
    monkeypatch.setattr(layout, "ALIGN_COPY_MIN_K", 16)  # the interpreter's time: small widths
    monkeypatch.setattr(layout, "FP32_COPY_MIN_REUSE", {"tf32": 1, "ieee": 1})  # every fp32 layout copy would pay
    set_tf32(tf32)
    K, N = 37, 21
    gen = torch.Generator().manual_seed(0)
    x, g = (make_tensor((tokens, d), "contiguous", dtype, device, gen) for d in (K, N))
    w = make_tensor((N, K), "contiguous", dtype, device, gen)
    saved = _clones(x, g, w)
    outs = []
    for op, call in (
        ("y", lambda: kernels.linear(x, w)),
        ("grad_x", lambda: kernels.grad_input(g, w)),
        ("grad_w", lambda: kernels.grad_params(g, x, bias=False)[0]),
    ):
        before = kernels.path_counts.copy()
        with configs.pin_config(configs.ROUTE_PROBE):
            outs.append((op, call()))
        copied = kernels.path_counts["align_copy"] - before["align_copy"]
        assert copied == copies[len(outs) - 1], op
        assert kernels.path_counts["tma"] - before["tma"] == int(copied > 0), op
        assert kernels.path_counts["fp32_copy"] == before["fp32_copy"], op
    refs = (linear_reference(x, w), linear_reference(g, w.t()), linear_reference(g.t(), x.t()))
    for (op, out), ref, k in zip(outs, refs, (K, N, tokens)):
        assert_close(op, out, *ref, tol(dtype, k, tf32=tf32 and device == "cuda"))
    _assert_unmodified(saved, x, g, w)


@pytest.mark.parametrize(
    "tf32, tokens, copies",
    [(True, 16, (0, 0, 2)), (True, 256, (0, 1, 2)), (False, 16, (1, 0, 1)), (False, 256, (1, 0, 1))],
)
def test_fp32_operands_are_copied_into_the_layout_the_product_reads(device, set_tf32, tf32, tokens, copies):
    """An fp32 operand not in the layout its product reads is copied into it first, where the product reuses it
    over at least FP32_COPY_MIN_REUSE rows or columns of the other: with TF32, both operands K-major (the weight
    in grad_input only from 256 tokens; both operands of a 256-wide weight gradient); in IEEE, A K-major and B
    N-major, always (the weight in the forward, grad_y in the weight gradient). path_counts["fp32_copy"] counts
    the copies. Same results, inputs untouched. The config reads through descriptors, as above."""
    set_tf32(tf32)
    assert layout.FP32_COPY_MIN_REUSE == {"tf32": 256, "ieee": 1}
    gen = torch.Generator().manual_seed(0)
    x, g = (make_tensor((tokens, 256), "contiguous", torch.float32, device, gen) for _ in range(2))
    w = make_tensor((256, 256), "contiguous", torch.float32, device, gen)
    before, saved = kernels.path_counts["fp32_copy"], _clones(x, g, w)
    outs = []
    for op, call in (
        ("y", lambda: kernels.linear(x, w)),
        ("grad_x", lambda: kernels.grad_input(g, w)),
        ("grad_w", lambda: kernels.grad_params(g, x, bias=False)[0]),
    ):
        with configs.pin_config(configs.ROUTE_PROBE):
            outs.append((op, call()))
        assert kernels.path_counts["fp32_copy"] - before == copies[len(outs) - 1], op
        before = kernels.path_counts["fp32_copy"]
    refs = (linear_reference(x, w), linear_reference(g, w.t()), linear_reference(g.t(), x.t()))
    for (op, out), ref, k in zip(outs, refs, (256, 256, tokens)):
        assert_close(op, out, *ref, tol(torch.float32, k, tf32=tf32 and device == "cuda"))
    _assert_unmodified(saved, x, g, w)


def _variants(device) -> dict:
    """name -> call of one product, the calls differing in one fact each that a plan reads: strides, 16-byte
    alignment (a view one element in), leading dims, dtype, bias, activation, the stored or loaded pre-activation,
    TF32 (a layout change for fp32 operands)."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape, dtype=torch.float32, layout="contiguous"):
        if layout == "misaligned":  # one element in: not 16-byte aligned
            flat = make_tensor((1 + torch.Size(shape).numel(),), "contiguous", dtype, device, gen)
            return flat[1:].view(shape)
        return make_tensor(shape, layout, dtype, device, gen)

    M, K, N = 24, 40, 32
    x, w, b, g, pre = t(M, K), t(N, K), t(N), t(M, N), t(M, K)
    bf = dict(dtype=torch.bfloat16)

    def tf32(call):
        def run():
            before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return call()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = before

        return run

    xt, xs, xm = t(M, K, layout="transposed"), t(M, K, layout="sliced"), t(M, K, layout="misaligned")
    wt, wm, bs, bm = (
        t(N, K, layout="transposed"),
        t(N, K, layout="misaligned"),
        t(2 * N)[::2],
        t(N, layout="misaligned"),
    )
    x16, w16, b16, g16 = t(M, K, **bf), t(N, K, **bf), t(N, **bf), t(M, N, **bf)
    gt, gm, pm, pairs = (
        t(M, N, layout="transposed"),
        t(M, N, layout="misaligned"),
        t(M, K, layout="misaligned"),
        t(M, 2 * K),
    )
    return {
        "fwd": lambda: kernels.linear(x, w, b),
        "fwd, x transposed": lambda: kernels.linear(xt, w, b),
        "fwd, x sliced": lambda: kernels.linear(xs, w, b),
        "fwd, x misaligned": lambda: kernels.linear(xm, w, b),
        "fwd, x 3-D": lambda: kernels.linear(x.view(2, M // 2, K), w, b),
        "fwd, fewer rows": lambda: kernels.linear(x[:-8], w, b),
        "fwd, w fewer rows": lambda: kernels.linear(x, w[:-8], b[:-8]),
        "fwd, w transposed": lambda: kernels.linear(x, wt, b),
        "fwd, w misaligned": lambda: kernels.linear(x, wm, b),
        "fwd, no bias": lambda: kernels.linear(x, w),
        "fwd, bias strided": lambda: kernels.linear(x, w, bs),
        "fwd, bias misaligned": lambda: kernels.linear(x, w, bm),
        "fwd, bf16": lambda: kernels.linear(x16, w16, b16),
        "fwd, gelu": lambda: kernels.linear(x, w, b, activation="gelu"),
        "fwd, gelu, pre stored": lambda: matmul.linear_prechecked(x, w, b, "gelu", save_pre=True),
        "fwd, tf32": tf32(lambda: kernels.linear(x, w, b)),
        "dgrad": lambda: kernels.grad_input(g, w),
        "dgrad, grad_y transposed": lambda: kernels.grad_input(gt, w),
        "dgrad, grad_y misaligned": lambda: kernels.grad_input(gm, w),
        "dgrad, w transposed": lambda: kernels.grad_input(g, wt),
        "dgrad, fewer rows": lambda: kernels.grad_input(g[:-8], w),
        "dgrad, w narrower": lambda: kernels.grad_input(g, w[:, :-8]),
        "dgrad, w misaligned": lambda: kernels.grad_input(g, wm),
        "dgrad, bf16": lambda: kernels.grad_input(g16, w16),
        "dgrad, gelu": lambda: kernels.grad_input(g, w, activation="gelu", pre=pre),
        "dgrad, gelu, pre misaligned": lambda: kernels.grad_input(g, w, activation="gelu", pre=pm),
        "dgrad, swiglu": lambda: kernels.grad_input(g, w, activation="swiglu", pre=pairs),
        "dgrad, tf32": tf32(lambda: kernels.grad_input(g, w)),
        "wgrad": lambda: kernels.grad_params(g, x),
        "wgrad, grad_y transposed": lambda: kernels.grad_params(gt, x),
        "wgrad, grad_y misaligned": lambda: kernels.grad_params(gm, x),
        "wgrad, x transposed": lambda: kernels.grad_params(g, xt),
        "wgrad, fewer rows": lambda: kernels.grad_params(g[:-8], x[:-8]),
        "wgrad, x narrower": lambda: kernels.grad_params(g, x[:, :-8]),
        "wgrad, grad_y narrower": lambda: kernels.grad_params(g[:, :-8], x),
        "wgrad, x misaligned": lambda: kernels.grad_params(g, xm),
        "wgrad, no bias": lambda: kernels.grad_params(g, x, bias=False),
        "wgrad, bf16": lambda: kernels.grad_params(g16, x16),
        "wgrad, tf32": tf32(lambda: kernels.grad_params(g, x)),
    }


def test_a_launch_found_by_its_tensors_facts_runs_the_plan_derived_for_them(device, fresh_plans, monkeypatch):
    """Eager launches keep their plans under the raw facts of their tensors (plan.calls), so that a repeat call
    skips deriving the plan's arguments: every fact a plan reads must be in that key. Calls of one size that
    differ in one such fact each, run first each with the caches empty (the plan derived), then each again after
    all of them (found under its key): the same bits and the same path counts (path, copies, descriptors,
    config source) and the same launches (grid, integer and compile-time arguments), or a key that missed a fact
    handed one call another's plan."""
    launched, real_launch = [], matmul.launch

    def spy(kernel, spec, args):
        launched.append((spec.grid, spec.ints, spec.kwargs))
        real_launch(kernel, spec, args)

    monkeypatch.setattr(matmul, "launch", spy)

    def run(call):
        before = kernels.path_counts.copy()
        launched.clear()
        out = call()
        # (on a GPU a plan's first launch goes through Triton and later ones directly: not a difference of plans)
        counts = {k: v for k, v in (kernels.path_counts - before).items() if k != "direct_launch"}
        return out, counts, list(launched)

    variants = _variants(device)
    derived = {}
    for name, call in variants.items():
        plan.clear_caches()
        derived[name] = run(call)
    for call in variants.values():
        call()
    for name, call in variants.items():
        out, counts, launches = run(call)
        want_out, want_counts, want_launches = derived[name]
        assert counts == want_counts and launches == want_launches, name
        for got, want in zip(
            out if isinstance(out, tuple) else (out,), want_out if isinstance(want_out, tuple) else (want_out,)
        ):
            assert (got is None and want is None) or torch.equal(got, want), name
    # A pinned config is the launch's whatever its tensors' plan was: such launches neither use nor fill the key.
    before = kernels.path_counts["config_pinned"]
    with configs.pin_config(configs.ROUTE_PROBE):
        variants["fwd"]()
    assert kernels.path_counts["config_pinned"] == before + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_path_warns_once_and_computes_the_same_function(monkeypatch, fresh_plans, dtype):
    monkeypatch.setattr(jit, "INTERPRETED", False)
    monkeypatch.setattr(matmul, "_warned_torch_path", False)
    assert kernels.kernel_path("cpu") == "torch"
    gen = torch.Generator().manual_seed(0)
    x, w, b = (make_tensor(s, "contiguous", dtype, "cpu", gen) for s in ((6, 9), (4, 9), (4,)))
    with pytest.warns(UserWarning, match="torch path"):
        y = kernels.linear(x, w, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad_w, grad_b = kernels.grad_params(y, x)
    ref, mag = linear_reference(x, w, b)
    assert_close("y", y, ref, mag, tol(dtype, 9))
    ref, mag = linear_reference(y.t(), x.t())
    assert_close("grad_w", grad_w, ref, mag, tol(dtype, 6))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="tensor descriptors on a GPU (sm_90 or newer)",
)
def test_descriptor_scratch_is_reused_per_stream():
    """Launches on one stream share one scratch buffer for their descriptors; another stream gets its own (with a
    config that makes descriptors)."""
    x, w = (torch.randn(64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    launch._kept.clear()
    with configs.pin_config(configs.ROUTE_PROBE):
        y, again = kernels.linear(x, w), kernels.linear(x, w)
        assert len(launch._kept) == 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            other = kernels.linear(x, w)
    torch.cuda.synchronize()
    assert len(launch._kept) == 2
    assert torch.equal(y, again) and torch.equal(y, other)
    assert_close("y", y, *linear_reference(x, w), tol(torch.bfloat16, 64))


def test_an_operator_reuses_the_kept_scratch_on_the_default_stream_only(device):
    """The registered operators reuse the buffers eager launches keep (a split-K launch's counters; on sm_90 the
    descriptors' scratch) on the device's default stream, where a compiled graph without CUDA graphs runs them.
    Off it they take fresh ones, kept nowhere: torch.compile's CUDA graphs warm up and capture on a stream of their
    own, into a private pool where a kept buffer would count as a leak (test_compile.py's reduce-overhead test)."""
    gen = torch.Generator().manual_seed(0)
    x, w = (make_tensor((64, 256), "contiguous", torch.float16, device, gen) for _ in range(2))
    launch._kept.clear()
    with configs.pin_config(configs.KernelConfig(64, 64, 64, num_warps=4, num_stages=2, split_k=2)):
        y = torch.ops.fused_tp.linear(x, w, None, "")
        kept = {key: id(buf) for key, buf in launch._kept.items()}
        assert "counters" in {key[0] for key in kept}, kept
        outs = [torch.ops.fused_tp.linear(x, w, None, "")]
        assert {key: id(buf) for key, buf in launch._kept.items()} == kept, "the operator's buffers were not reused"
        if device == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outs.append(torch.ops.fused_tp.linear(x, w, None, ""))
            torch.cuda.current_stream().wait_stream(side)
            assert {key: id(buf) for key, buf in launch._kept.items()} == kept, "a side stream's buffer was kept"
    assert all(torch.equal(y, out) for out in outs)
    assert_close("y", y, *linear_reference(x, w), tol(torch.float16, 256))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels on a GPU")
def test_repeat_launches_call_the_compiled_kernel_directly():
    """After the first launch of a specialisation, launches skip Triton's argument binding and call the compiled
    kernel: the same bits as the first launch, and each new specialisation (other strides, an address off 16
    bytes, another dtype) takes its own kernel and gives the right result."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for x_layout, w_layout in (("contiguous", "contiguous"), ("sliced", "transposed"), ("expanded", "sliced")):
            x = make_tensor((96, 200), x_layout, dtype, "cuda", gen)
            w = make_tensor((72, 200), w_layout, dtype, "cuda", gen)
            b = make_tensor((72,), "contiguous", dtype, "cuda", gen)
            before = kernels.path_counts["direct_launch"]
            runs = [
                (kernels.linear(x, w, b), kernels.grad_input(x @ w.t(), w), *kernels.grad_params(x @ w.t(), x))
                for _ in range(3)
            ]
            # 3 launches in each of the last two rounds: over 96 tokens the weight gradient's writes the bias's too
            assert kernels.path_counts["direct_launch"] - before >= 6
            for again in runs[1:]:
                assert all(torch.equal(u, v) for u, v in zip(runs[0], again))
            assert_close("y", runs[0][0], *linear_reference(x, w, b), tol(dtype, 200, tf32=_tf32("cuda")))
    buf = torch.randn(40 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(48, 64, device="cuda", dtype=torch.bfloat16)
    for x in (buf[:-1].view(40, 64), buf[1:].view(40, 64)):  # the second starts 2 bytes past a 16-byte boundary
        y = kernels.linear(x, w)
        assert torch.equal(kernels.linear(x, w), y)
        assert_close("y", y, *linear_reference(x, w), tol(torch.bfloat16, 64))


def test_a_direct_launch_passes_addresses_and_runs_on_its_tensors_device(monkeypatch):
    """What a direct launch hands Triton's C launcher (launch.launch): the grid, the current stream of the tensors'
    device, the entry's flags and metadata, the tensors as their integer addresses, then the integer and
    compile-time arguments; where another device is current, inside torch.cuda.device(the tensors' device), the
    current one restored after. Stand-ins for CUDA and the compiled kernel: this runs without a GPU (the GPU tests
    launch the real kernels both ways)."""
    from types import SimpleNamespace as NS

    current, calls, entered = [0], [], []

    class device_guard:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)
            self.before, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.before

    monkeypatch.setattr(launch, "DIRECT", True)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: current[0], raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 1000 + index, raising=False)
    monkeypatch.setattr(torch.cuda, "device", device_guard)
    record = lambda *args: calls.append((current[0], args))  # noqa: E731
    spec = plan.Launch((3, 1, 1), (5, 7), {"BLOCK_M": 64}, 1)
    spec.direct = (record, "function", "metadata", (False, True), 0, (64,), NS())
    a, b = torch.zeros(4), torch.zeros(2, 3)[:, 1:]
    for current[0] in (1, 0):
        calls.clear()
        launch.launch(None, spec, (a, b))
        want = (3, 1, 1, 1001, "function", False, True, None, None, "metadata", None, None, None)
        assert calls == [(1, (*want, a.data_ptr(), b.data_ptr(), 5, 7, 64))]
    assert entered == [1] and current[0] == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two GPUs")
def test_tensors_on_a_gpu_other_than_the_current_one():
    """Triton launches on the current device; the products launch on their tensors' (as F.linear does), through
    Triton and directly alike: the same bits as with that device current, and the current device left as it was."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = (make_tensor(s, "contiguous", torch.bfloat16, "cuda:1", gen) for s in ((64, 96), (80, 96), (80,)))
    g = make_tensor((64, 80), "contiguous", torch.bfloat16, "cuda:1", gen)

    def run():
        return kernels.linear(x, w, b), kernels.grad_input(g, w), *kernels.grad_params(g, x)

    with torch.cuda.device(1):
        want = run()
    with torch.cuda.device(0):
        runs = [run() for _ in range(3)]  # the first launch of each plan may compile; the later ones are direct
        assert torch.cuda.current_device() == 0
    for got in runs:
        assert all(u.device == torch.device("cuda:1") and torch.equal(u, v) for u, v in zip(got, want))
    assert_close("y", want[0], *linear_reference(x, w, b), tol(torch.bfloat16, 96))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels on a GPU")
def test_launch_hooks_see_direct_launches_too():
    """A launch hook (what profilers install) is called for every launch, the direct ones included; with none
    installed the direct launch passes the launcher no hook."""
    from triton import knobs

    seen = []
    x, w = (torch.randn(32, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kernels.linear(x, w)  # compiled: later launches of this specialisation are direct
    chain = knobs.runtime.launch_enter_hook
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    if hasattr(chain, "add"):
        chain.add(hook)
    else:  # releases that keep a single hook rather than a chain
        knobs.runtime.launch_enter_hook = hook
    try:
        before = kernels.path_counts["direct_launch"]
        kernels.linear(x, w)
        kernels.linear(x, w)
        assert kernels.path_counts["direct_launch"] - before == 2
    finally:
        if hasattr(chain, "add"):
            chain.remove(hook)
        else:
            knobs.runtime.launch_enter_hook = chain
    assert len(seen) == 2 and all(m is not None for m in seen)
    assert launch.hook(knobs.runtime.launch_enter_hook) is None


def test_direct_launch_is_gated_by_version_and_switch():
    """The direct launch through Triton's compiled-kernel internals is on only for the Triton versions it was run
    with on a GPU, and FUSED_TP_DIRECT_LAUNCH=0 turns it off; the cache of compiled kernels is the plans' own,
    bounded."""
    import os

    want = launch.TRITON_VERSION in launch.TESTED_TRITON and os.environ.get("FUSED_TP_DIRECT_LAUNCH", "1") != "0"
    assert launch.DIRECT == want
    assert plan.matmul_plan.cache_info().maxsize == plan.colsum_plan.cache_info().maxsize == plan.PLAN_CACHE_SIZE


def test_the_direct_entry_gives_triton_s_launcher_what_its_own_call_would():
    """What a direct launch passes Triton's C launcher besides the arguments (launch._direct_entry): the launcher's
    flags, the compiled function and metadata, and the descriptor scratch CudaLauncher.__call__ would allocate
    (scratch per program x programs x CTAs); none where only Triton's Python launcher can serve the launch (a
    kernel built with profile scratch, a launch function wrapped for host-made descriptors), so those launches
    keep going through kernel[grid]. Stand-ins for the compiled kernel: this runs without a GPU."""
    from types import SimpleNamespace as NS

    spec = plan.Launch((33, 2, 1), (5, 7), {"BLOCK_M": 64, "HAS_BIAS": True}, 0)
    kernel = NS(params=[NS(name="BLOCK_M", is_constexpr=True), NS(name="x", is_constexpr=False)])

    def compiled(profile_scratch=0, launch_fn=len, ctas=2):
        run = NS(launch=launch_fn, num_ctas=ctas, launch_cooperative_grid=False, launch_pdl=True)
        meta = NS(global_scratch_size=384, profile_scratch_size=profile_scratch)
        return NS(run=run, metadata=meta, function=1234, packed_metadata=(4, 1, 0))

    c = compiled()
    assert launch._direct_entry(kernel, spec, c) == (len, 1234, (4, 1, 0), (False, True), 384 * 66 * 2, (64,), c)
    assert launch._direct_entry(kernel, spec, compiled(profile_scratch=8)) is None
    assert launch._direct_entry(kernel, spec, compiled(launch_fn=lambda *a: None)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels on a GPU")
def test_the_plain_launch_gives_the_direct_launches_bits(monkeypatch):
    """With the direct launch switched off (an untested Triton, or FUSED_TP_DIRECT_LAUNCH=0), every launch goes
    through kernel[grid]: the same kernels, the same bits, no direct launch counted."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = (make_tensor(s, "contiguous", torch.bfloat16, "cuda", gen) for s in ((300, 96), (80, 96), (80,)))
    g = make_tensor((300, 80), "contiguous", torch.bfloat16, "cuda", gen)

    def run():
        return kernels.linear(x, w, b, activation="gelu"), kernels.grad_input(g, w), *kernels.grad_params(g, x)

    run()
    direct = run()
    monkeypatch.setattr(launch, "DIRECT", False)
    before = kernels.path_counts["direct_launch"]
    plain = run()
    assert kernels.path_counts["direct_launch"] == before
    assert all(torch.equal(u, v) for u, v in zip(direct, plain))
