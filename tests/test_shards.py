"""Shard properties in one process: the layers' autograd Functions run once per simulated rank (collectives
skipped), and the test does what the all-reduce would. Column shards concatenated, and row partial sums with the
bias once, equal the dense layer; gradients likewise. tests/test_dist.py runs the same with real collectives."""

from unittest import mock

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from strategies import DTYPES, dims, dtypes, make_tensor, seeds
from torch import nn

import fused_tp
from fused_tp import kernels
from fused_tp.autograd import _ColumnParallelLinear, _mlp_graph, _RowParallelLinear, shard_range
from fused_tp.tolerance import MLP_STAGES, assert_close, layer_reference, mlp_reference, tol

worlds = st.integers(1, 4)


@given(size=st.integers(0, 50), world=worlds)
def test_shard_range_is_tensor_split(size, world):
    parts = torch.tensor_split(torch.arange(size), world)
    for rank in range(world):
        start, stop = shard_range(size, world, rank)
        assert torch.equal(torch.arange(size)[start:stop], parts[rank])


def _dense(M, K, N, dtype, has_bias, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_tensor((M, K), "contiguous", dtype, device, gen)
    w = make_tensor((N, K), "contiguous", dtype, device, gen)
    b = make_tensor((N,), "contiguous", dtype, device, gen) if has_bias else None
    grad_y = make_tensor((M, N), "contiguous", dtype, device, gen)
    return x, w, b, grad_y


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def _ranks_of(world):
    """The simulated ranks as ranks of one group of `world`. The Functions get world 1 (no collective) and no group,
    which alone would make each rank its group's only one (autograd._alone): a rank with no replica to match, whose
    row bias may take its gradient from the weight gradient's launch, in an order that follows its shard's width. A
    rank of a larger group takes it from the column-sum kernel, the same bits on every rank; so do these."""
    return mock.patch.object(fused_tp.autograd, "_alone", lambda group, _: world == 1)


@given(world=worlds, M=dims, K=dims, N=dims, dtype=dtypes, has_bias=st.booleans(), seed=seeds)
@example(world=4, M=5, K=7, N=3, dtype=torch.bfloat16, has_bias=True, seed=0)  # a rank with no output features
def test_column_shards_equal_dense(device, world, M, K, N, dtype, has_bias, seed):
    x, w, b, grad_y = _dense(M, K, N, dtype, has_bias, device, seed)
    ys, gxs, gws, gbs = [], [], [], []
    for rank in range(world):
        x_r = _leaf(x)
        w_r = _leaf(torch.tensor_split(w, world, 0)[rank])
        b_r = _leaf(None if b is None else torch.tensor_split(b, world, 0)[rank])
        y_r = _ColumnParallelLinear.apply(x_r, w_r, b_r, None, 1, None)
        y_r.backward(torch.tensor_split(grad_y, world, 1)[rank])
        ys.append(y_r.detach())
        gxs.append(x_r.grad)
        gws.append(w_r.grad)
        gbs.append(None if b is None else b_r.grad)

    ref = layer_reference(x, w, b, grad_y)
    assert_close("y", torch.cat(ys, -1), *ref["y"], tol(dtype, K))
    grad_x = gxs[0].clone()
    for g in gxs[1:]:
        grad_x += g  # what the all-reduce does, in the same dtype
    assert_close("grad_x", grad_x, *ref["grad_x"], tol(dtype, N, rounds=world))
    assert_close("grad_w", torch.cat(gws, 0), *ref["grad_w"], tol(dtype, M))
    if b is not None:
        assert_close("grad_b", torch.cat(gbs, 0), *ref["grad_b"], tol(dtype, M))


@given(world=worlds, M=dims, K=dims, N=dims, dtype=dtypes, has_bias=st.booleans(), seed=seeds)
@example(world=3, M=4, K=2, N=5, dtype=torch.float16, has_bias=True, seed=0)  # a rank with no input features
@example(world=2, M=5, K=1, N=1, dtype=torch.float32, has_bias=True, seed=0)  # its bias gradient's bits (session 56)
def test_row_partial_sums_equal_dense(device, world, M, K, N, dtype, has_bias, seed):
    x, w, b, grad_y = _dense(M, K, N, dtype, has_bias, device, seed)
    partials, gxs, gws, gbs = [], [], [], []
    for rank in range(world):
        x_r = _leaf(torch.tensor_split(x, world, 1)[rank])
        w_r = _leaf(torch.tensor_split(w, world, 1)[rank])
        b_r = _leaf(b)
        with _ranks_of(world):
            p_r = _RowParallelLinear.apply(x_r, w_r, b_r, None, 1, rank, False)
            p_r.backward(grad_y)
        partials.append(p_r.detach())
        gxs.append(x_r.grad)
        gws.append(w_r.grad)
        gbs.append(None if b is None else b_r.grad)

    y = partials[0].clone()
    for p in partials[1:]:
        y += p
    ref = layer_reference(x, w, b, grad_y)
    assert_close("y", y, *ref["y"], tol(dtype, K, rounds=world))
    if b is not None and world > 1:
        # the bias is in rank 0's partial sum only: with x = 0 the other ranks' partials would be exactly 0
        zero = _RowParallelLinear.apply(torch.zeros_like(x[:, :1]), w[:, :1], b, None, 1, 1, False)
        assert torch.equal(zero, torch.zeros_like(zero))
    assert_close("grad_x", torch.cat(gxs, -1), *ref["grad_x"], tol(dtype, N))
    assert_close("grad_w", torch.cat(gws, 1), *ref["grad_w"], tol(dtype, M))
    if b is not None:
        for g in gbs[1:]:
            assert torch.equal(g, gbs[0]), "the replicated bias got different gradients on different ranks"
        assert_close("grad_b", gbs[0], *ref["grad_b"], tol(dtype, M))


@given(
    world=worlds,
    M=dims,
    K=dims,
    F=dims,
    dtype=dtypes,
    has_bias=st.booleans(),
    activation=st.sampled_from(list(kernels.ACTIVATIONS)),
    seed=seeds,
)
@example(world=4, M=5, K=7, F=3, dtype=torch.bfloat16, has_bias=True, activation="gelu", seed=0)  # an empty shard
@example(world=3, M=4, K=9, F=7, dtype=torch.float32, has_bias=True, activation="swiglu", seed=0)  # uneven pairs
@example(world=2, M=6, K=8, F=5, dtype=torch.bfloat16, has_bias=True, activation="geglu_tanh", seed=1)  # Gemma's gate
@example(world=2, M=5, K=2, F=1, dtype=torch.float32, has_bias=True, activation="gelu", seed=0)  # fc2's bias gradient
def test_fused_mlp_shards_equal_dense(device, world, M, K, F, dtype, has_bias, activation, seed):
    """ParallelMLP's autograd graph (activation and its derivative in the kernels' epilogues): the ranks' output partial
    sums, with fc2's bias once, and their gradients equal the dense Linear -> activation -> Linear. SwiGLU's fc1 has
    2F interleaved (gate, up) rows, split by pairs."""
    unit = 2 if kernels.ACTIVATIONS[activation].gated else 1
    x, w1, b1, _ = _dense(M, K, unit * F, dtype, has_bias, device, seed)
    _, w2, b2, grad_y = _dense(M, F, K, dtype, has_bias, device, seed + 1)  # w2 [K, F], grad_y [M, K]

    def rows(t, rank):  # this rank's fc1 rows: whole pairs for a gated activation
        return None if t is None else torch.tensor_split(t.unflatten(0, (-1, unit)), world, 0)[rank].flatten(0, 1)

    y = grad_x = None
    gw1, gb1, gw2, gb2 = [], [], [], []
    for rank in range(world):
        x_r, b2_r = _leaf(x), _leaf(b2)
        w1_r, w2_r = _leaf(rows(w1, rank)), _leaf(torch.tensor_split(w2, world, 1)[rank])
        b1_r = _leaf(rows(b1, rank))
        with _ranks_of(world):
            p_r = _mlp_graph(x_r, w1_r, b1_r, w2_r, b2_r, None, 1, rank, activation, None)
            p_r.backward(grad_y)
        y = p_r.detach() if y is None else y + p_r.detach()  # what the forward's all-reduce does
        grad_x = x_r.grad if grad_x is None else grad_x + x_r.grad  # and the backward's
        gw1.append(w1_r.grad)
        gw2.append(w2_r.grad)
        gb1.append(None if b1 is None else b1_r.grad)
        gb2.append(None if b2 is None else b2_r.grad)

    ref, mag = mlp_reference(x, w1, b1, w2, b2, grad_y, activation)
    t = tol(dtype, max(K, F, M), rounds=world, stages=MLP_STAGES)
    assert_close("y", y, ref["y"], mag["y"], t)
    assert_close("grad_x", grad_x, ref["grad_x"], mag["grad_x"], t)
    assert_close("grad_w1", torch.cat(gw1, 0), ref["grad_w1"], mag["grad_w1"], t)
    assert_close("grad_w2", torch.cat(gw2, 1), ref["grad_w2"], mag["grad_w2"], t)
    if has_bias:
        assert_close("grad_b1", torch.cat(gb1, 0), ref["grad_b1"], mag["grad_b1"], t)
        for g in gb2[1:]:
            assert torch.equal(g, gb2[0]), "the replicated bias got different gradients on different ranks"
        assert_close("grad_b2", gb2[0], ref["grad_b2"], mag["grad_b2"], t)


LEAVES = ("x", "w1", "b1", "w2", "b2")


@pytest.mark.parametrize("kind", ["parallel_mlp", "three modules"])
@pytest.mark.parametrize("mask", range(2 ** len(LEAVES)))
def test_every_requires_grad_combination_gets_exactly_its_gradients(device, kind, mask):
    """Each of the 32 combinations of requires_grad over (input, fc1.weight, fc1.bias, fc2.weight, fc2.bias), for
    ParallelMLP's autograd graph and for Column -> GELU -> Row: a tensor that takes a gradient gets the dense MLP's, one
    that does not gets None (fc1.bias alone trains only through the saved pre-activation). The world size, sizes
    and dtype turn with the mask, so that every world size 1-4 and dtype meets many masks, uneven splits and an
    empty shard (F < world) among them."""
    world, dtype, seed = 1 + mask % 4, DTYPES[mask % 3], mask
    M, K, F = 1 + mask % 5, 3 + mask % 7, 2 + mask % 11
    x, w1, b1, _ = _dense(M, K, F, dtype, True, device, seed)
    _, w2, b2, grad_y = _dense(M, F, K, dtype, True, device, seed + 1)
    wants = {name: bool(mask >> i & 1) for i, name in enumerate(LEAVES)}
    y, grads = None, {name: [] for name in LEAVES}
    for rank in range(world):
        shards = {
            "x": x,
            "w1": torch.tensor_split(w1, world, 0)[rank],
            "b1": torch.tensor_split(b1, world, 0)[rank],
            "w2": torch.tensor_split(w2, world, 1)[rank],
            "b2": b2,
        }
        leaves = {name: t.detach().clone().requires_grad_(wants[name]) for name, t in shards.items()}
        if kind == "parallel_mlp":
            p_r = _mlp_graph(*leaves.values(), None, 1, rank, "gelu", None)
        else:
            h = torch.nn.functional.gelu(
                _ColumnParallelLinear.apply(leaves["x"], leaves["w1"], leaves["b1"], None, 1, None)
            )
            p_r = _RowParallelLinear.apply(h, leaves["w2"], leaves["b2"], None, 1, rank, False)
        assert p_r.requires_grad == any(wants.values())
        if p_r.requires_grad:
            p_r.backward(grad_y)
        y = p_r.detach() if y is None else y + p_r.detach()
        for name, leaf in leaves.items():
            assert (leaf.grad is not None) == wants[name], f"{name}: gradient {'missing' if wants[name] else 'made'}"
            grads[name].append(leaf.grad)

    ref, mag = mlp_reference(x, w1, b1, w2, b2, grad_y)
    t = tol(dtype, max(K, F, M), rounds=world, stages=MLP_STAGES)
    assert_close("y", y, ref["y"], mag["y"], t)
    joined = {
        "x": lambda g: sum(g[1:], g[0]),
        "w1": lambda g: torch.cat(g, 0),
        "b1": lambda g: torch.cat(g, 0),
        "w2": lambda g: torch.cat(g, 1),
        "b2": lambda g: g[0],
    }
    for name in LEAVES:
        if wants[name]:
            assert_close(f"grad_{name}", joined[name](grads[name]), ref[f"grad_{name}"], mag[f"grad_{name}"], t)


def test_a_swiglu_mlp_built_under_a_seed_holds_llamas_layers_built_under_it(device):
    """ParallelMLP(activation="swiglu") builds gate, up and down as Llama's MLP does, in that order: its parameters
    are from_gated's of nn.Linear layers built under the same seed, fc1 interleaving gate's and up's rows."""
    torch.manual_seed(3)
    mlp = fused_tp.ParallelMLP(6, 10, 4, activation="swiglu", device=device)
    torch.manual_seed(3)
    gate, up, down = nn.Linear(6, 10, device=device), nn.Linear(6, 10, device=device), nn.Linear(10, 4, device=device)
    assert torch.equal(mlp.fc1.weight[0::2], gate.weight) and torch.equal(mlp.fc1.weight[1::2], up.weight)
    assert torch.equal(mlp.fc1.bias[0::2], gate.bias) and torch.equal(mlp.fc1.bias[1::2], up.bias)
    assert torch.equal(mlp.fc2.weight, down.weight) and torch.equal(mlp.fc2.bias, down.bias)
    built = fused_tp.ParallelMLP.from_gated(gate, up, down)
    for name, p in mlp.named_parameters():
        assert torch.equal(p, dict(built.named_parameters())[name])
