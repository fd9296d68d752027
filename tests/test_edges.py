"""Edges of the contract: NaN and Inf, determinism, what is saved for backward, unsupported uses, and adversarial
inputs to the layers (odd views, outputs of earlier ops, frozen parameters)."""

import dataclasses
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from strategies import dims, dtypes, layouts, make_tensor, seeds
from torch import nn

import fused_tp
from fused_tp import kernels
from fused_tp.kernels import configs
from fused_tp.tolerance import MLP_STAGES, assert_close, layer_reference, linear_reference, mlp_reference, tol

SPECIALS = (float("nan"), float("inf"), float("-inf"))
small = st.one_of(st.sampled_from([1, 2, 3, 67]), st.integers(1, 40))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of t, so that equality holds for NaNs too."""
    return t.contiguous().view(torch.uint8)


def _op(op, tensors):
    """(run, float64 reference, K) of one of the three products on named operands."""
    if op == "forward":
        x, w, b = tensors["x"], tensors["w"], tensors["b"]
        return (lambda: kernels.linear(x, w, b)), lambda: x.double() @ w.double().T + b.double(), x.shape[-1]
    if op == "grad_input":
        g, w = tensors["g"], tensors["w"]
        return (lambda: kernels.grad_input(g, w)), lambda: g.double() @ w.double(), g.shape[-1]
    g, x = tensors["g"], tensors["x"]
    return (lambda: kernels.grad_params(g, x)), lambda: (g.double().T @ x.double(), g.double().sum(0)), g.shape[0]


@given(
    M=small,
    K=small,
    N=small,
    dtype=dtypes,
    op=st.sampled_from(["forward", "grad_input", "grad_params"]),
    split_k=st.sampled_from([None, 2]),
    specials=st.lists(
        st.tuples(st.sampled_from(["x", "w", "b", "g"]), st.floats(0, 1, exclude_max=True), st.sampled_from(SPECIALS)),
        min_size=1,
        max_size=3,
    ),
    seed=seeds,
)
@example(
    M=3,
    K=4,
    N=5,
    dtype=torch.bfloat16,
    op="forward",
    split_k=None,
    seed=0,
    specials=[("x", 0.0, float("inf")), ("w", 0.0, float("-inf"))],
)  # inf * -inf = -inf, summed with others
@example(
    M=3,
    K=4,
    N=5,
    dtype=torch.float16,
    op="grad_params",
    split_k=2,
    seed=0,
    specials=[("g", 0.5, float("inf")), ("g", 0.9, float("-inf"))],
)  # inf - inf = NaN in a column sum
def test_nan_and_inf_propagate_as_in_f_linear(device, M, K, N, dtype, op, split_k, specials, seed):
    """NaN and +-Inf in any operand give NaN and +-Inf exactly where F.linear and the float64 result have them (no
    masking, no zeroing, including the split-K path); every other element is within the usual tolerance."""
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(x=(M, K), w=(N, K), b=(N,), g=(M, N))
    tensors = {name: make_tensor(shape, "contiguous", dtype, "cpu", gen) for name, shape in shapes.items()}
    for name, where, value in specials:
        flat = tensors[name].view(-1)
        flat[int(where * flat.numel())] = value
    tensors = {name: t.to(device) for name, t in tensors.items()}
    run, reference, k = _op(op, tensors)
    base, _ = kernels.pick_config(M, N, K, dtype, interpreted=kernels.INTERPRETED, tma=False, slots=1)
    cfg = dataclasses.replace(base, split_k=split_k)
    with configs.pin_config(cfg):
        outs = run()
    refs, t = reference(), tensors
    if op == "grad_params":
        theirs = (t["g"].T @ t["x"], t["g"].sum(0))
    else:
        outs, refs = (outs,), (refs,)
        theirs = (F.linear(t["x"], t["w"], t["b"]),) if op == "forward" else (t["g"] @ t["w"],)
    for out, ref, torch_out in zip(outs, refs, theirs):
        out, ref = out.cpu(), ref.cpu()
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(out), kind(ref)), f"{op}: {kind.__name__} differs from the float64 result"
            assert torch.equal(kind(out), kind(torch_out.cpu())), f"{op}: {kind.__name__} differs from torch's"
        finite = ref.isfinite()
        mag = ref.abs()  # only finite elements are compared; their magnitudes need no special values
        assert_close(op, out[finite], ref[finite], mag[finite] + 10, tol(dtype, k))


@given(M=dims, K=dims, N=dims, dtype=dtypes, a_layout=layouts, b_layout=layouts, seed=seeds)
def test_kernels_are_bitwise_deterministic(device, M, K, N, dtype, a_layout, b_layout, seed):
    """The same inputs give the same bits, run after run, for all three products (fixed configs and sum order)."""
    gen = torch.Generator().manual_seed(seed)
    x, w = make_tensor((M, K), a_layout, dtype, device, gen), make_tensor((N, K), b_layout, dtype, device, gen)
    b, g = make_tensor((N,), "contiguous", dtype, device, gen), make_tensor((M, N), a_layout, dtype, device, gen)
    runs = [(kernels.linear(x, w, b), kernels.grad_input(g, w), *kernels.grad_params(g, x)) for _ in range(2)]
    for name, first, again in zip(("y", "grad_x", "grad_w", "grad_b"), *runs):
        assert torch.equal(_bits(first), _bits(again)), f"{name} differs between two runs"


def _saved(fn):
    """The tensors autograd saved while fn() ran, as (shape, dtype), and fn's result."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("x_grad, w_grad", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("cls", [fused_tp.ColumnParallelLinear, fused_tp.RowParallelLinear])
def test_forward_saves_only_what_backward_needs(device, cls, x_grad, w_grad):
    """x is saved only if the weight takes a gradient, the weight only if x does; never more bytes than the
    nn.Linear it replaces saves; nothing under no_grad or inference mode."""
    dense = nn.Linear(24, 16, device=device)
    layer = cls.from_linear(dense)
    for module in (dense, layer):
        module.weight.requires_grad_(w_grad)
    x = torch.randn(8, 24, device=device, requires_grad=x_grad)
    saved, y = _saved(lambda: layer(x))
    expected = ([((8, 24), torch.float32)] if w_grad else []) + ([((16, 24), torch.float32)] if x_grad else [])
    assert sorted(saved) == sorted(expected)
    theirs, _ = _saved(lambda: dense(x))
    nbytes = lambda s: sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in s)  # noqa: E731
    assert nbytes(saved) <= nbytes(theirs)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            saved, y = _saved(lambda: layer(x))
        assert saved == [] and y.grad_fn is None and not y.requires_grad


@pytest.mark.parametrize("x_grad, w_grad", [(True, True), (True, False), (False, True), (False, False)])
def test_parallel_mlp_saves_no_more_than_the_dense_mlp(device, monkeypatch, x_grad, w_grad):
    """ParallelMLP saves no more bytes than Linear -> GELU -> Linear; without grad it saves nothing and does not
    write the pre-activation at all."""
    dense = nn.Sequential(nn.Linear(24, 40, device=device), nn.GELU(), nn.Linear(40, 24, device=device))
    mlp = fused_tp.ParallelMLP.from_linears(dense[0], dense[2])
    for module in (dense, mlp):
        for p in module.parameters():
            p.requires_grad_(w_grad)
    x = torch.randn(8, 24, device=device, requires_grad=x_grad)
    saved, _ = _saved(lambda: mlp(x))
    theirs, _ = _saved(lambda: dense(x))
    nbytes = lambda s: sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in s)  # noqa: E731
    assert nbytes(saved) <= nbytes(theirs)
    save_pre = []
    real = fused_tp.kernels.ops.linear
    monkeypatch.setattr(
        fused_tp.kernels.ops, "linear", lambda *a, **k: save_pre.append(k.get("save_pre", False)) or real(*a, **k)
    )
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            saved, y = _saved(lambda: mlp(x))
        assert saved == [] and y.grad_fn is None and not y.requires_grad
    assert save_pre and not any(save_pre)


@pytest.mark.parametrize("rows, fc2_first", [(6, False), (200, True)])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_parallel_mlp_drops_each_activation_after_its_last_use(device, monkeypatch, activation, rows, fc2_first):
    """What the MLP saves of its own making, the activation a and the pre-activation (3 T x F of SwiGLU), and
    grad_pre, which it makes in backward, are each freed after their last use: pre once grad_pre is made, grad_pre
    once fc1's gradients are done, a once fc2's weight gradient is. Over few rows fc2's gradients run last, beside a
    alone (so SwiGLU's last weight gradient is allocated beside T x F, as LlamaMLP's is); over many, where the
    activations outweigh the weight gradients, first, so that a is gone before grad_pre is made. With
    retain_graph=True a and pre stay for the second backward, which gives the first's gradients again."""
    torch.manual_seed(0)
    mlp = fused_tp.ParallelMLP(16, 12, 16, activation=activation, device=device)
    x = torch.randn(rows, 16, device=device, requires_grad=True)
    made = []  # weak references to every saved tensor but the input and the parameters: a, then pre

    def pack(t):
        if t is not x and all(t is not p for p in mlp.parameters()):
            made.append(weakref.ref(t))
        return t

    real_grad_input, real_grad_params, real_grads = (
        getattr(fused_tp.kernels.ops, f) for f in ("grad_input", "grad_params", "grads")
    )
    grad_pre, alive_at = [], []  # alive_at: (a, pre[, grad_pre once made]) alive at each weight gradient's product

    def grad_input(*args, **kw):
        out = real_grad_input(*args, **kw)
        grad_pre.append(weakref.ref(out))
        return out

    def grad_params(*args, **kw):
        alive_at.append(tuple(r() is not None for r in made + grad_pre[:1]))  # (grad_input's second: grad_x)
        return real_grad_params(*args, **kw)

    def grads(*args, **kw):  # over few rows fc1's grad_x and weight gradient, one launch: a weight gradient too
        alive_at.append(tuple(r() is not None for r in made + grad_pre[:1]))
        return real_grads(*args, **kw)

    monkeypatch.setattr(fused_tp.kernels.ops, "grad_input", grad_input)
    monkeypatch.setattr(fused_tp.kernels.ops, "grad_params", grad_params)
    monkeypatch.setattr(fused_tp.kernels.ops, "grads", grads)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mlp(x)
    assert len(made) == 2
    # (fc1's gradients, fc2's) or (fc2's, fc1's), first with retain_graph, then without
    kept, freed = (
        ([(True, True), (True, True, True)], [(True, True), (False, False, True)])
        if fc2_first
        else ([(True, True, True), (True, True, False)], [(True, False, True), (True, False, False)])
    )
    y.backward(torch.ones_like(y), retain_graph=True)
    assert alive_at == kept
    first = [t.grad.clone() for t in (x, *mlp.parameters())]
    for t in (x, *mlp.parameters()):
        t.grad = None
    grad_pre.clear(), alive_at.clear()
    y.backward(torch.ones_like(y))
    assert alive_at == freed
    assert all(r() is None for r in made)
    for before, t in zip(first, (x, *mlp.parameters())):
        assert torch.equal(t.grad, before)


@pytest.mark.parametrize("tokens, fc2_first", [(512, False), (1024, False), (2048, False), (8192, True)])
def test_parallel_mlp_backward_order_follows_the_sizes(tokens, fc2_first):
    """The reckoning behind that order, at Llama-3-8B's SwiGLU MLP (4096 -> 14336) on one rank: fc2's gradients
    last up to 2048 tokens, where the weight gradients outweigh the activations, first at 8192, as the H100's
    measured step peaks say (bench/NOTES.md, attempts 98 and 99: 358 / 380 / 424 MiB at 512-2048 tokens, 1072
    against 1184 at 8192)."""
    from fused_tp.autograd import _fc2_grads_first

    x, w1 = torch.empty(tokens, 4096, device="meta"), torch.empty(2 * 14336, 4096, device="meta")
    assert _fc2_grads_first(tokens, 2 * 14336, 14336, 4096, x, w1, True, False) == fc2_first


@pytest.mark.parametrize("kind", ["row", "parallel_mlp"])
@pytest.mark.parametrize("tokens", [3, configs.ROW_SUM_MAX_K + 1])
def test_a_row_layer_alone_on_its_group_takes_its_bias_gradient_from_the_weight_gradients_launch(device, kind, tokens):
    """With no other rank, no replica of the row layer's bias must match its gradient's bits, so over at most
    configs.ROW_SUM_MAX_K tokens the weight gradient's launch writes it (path_counts["row_sum"], one launch fewer),
    as a column layer's does: RowParallelLinear's and ParallelMLP's fc2 (whose fc1 is a column layer), against the
    float64 reference. On more ranks the column-sum kernel writes it (tests/test_dist.py)."""
    gen = torch.Generator().manual_seed(0)
    lin1, lin2 = nn.Linear(24, 40).to(device), nn.Linear(40, 24).to(device)
    if kind == "row":
        layer, fused = fused_tp.RowParallelLinear.from_linear(lin2), 1
        x = make_tensor((tokens, 40), "contiguous", torch.float32, device, gen)
    else:
        layer, fused = fused_tp.ParallelMLP.from_linears(lin1, lin2), 2
        x = make_tensor((tokens, 24), "contiguous", torch.float32, device, gen)
    grad_y = make_tensor((tokens, 24), "contiguous", torch.float32, device, gen)
    y = layer(x.requires_grad_())
    before = kernels.path_counts.copy()
    y.backward(grad_y)
    counts = kernels.path_counts - before
    # a row layer's launch, and ParallelMLP's fc1's as a column layer's
    assert counts["row_sum"] == (fused if tokens <= configs.ROW_SUM_MAX_K else 0), dict(counts)
    g64 = grad_y.double().cpu()
    bias = layer.bias if kind == "row" else layer.fc2.bias
    assert_close("grad_b", bias.grad, g64.sum(0), g64.abs().sum(0), tol(torch.float32, tokens))


@pytest.mark.parametrize(
    "kind", ["column", "column, gather_output", "row", "row, input_is_parallel=False", "parallel_mlp"]
)
def test_where_autograd_records_nothing_the_layers_skip_their_function(device, monkeypatch, kind):
    """Under no_grad (or with nothing requiring grad) a layer call runs its kernels without its autograd Function,
    whose bookkeeping would cost host time for nothing, and gives the Function's output bitwise."""
    from fused_tp import autograd

    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(16, 40, device=device), nn.Linear(40, 16, device=device)
    col, row = fused_tp.ColumnParallelLinear.from_linear, fused_tp.RowParallelLinear.from_linear
    layer, width = {
        "column": (col(fc1), 16),
        "column, gather_output": (col(fc1, gather_output=True), 16),
        "row": (row(fc2), 40),
        "row, input_is_parallel=False": (row(fc2, input_is_parallel=False), 40),
        "parallel_mlp": (fused_tp.ParallelMLP.from_linears(fc1, fc2), 16),
    }[kind]
    x = torch.randn(5, width, device=device)
    with_function = layer(x)
    assert with_function.grad_fn is not None
    functions = (
        autograd._ColumnParallelLinear,
        autograd._RowParallelLinear,
        autograd._Mlp,
        autograd._GatherLastDim,
    )
    for fn in functions:
        for entry in ("apply", "c_apply"):  # Function.apply, and the C apply the layers call eagerly (autograd._apply)
            monkeypatch.setattr(fn, entry, lambda *args: pytest.fail("an autograd Function ran"))
    with torch.no_grad():
        y = layer(x)
    for p in layer.parameters():
        p.requires_grad_(False)
    frozen = layer(x)
    assert torch.equal(y, with_function) and torch.equal(frozen, with_function) and frozen.grad_fn is None


def _layer(kind: str, device):
    """(a layer of `kind`, its input width): Column, Row, or a ParallelMLP."""
    fc1, fc2 = nn.Linear(6, 10, device=device), nn.Linear(10, 6, device=device)
    if kind == "column":
        return fused_tp.ColumnParallelLinear.from_linear(fc1), 6
    if kind == "row":
        return fused_tp.RowParallelLinear.from_linear(fc2), 10
    return fused_tp.ParallelMLP.from_linears(fc1, fc2), 6


@pytest.mark.parametrize("kind", ["column", "row", "parallel_mlp"])
def test_a_second_derivative_raises(device, kind):
    """A backward with create_graph through a layer raises, naming create_graph, where a second derivative would
    silently leave out the layer's terms: torch.autograd.grad of a gradient penalty with respect to an input that
    also reaches the loss by another path (torch's once_differentiable, used before, prunes its error node there
    and returns the other path's terms alone). First-order gradients are unaffected."""
    torch.manual_seed(0)
    layer, width = _layer(kind, device)
    x = torch.randn(3, width, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(layer(x).pow(2).sum() + x.pow(3).sum(), x, create_graph=True)
    (grad_x,) = torch.autograd.grad(layer(x).pow(2).sum() + x.pow(3).sum(), x)
    assert grad_x.isfinite().all() and grad_x.grad_fn is None


@pytest.mark.parametrize("kind", ["column", "row", "parallel_mlp"])
def test_a_tensor_left_by_a_functorch_transform_runs_as_its_value(device, kind):
    """The layers call their Functions past Function.apply's Python (host time: autograd._apply), which first
    unwraps functorch's dead wrappers (a tensor kept from inside torch.func.grad, whose transform has returned):
    fed one, a layer gives what it gives for the plain tensor, output and gradients, as Function.apply does."""
    torch.manual_seed(0)
    layer, width = _layer(kind, device)
    x = torch.randn(3, width, device=device)
    kept = []

    def f(t):
        kept.append(t * 1)
        return kept[-1].sum()

    torch.func.grad(f)(x)
    assert torch._C._functorch.is_functorch_wrapped_tensor(kept[0])  # a dead wrapper, not yet a tensor
    grads = []
    for inp in (x, kept[0]):
        y = layer(inp)
        y.backward(torch.ones_like(y))
        grads.append([p.grad.clone() for p in layer.parameters()])
        layer.zero_grad(set_to_none=True)
        assert torch.equal(y, layer(x))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_at_world_size_1_is_torchs(device, norm_type):
    """At world size 1 (no collective) fused_tp.clip_grad_norm_ gives torch.nn.utils.clip_grad_norm_'s total and
    clipped gradients on the same model (a LayerNorm and a ParallelMLP: replicated and layer parameters)."""
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(6, 10, device=device), nn.Linear(10, 6, device=device)
    x = torch.randn(4, 6, device=device)
    grads, totals = [], []
    for clip in ("torch", "fused_tp"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.LayerNorm(6, device=device), fused_tp.ParallelMLP.from_linears(fc1, fc2))
        model(x).pow(2).sum().backward()
        if clip == "torch":
            totals.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01, norm_type))
        else:
            totals.append(fused_tp.clip_grad_norm_(model, 0.01, norm_type))
        grads.append([p.grad for p in model.parameters()])
    assert totals[0] > 0.01  # clipped
    torch.testing.assert_close(totals[1], totals[0], rtol=1e-6, atol=0)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("kind", ["column", "row", "parallel_mlp"])
def test_activation_checkpointing_gives_the_steps_bits(device, kind, use_reentrant):
    """torch.utils.checkpoint over a layer (its forward run again in backward, under the state checkpoint restores):
    the output and every gradient bitwise equal to the step without it."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer, width = _layer(kind, device)
    x = torch.randn(3, width, device=device)
    steps = []
    for run in (layer, lambda t: checkpoint(layer, t, use_reentrant=use_reentrant)):
        leaf = x.clone().requires_grad_()
        y = run(leaf)
        y.backward(torch.ones_like(y))
        steps.append([y, leaf.grad] + [p.grad for p in layer.parameters()])
        layer.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(*steps, strict=True))


@pytest.mark.parametrize("kind", ["column", "row", "parallel_mlp"])
@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_under_functorch_transforms_the_layers_raise_what_function_apply_raises(device, kind, transform):
    """functorch's transforms need an autograd Function with setup_context, which the layers' do not define: under
    one, a layer goes through Function.apply (not the C apply its eager calls take), whose clear error names that,
    rather than an internal assertion of functorch's."""
    layer, width = _layer(kind, device)
    x = torch.randn(3, width, device=device)
    run = torch.func.vmap(layer) if transform == "vmap" else torch.func.grad(lambda t: layer(t).sum())
    with pytest.raises(RuntimeError, match="it must override the setup_context staticmethod"):
        run(x)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", ["float32", "the autocast dtype"])
@pytest.mark.parametrize(
    "kind", ["column", "column, gather_output", "row", "row, input_is_parallel=False", "gelu", "swiglu"]
)
def test_under_autocast_the_layers_compute_as_nn_linear_does(device, kind, input_dtype, autocast_dtype):
    """Inside torch.autocast the layers take what nn.Linear takes there, fp32 parameters with an input of fp32 or of
    the autocast dtype (not a dtype mismatch), compute in the autocast dtype, return it, and give the fp32
    parameters fp32 gradients: every value against the float64 reference on the operands cast to that dtype, every
    dtype against the dense modules' under the same autocast."""
    torch.manual_seed(0)
    fc1, fc2, up = nn.Linear(8, 12, device=device), nn.Linear(12, 8, device=device), nn.Linear(8, 12, device=device)
    col, row = fused_tp.ColumnParallelLinear.from_linear, fused_tp.RowParallelLinear.from_linear
    layer, dense, width = {
        "column": (col(fc1), fc1, 8),
        "column, gather_output": (col(fc1, gather_output=True), fc1, 8),
        "row": (row(fc2), fc2, 12),
        "row, input_is_parallel=False": (row(fc2, input_is_parallel=False), fc2, 12),
        "gelu": (fused_tp.ParallelMLP.from_linears(fc1, fc2), nn.Sequential(fc1, nn.GELU(), fc2), 8),
        "swiglu": (fused_tp.ParallelMLP.from_gated(fc1, up, fc2), None, 8),
    }[kind]
    x = torch.randn(5, width, device=device)
    x = (x if input_dtype == "float32" else x.to(autocast_dtype)).requires_grad_()
    with torch.autocast(torch.device(device).type, dtype=autocast_dtype):
        y = layer(x)
        dense_dtype = (dense or fc1)(x).dtype
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert y.dtype == dense_dtype == autocast_dtype and x.grad.dtype == x.dtype
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())
    low = {n: p.detach().to(autocast_dtype) for n, p in layer.named_parameters()}
    x_low = x.detach().to(autocast_dtype)
    if kind in ("gelu", "swiglu"):
        ref, mag = mlp_reference(x_low, *low.values(), grad_y, "swiglu" if kind == "swiglu" else "gelu")
        names = dict(zip(("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"), ("w1", "b1", "w2", "b2")))
        ref_mag = {"y": (ref["y"], mag["y"]), "grad_x": (ref["grad_x"], mag["grad_x"])}
        ref_mag.update({n: (ref["grad_" + k], mag["grad_" + k]) for n, k in names.items()})
        t = tol(autocast_dtype, 24, stages=MLP_STAGES)
    else:
        ref = layer_reference(x_low, low["weight"], low["bias"], grad_y)
        ref_mag = {"y": ref["y"], "grad_x": ref["grad_x"], "weight": ref["grad_w"], "bias": ref["grad_b"]}
        t = tol(autocast_dtype, 12)
    assert_close("y", y, *ref_mag.pop("y"), t)
    assert_close("grad_x", x.grad, *ref_mag.pop("grad_x"), t)
    for name, p in layer.named_parameters():
        assert_close(f"grad of {name}", p.grad, *ref_mag[name], t)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_kernels_linear_keeps_f_linears_contract_under_autocast(device, autocast_dtype):
    """kernels.linear inside torch.autocast, as F.linear there: fp32 operands, or an input already in the autocast
    dtype with fp32 weights, give kernels.linear of the operands cast to that dtype, bit for bit, in F.linear's
    dtype there."""
    torch.manual_seed(0)
    x, w, b = (torch.randn(*s, device=device) for s in ((5, 8), (6, 8), (6,)))
    ref = kernels.linear(x.to(autocast_dtype), w.to(autocast_dtype), b.to(autocast_dtype))
    with torch.autocast(torch.device(device).type, dtype=autocast_dtype):
        outs = [kernels.linear(x, w, b), kernels.linear(x.to(autocast_dtype), w, b)]
        dense_dtype = F.linear(x, w, b).dtype
    assert dense_dtype == ref.dtype == autocast_dtype and all(torch.equal(y, ref) for y in outs)


def _view(kind, shape, dtype, device, gen, grad):
    """An input of `shape` [M, K] made the way earlier ops hand it over; returns (leaf, view)."""
    M, K = shape
    values = lambda *s: torch.randn(s, generator=gen).to(dtype).to(device)  # noqa: E731
    if kind == "overlapping":  # rows share elements: x[i, j] = base[i + j]
        base = values(M + K).requires_grad_(grad)
        return base, base.as_strided((M, K), (1, 1))
    if kind == "step-2 slice":
        base = values(M, 2 * K).requires_grad_(grad)
        return base, base[:, ::2]
    if kind == "permuted":  # [K, M] from a 3-D op's output, read as [M, K] through a permute
        base = values(1, K, M).requires_grad_(grad)
        return base, (base * 1).permute(0, 2, 1)[0]
    if kind == "transposed matmul output":
        base = values(K, 3).requires_grad_(grad)
        return base, (base @ values(3, M)).t()
    if kind == "expanded":
        base = values(1, K).requires_grad_(grad)
        return base, base.expand(M, K)
    base = values(M, K).requires_grad_(grad)
    return base, base


VIEWS = ("contiguous", "overlapping", "step-2 slice", "permuted", "transposed matmul output", "expanded")


@given(
    M=dims,
    K=dims,
    N=dims,
    dtype=dtypes,
    view=st.sampled_from(VIEWS),
    layer=st.sampled_from(["column", "row", "row full input", "column gather"]),
    x_grad=st.booleans(),
    w_grad=st.booleans(),
    bias=st.sampled_from([None, True, False]),
    seed=seeds,
)
@example(
    M=3,
    K=4099,
    N=2,
    dtype=torch.bfloat16,
    view="overlapping",
    layer="row",
    x_grad=True,
    w_grad=False,
    bias=False,
    seed=0,
)  # a large prime K over overlapping rows; weight and bias frozen
@example(
    M=0, K=1, N=1, dtype=torch.float16, view="expanded", layer="column", x_grad=True, w_grad=True, bias=True, seed=0
)
def test_layers_take_any_input_view_and_frozen_parameters(
    device, M, K, N, dtype, view, layer, x_grad, w_grad, bias, seed
):
    """Column and Row (world size 1) on inputs that are odd views or outputs of earlier ops, with weight and bias
    frozen or not, a bias without grad, or none: output and each gradient that should exist match float64, the
    others stay None, the input is unmodified."""
    gen = torch.Generator().manual_seed(seed)
    leaf, x = _view(view, (M, K), dtype, device, gen, x_grad)
    dense = nn.Linear(K, N, bias is not None, device=device, dtype=dtype)
    dense.weight.requires_grad_(w_grad)
    if bias is not None:
        dense.bias.requires_grad_(bias)
    cls = fused_tp.ColumnParallelLinear if layer.startswith("column") else fused_tp.RowParallelLinear
    options = {"column gather": dict(gather_output=True), "row full input": dict(input_is_parallel=False)}
    module = cls.from_linear(dense, **options.get(layer, {}))
    if x.requires_grad:
        x.retain_grad()
    before = x.detach().clone()
    grad_y = make_tensor((M, N), "contiguous", dtype, device, gen)

    y = module(x)
    if y.requires_grad:
        y.backward(grad_y)

    assert torch.equal(x.detach(), before)
    assert_close("y", y, *linear_reference(x, dense.weight, dense.bias), tol(dtype, K))
    assert (x.grad is None) == (not x_grad)
    if x_grad:
        assert_close("grad_x", x.grad, *linear_reference(grad_y, dense.weight.t()), tol(dtype, N))
    assert (module.weight.grad is None) == (not w_grad)
    if w_grad:
        assert_close("grad_w", module.weight.grad, *linear_reference(grad_y.t(), x.t()), tol(dtype, M))
    if bias is not None:
        assert (module.bias.grad is None) == (not bias)
        if bias:
            g64 = grad_y.double().cpu()
            assert_close("grad_b", module.bias.grad, g64.sum(0), g64.abs().sum(0), tol(dtype, M))


class _Halved(nn.Module):
    def forward(self, t):
        return 0.5 * t


@pytest.mark.parametrize(
    "layer, name", [("column", "weight"), ("row", "bias"), ("fc1", "weight"), ("fc2", "bias"), ("fc2", "weight")]
)
def test_a_parametrized_parameter_is_the_one_used(device, layer, name):
    """The layers read weight and bias from the module's parameter dict (host time); a parametrization
    (torch.nn.utils.parametrize) takes one out of it and computes it from the original behind a property: the
    layer must use what the property computes (here half the original), forward and backward."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 12, device=device), nn.Linear(12, 8, device=device)
    if layer.startswith("fc"):
        module = fused_tp.ParallelMLP.from_linears(fc1, fc2, activation="gelu_tanh")
        target = getattr(module, layer)
    else:
        cls = fused_tp.ColumnParallelLinear if layer == "column" else fused_tp.RowParallelLinear
        module = target = cls.from_linear(fc1)
    parametrize.register_parametrization(target, name, _Halved())
    params = {"w1": fc1.weight, "b1": fc1.bias, "w2": fc2.weight, "b2": fc2.bias}
    key = ("w" if name == "weight" else "b") + ("2" if layer == "fc2" else "1")
    params[key] = 0.5 * params[key]  # what the layer must compute with
    x = torch.randn(5, 8, device=device)
    y = module(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    original = getattr(target.parametrizations, name).original.grad
    if layer.startswith("fc"):
        ref, mag = mlp_reference(x, *params.values(), grad_y, "gelu_tanh")
        t = tol(x.dtype, 12, stages=MLP_STAGES)
        ref_y, ref_grad = (ref["y"], mag["y"]), (0.5 * ref["grad_" + key], 0.5 * mag["grad_" + key])
    else:
        ref = layer_reference(x, params["w1"], params["b1"], grad_y)
        t = tol(x.dtype, 12)
        grad = ref["grad_w" if name == "weight" else "grad_b"]
        ref_y, ref_grad = ref["y"], (0.5 * grad[0], 0.5 * grad[1])
    assert_close("y", y, *ref_y, t)
    assert_close("grad of the original", original, *ref_grad, t)


@pytest.mark.parametrize("tokens", [16, 300])
@pytest.mark.parametrize("mlp", ["three modules", "ParallelMLP"])
def test_a_training_step_replays_in_a_cuda_graph(device, tokens, mlp):
    """Forward + backward of the Column -> GELU -> Row MLP captured into one CUDA graph (torch.cuda.graph, warmed up
    on a side stream first) replays on new inputs with the outputs and gradients of the same step run eagerly, bit
    for bit: nothing a launch decides on the host (its config, its direct launch, the descriptor scratch, which a
    captured launch takes from the graph's pool) goes stale in the graph. The way to take the host time of small
    steps off the critical path (bench_layers.py --graphs)."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    torch.manual_seed(0)
    up, down = (
        nn.Linear(64, 256, device="cuda", dtype=torch.bfloat16),
        nn.Linear(256, 72, device="cuda", dtype=torch.bfloat16),
    )

    def build():
        if mlp == "ParallelMLP":
            return fused_tp.ParallelMLP.from_linears(up, down)
        return nn.Sequential(
            fused_tp.ColumnParallelLinear.from_linear(up), nn.GELU(), fused_tp.RowParallelLinear.from_linear(down)
        )

    def step(module, x, grad_y):
        for t in (x, *module.parameters()):
            t.grad = None
        y = module(x)
        y.backward(grad_y)
        return [y, x.grad, *(p.grad for p in module.parameters())]

    graphed, eager = build(), build()
    x = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(tokens, 72, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(graphed, x, grad_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(graphed, x, grad_y)
    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
            grad_y.copy_(torch.randn(grad_y.shape, generator=gen, device="cuda"))
        graph.replay()
        x_eager = x.detach().clone().requires_grad_()
        want = step(eager, x_eager, grad_y.clone())
        for name, got, ref in zip(["y", "grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"], outs, want):
            assert torch.equal(got, ref), f"{name} after replay {seed} differs from the eager step"
