"""Real collectives: the layers on 2, 3 and 4 gloo ranks (sharing the GPU where there is one).

Hypothesis draws each example here, in the parent; every rank of a long-lived pool runs it (tests/rankpool.py)."""

import os
from math import inf

import dist_cases
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from strategies import dtypes, make_tensor, seeds
from test_errors import BAD_CALLS
from torch import nn

from fused_tp.kernels import ACTIVATIONS
from fused_tp.tolerance import MLP_STAGES, assert_close, layer_reference, mlp_reference, tol

# FUSED_TP_TEST_WORLDS="2,4,8" (with FUSED_TP_TEST_BACKEND=nccl on an 8-GPU machine) changes them.
WORLDS = [int(w) for w in os.environ.get("FUSED_TP_TEST_WORLDS", "2,3,4").split(",")]
sizes = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 13]), st.integers(1, 70))
tokens = st.one_of(st.sampled_from([0, 1, 3]), st.integers(1, 40))
dist_settings = settings(max_examples=20)


def _dense_linear(in_features, out_features, has_bias, dtype, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, has_bias).to(dtype)
    return linear.weight.detach(), None if linear.bias is None else linear.bias.detach()


def _inputs(lead, in_features, out_features, dtype, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    return (
        make_tensor(lead + (in_features,), "contiguous", dtype, "cpu", gen),
        make_tensor(lead + (out_features,), "contiguous", dtype, "cpu", gen),
    )


def _assert_replicated(name, outs):
    for rank, out in enumerate(outs[1:], 1):
        assert torch.equal(out[name], outs[0][name]), f"{name} differs between rank 0 and rank {rank}"


@pytest.mark.parametrize("world", WORLDS)
@dist_settings
@given(
    tokens=tokens,
    hidden=sizes,
    ffn=sizes,
    dtype=dtypes,
    has_bias=st.booleans(),
    seed=seeds,
    kind=st.sampled_from(["mlp", "parallel_mlp"]),
    activation=st.sampled_from(["gelu", "gelu_tanh", "swiglu"]),
)
@example(
    tokens=5, hidden=7, ffn=3, dtype=torch.bfloat16, has_bias=True, seed=0, kind="mlp", activation="gelu"
)  # ffn < world: an empty shard
@example(
    tokens=5, hidden=7, ffn=3, dtype=torch.bfloat16, has_bias=True, seed=0, kind="parallel_mlp", activation="gelu"
)  # the same through ParallelMLP
@example(
    tokens=5, hidden=7, ffn=5, dtype=torch.float32, has_bias=True, seed=0, kind="parallel_mlp", activation="swiglu"
)  # (gate, up) pairs split unevenly
def test_mlp_matches_dense(rank_pools, device, world, tokens, hidden, ffn, dtype, has_bias, seed, kind, activation):
    """Column -> GELU -> Row built with from_linear, as three modules or as one ParallelMLP (the activation in the
    kernels; SwiGLU's fc1 interleaves 2 * ffn gate and up rows, and only ParallelMLP keeps the pairs together):
    output and every gradient match the dense MLP."""
    assume(not (kind == "mlp" and activation == "swiglu"))
    w1, b1 = _dense_linear(hidden, ffn * (2 if activation == "swiglu" else 1), has_bias, dtype, seed)
    w2, b2 = _dense_linear(ffn, hidden, has_bias, dtype, seed + 1)
    x, grad_y = _inputs((2, tokens), hidden, hidden, dtype, seed)

    outs = rank_pools(world).run(dist_cases.layers_step, kind, device, [(w1, b1), (w2, b2)], x, grad_y, activation)

    ref, mag = mlp_reference(x, w1, b1, w2, b2, grad_y, activation)
    tol_mlp = tol(dtype, max(hidden, ffn, 2 * tokens), rounds=world, stages=MLP_STAGES)
    for rank, out in enumerate(outs):
        assert_close(f"y on rank {rank}", out["y"], ref["y"], mag["y"], tol_mlp)
        assert_close(f"grad_x on rank {rank}", out["grad_x"], ref["grad_x"], mag["grad_x"], tol_mlp)
    _assert_replicated("y", outs)
    _assert_replicated("grad_x", outs)
    # Column (layer 0) shards split the dense rows of w1 and b1; Row (layer 1) splits the columns of w2.
    assert torch.equal(torch.cat([o["w0"] for o in outs], 0), w1)
    assert torch.equal(torch.cat([o["w1"] for o in outs], 1), w2)
    assert_close("grad_w1", torch.cat([o["grad_w0"] for o in outs], 0), ref["grad_w1"], mag["grad_w1"], tol_mlp)
    assert_close("grad_w2", torch.cat([o["grad_w1"] for o in outs], 1), ref["grad_w2"], mag["grad_w2"], tol_mlp)
    if has_bias:
        assert torch.equal(torch.cat([o["b0"] for o in outs], 0), b1)
        assert_close("grad_b1", torch.cat([o["grad_b0"] for o in outs], 0), ref["grad_b1"], mag["grad_b1"], tol_mlp)
        _assert_replicated("b1", outs)
        _assert_replicated("grad_b1", outs)  # the replicated row bias gets the same gradient on every rank
        assert_close("grad_b2", outs[0]["grad_b1"], ref["grad_b2"], mag["grad_b2"], tol_mlp)


@pytest.mark.parametrize("world", WORLDS[:2])
@pytest.mark.parametrize("kind", ["mlp", "parallel_mlp"])
def test_mlp_under_autocast_matches_the_dense_mlp_on_its_cast_operands(rank_pools, device, world, kind):
    """Inside torch.autocast (bf16) with fp32 shards and input, on real ranks: the output in bf16, every gradient in
    fp32 (uneven shards), against the float64 reference on the operands cast to bf16; the row bias once."""
    hidden, ffn, tokens = 7, 10, 5
    w1, b1 = _dense_linear(hidden, ffn, True, torch.float32, 0)
    w2, b2 = _dense_linear(ffn, hidden, True, torch.float32, 1)
    x, grad_y = _inputs((tokens,), hidden, hidden, torch.float32, 0)
    grad_y = grad_y.bfloat16()

    run = rank_pools(world).run
    outs = run(dist_cases.layers_step, kind, device, [(w1, b1), (w2, b2)], x, grad_y, "gelu", torch.bfloat16)

    ref, mag = mlp_reference(*(t.bfloat16() for t in (x, w1, b1, w2, b2)), grad_y)
    t = tol(torch.bfloat16, max(hidden, ffn, tokens), rounds=world, stages=MLP_STAGES)
    for rank, out in enumerate(outs):
        assert out["y"].dtype == torch.bfloat16 and out["grad_x"].dtype == torch.float32
        assert all(out[f"grad_{p}"].dtype == torch.float32 for p in ("w0", "b0", "w1", "b1"))
        assert_close(f"y on rank {rank}", out["y"], ref["y"], mag["y"], t)
        assert_close(f"grad_x on rank {rank}", out["grad_x"], ref["grad_x"], mag["grad_x"], t)
        assert_close(f"grad_b2 on rank {rank}", out["grad_b1"], ref["grad_b2"], mag["grad_b2"], t)
    assert_close("grad_w1", torch.cat([o["grad_w0"] for o in outs], 0), ref["grad_w1"], mag["grad_w1"], t)
    assert_close("grad_b1", torch.cat([o["grad_b0"] for o in outs], 0), ref["grad_b1"], mag["grad_b1"], t)
    assert_close("grad_w2", torch.cat([o["grad_w1"] for o in outs], 1), ref["grad_w2"], mag["grad_w2"], t)


@pytest.mark.parametrize("world", WORLDS)
@dist_settings
@given(tokens=tokens, in_features=sizes, out_features=sizes, dtype=dtypes, seed=seeds)
def test_column_gather_output(rank_pools, device, world, tokens, in_features, out_features, dtype, seed):
    """gather_output=True: every rank gets all output features (uneven splits too); grads stay per shard."""
    w, b = _dense_linear(in_features, out_features, True, dtype, seed)
    x, grad_y = _inputs((tokens,), in_features, out_features, dtype, seed)

    outs = rank_pools(world).run(dist_cases.layers_step, "column_gather", device, [(w, b)], x, grad_y)

    ref = layer_reference(x, w, b, grad_y)
    for rank, out in enumerate(outs):
        assert_close(f"y on rank {rank}", out["y"], *ref["y"], tol(dtype, in_features))
        assert_close(f"grad_x on rank {rank}", out["grad_x"], *ref["grad_x"], tol(dtype, out_features, world))
    _assert_replicated("y", outs)
    _assert_replicated("grad_x", outs)
    assert_close("grad_w", torch.cat([o["grad_w0"] for o in outs], 0), *ref["grad_w"], tol(dtype, tokens))
    assert_close("grad_b", torch.cat([o["grad_b0"] for o in outs], 0), *ref["grad_b"], tol(dtype, tokens))


@pytest.mark.parametrize("world", WORLDS)
@dist_settings
@given(tokens=tokens, in_features=sizes, out_features=sizes, dtype=dtypes, seed=seeds)
def test_row_full_input_and_bias_once(rank_pools, device, world, tokens, in_features, out_features, dtype, seed):
    """input_is_parallel=False: each rank uses its slice and every rank gets the full input gradient; the bias
    lands once in the sum (a zero input gives the bias exactly, not world_size times it)."""
    w, b = _dense_linear(in_features, out_features, True, dtype, seed)
    x, grad_y = _inputs((tokens,), in_features, out_features, dtype, seed)

    outs = rank_pools(world).run(dist_cases.layers_step, "row_scatter", device, [(w, b)], x, grad_y)

    ref = layer_reference(x, w, b, grad_y)
    for rank, out in enumerate(outs):
        assert torch.equal(out["y_zero_input"], b.expand(tokens, -1)), f"rank {rank}: bias not added exactly once"
        assert_close(f"y on rank {rank}", out["y"], *ref["y"], tol(dtype, in_features, rounds=world))
        assert_close(f"grad_x on rank {rank}", out["grad_x"], *ref["grad_x"], tol(dtype, out_features))
        assert_close(f"grad_b on rank {rank}", out["grad_b0"], *ref["grad_b"], tol(dtype, tokens))
    for name in ("y", "grad_x", "grad_b0"):
        _assert_replicated(name, outs)
    assert_close("grad_w", torch.cat([o["grad_w0"] for o in outs], 1), *ref["grad_w"], tol(dtype, tokens))


@pytest.mark.parametrize("world", WORLDS)
@dist_settings
@given(in_features=sizes, out_features=sizes, has_bias=st.booleans(), dtype=dtypes, seed=seeds)
def test_constructor_shards_are_slices_of_nn_linear(
    rank_pools, world, in_features, out_features, has_bias, dtype, seed
):
    """Under the same seed, each rank's constructor makes exactly its slice of nn.Linear's parameters, and
    reset_parameters draws the same values into a module made on the meta device (ParallelMLP's both kinds too)."""
    outs = rank_pools(world).run(dist_cases.init_shards, seed, in_features, out_features, has_bias, dtype)
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, has_bias, dtype=dtype)
    for rank, out in enumerate(outs):
        for name in ("ColumnParallelLinear", "RowParallelLinear", "ParallelMLP", "ParallelMLP swiglu"):
            made, reset = out[name][0], out[name + " reset"]
            assert all(torch.equal(a, b) for a, b in zip(made, reset, strict=True)), f"{name} on rank {rank}"
        (w, *b), text = out["ColumnParallelLinear"]
        b = b[0] if b else None
        assert torch.equal(w, torch.tensor_split(dense.weight.detach(), world, 0)[rank])
        assert (b is None) == (not has_bias)
        if has_bias:
            assert torch.equal(b, torch.tensor_split(dense.bias.detach(), world, 0)[rank])
        assert f"rank={rank}, world_size={world}" in text and f"out_features={out_features}" in text
        (w, *b), text = out["RowParallelLinear"]
        b = b[0] if b else None
        assert torch.equal(w, torch.tensor_split(dense.weight.detach(), world, 1)[rank])
        if has_bias:
            assert torch.equal(b, dense.bias.detach())
        assert f"weight_shard=({out_features}, {w.shape[1]})" in text


@pytest.mark.parametrize("world", WORLDS)
def test_bad_input_raises_on_every_rank_without_a_hang(rank_pools, device, world):
    outs = rank_pools(world).run(dist_cases.bad_calls, device, 9, 6)
    for rank, out in enumerate(outs):
        for name, (_, error, message) in BAD_CALLS.items():
            assert out[name] is not None, f"rank {rank}: {name} did not raise"
            assert out[name][0] == error.__name__ and message in out[name][1], f"rank {rank}: {name}: {out[name]}"
        assert out["all_reduce after the errors"] == world


@pytest.mark.parametrize("world", WORLDS)
def test_rank_guard_raises_the_same_error_on_every_rank(rank_pools, device, world):
    """With check_ranks(), calls the ranks disagree about raise one RankMismatchError, identical on every rank,
    before any collective of the call; a bad argument on one rank raises on all; the group stays usable."""
    outs = rank_pools(world).run(dist_cases.guarded_calls, device, 6, 5)
    mismatches = {
        "tokens differ": "input: (2, 6)",
        "input needs grad on rank 0 only": "grad=True",
        "bad width on the last rank": "raised ValueError: input: expected last dim 6 (weight.shape[1])",
        "full input of the wrong width on rank 0": "raised ValueError: input: expected last dim 5 (in_features)",
        "no grad on rank 1 only": "grad mode False",
    }
    for rank, out in enumerate(outs):
        assert out["agree"] is None and out["guard changes nothing"], f"rank {rank}: {out}"
        for name, text in mismatches.items():
            assert out[name] is not None and out[name][0] == "RankMismatchError", f"rank {rank}: {name}: {out[name]}"
            assert text in out[name][1], f"rank {rank}: {name}: {out[name][1]}"
            assert out[name] == outs[0][name], f"{name}: rank {rank} raised another error than rank 0"
        # Every rank failed the same check: each raises that check's own error, the same everywhere.
        own_error = ("ValueError", "input: expected last dim 6 (weight.shape[1]), got shape (4, 5)")
        assert out["bad width on every rank"] == own_error
        assert out["all_reduce after"] == world


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_are_bitwise_deterministic_run_to_run(rank_pools, device, world, dtype):
    """The same step twice (fresh layers, same weights and inputs) gives the same bits on every rank: output,
    input gradient and every parameter gradient."""
    w1, b1 = _dense_linear(37, 53, True, dtype, 0)
    w2, b2 = _dense_linear(53, 37, True, dtype, 1)
    x, grad_y = _inputs((2, 19), 37, 37, dtype, 2)
    pool = rank_pools(world)
    first, again = (pool.run(dist_cases.layers_step, "mlp", device, [(w1, b1), (w2, b2)], x, grad_y) for _ in range(2))
    for rank, (a, b) in enumerate(zip(first, again)):
        for name in a:
            assert torch.equal(a[name], b[name]), f"rank {rank}: {name} differs between two runs"


@pytest.mark.parametrize("world", WORLDS)
# 3: at world 4 a rank holds no features, and still takes part. (160, 136): a second layer on the same input, whose
# call facts differ from the first's only in the dense width, is a tuning call of its own.
@pytest.mark.parametrize("ffns", [(160,), (3,), (160, 136)])
def test_autotuning_takes_rank_0s_choice_on_every_rank(rank_pools, device, world, ffns):
    """FUSED_TP_AUTOTUNE=1 with a timer under which every rank other than 0 would choose another config: every
    rank runs rank 0's choice, outputs stay bitwise replicated, and the second step times nothing. The test checks
    that it cannot pass vacuously: every launch has several candidates (more than ranks, where the shard is wide
    enough to allow them), and each rank's choice alone differs from rank 0's."""
    outs = rank_pools(world).run(dist_cases.autotuned_steps, device, 40, ffns, 2, torch.float16)
    for rank, out in enumerate(outs):
        assert out["timer_calls"][0] > 0 or min(ffns) < world, f"rank {rank} timed nothing at the first step"
        assert out["timer_calls"][1] == 0, f"rank {rank} timed again at the second step"
        for i, (y, grad_x) in enumerate(out["outs"]):
            first = outs[0]["outs"][i % len(ffns)]  # every step of a layer gives its first step's bits, on every rank
            assert torch.equal(y, first[0]) and torch.equal(grad_x, first[1])
        assert out["chosen"], f"rank {rank} autotuned no launch"
        wide = min(ffns) // world > 32  # shards wide enough for 128-wide tiles: more candidates than ranks
        for launch, c in out["chosen"].items():
            assert c["candidates"] > (world if wide else 1), f"rank {rank}, {launch}: {c['candidates']} candidates"
            if c["alone"] is not None:
                assert (c["alone"] == c["ran"]) == (rank == 0), f"rank {rank}, {launch}: {c}"
    even = all(ffn % world == 0 for ffn in ffns)  # equal shards: every rank launches the same shapes
    if even:
        for rank, out in enumerate(outs[1:], 1):
            ran = {launch: c["ran"] for launch, c in out["chosen"].items()}
            assert ran == {launch: c["ran"] for launch, c in outs[0]["chosen"].items()}, f"rank {rank}: other configs"


def test_guard_and_autotuning_on_a_subgroup(rank_pools, device):
    """On a process group of two of three ranks: the guard raises on both members alike, and run-time autotuning's
    broadcast (from the group's first rank, global rank 1) leaves both members with the same configs."""
    outs = rank_pools(3).run(dist_cases.subgroup_calls, device)
    assert outs[0] == "not in the group"
    a, b = outs[1], outs[2]
    assert a["tokens differ"] and a["tokens differ"] == b["tokens differ"], (a, b)
    assert a["autotuned"][2] == b["autotuned"][2], "the members run different configs"
    assert torch.equal(a["autotuned"][1], b["autotuned"][1])  # grad_x is all-reduced: replicated


# each world size with another layer form, activation and norm: each of them once, at some world size
@pytest.mark.parametrize(
    "world, kind, activation, norm_type",
    [
        (w, *case)
        for w, case in zip(
            WORLDS, [("mlp", "gelu", 2.0), ("parallel_mlp", "swiglu", 1.0), ("parallel_mlp", "gelu", inf)]
        )
    ],
)
def test_clip_grad_norm_takes_the_dense_models_norm(rank_pools, world, kind, activation, norm_type):
    """fused_tp.clip_grad_norm_ on a LayerNorm (replicated) before the MLP's layers (sharded, uneven): on every rank
    the total of torch.nn.utils.clip_grad_norm_ on the dense model, bit for bit the same total on every rank, and
    every gradient clipped as the dense model's, the replicated ones bit for bit alike on every rank (torch's own
    clip would scale each rank by its own shard's norm, and the replicated parameters would drift apart)."""
    hidden, ffn, tokens = 6, 5, 7
    w1, b1 = _dense_linear(hidden, ffn * (2 if activation == "swiglu" else 1), True, torch.float32, 0)
    w2, b2 = _dense_linear(ffn, hidden, True, torch.float32, 1)
    x, grad_y = _inputs((tokens,), hidden, hidden, torch.float32, 0)
    norm = (torch.rand(hidden) + 0.5, torch.randn(hidden))

    run = rank_pools(world).run
    outs = run(dist_cases.clipped_step, kind, [(w1, b1), (w2, b2)], norm, x, grad_y, activation, norm_type, 0.01)

    dense_norm = dist_cases.layer_norm(*norm)
    fc1, fc2 = dist_cases.dense_linear(w1, b1, "cpu"), dist_cases.dense_linear(w2, b2, "cpu")
    act = ACTIVATIONS[activation].torch_fn
    h = fc1(dense_norm(x))
    y = fc2(act(h))
    y.backward(grad_y)
    params = [dense_norm.weight, dense_norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    total = torch.nn.utils.clip_grad_norm_(params, 0.01, norm_type)
    assert total > 0.01  # the gradients are clipped, not left as they were
    close = dict(rtol=1e-5, atol=1e-7)
    for rank, out in enumerate(outs):
        assert torch.equal(out["total"], outs[0]["total"]), f"rank {rank}'s total differs from rank 0's"
        torch.testing.assert_close(out["total"], total, **close)
        torch.testing.assert_close(out["norm_w"], dense_norm.weight.grad, **close)
        torch.testing.assert_close(out["grad_b1"], fc2.bias.grad, **close)
    for name in ("norm_w", "norm_b", "grad_b1"):
        _assert_replicated(name, outs)
    torch.testing.assert_close(torch.cat([o["grad_w0"] for o in outs], 0), fc1.weight.grad, **close)
    torch.testing.assert_close(torch.cat([o["grad_b0"] for o in outs], 0), fc1.bias.grad, **close)
    torch.testing.assert_close(torch.cat([o["grad_w1"] for o in outs], 1), fc2.weight.grad, **close)


@pytest.mark.parametrize("world", WORLDS)
def test_sequence_parallel_grads_give_a_norm_the_whole_sequences_gradient(rank_pools, world):
    """A LayerNorm before a sequence-parallel ParallelMLP runs on each rank's share of the sequence (uneven), so its
    gradient there is that share's; through fused_tp.sequence_parallel_grads (called twice) every rank gets the
    dense model's gradient over the whole sequence, bit for bit the same on every rank."""
    hidden, ffn, tokens = 6, 5, 7
    w1, b1 = _dense_linear(hidden, ffn, True, torch.float32, 0)
    w2, b2 = _dense_linear(ffn, hidden, True, torch.float32, 1)
    x, grad_y = _inputs((tokens,), hidden, hidden, torch.float32, 0)
    norm = (torch.rand(hidden) + 0.5, torch.randn(hidden))

    outs = rank_pools(world).run(dist_cases.sequence_parallel_norm_step, [(w1, b1), (w2, b2)], norm, x, grad_y)

    dense_norm = dist_cases.layer_norm(*norm)
    fc1, fc2 = dist_cases.dense_linear(w1, b1, "cpu"), dist_cases.dense_linear(w2, b2, "cpu")
    fc2(F.gelu(fc1(dense_norm(x)))).backward(grad_y)
    for rank, (grad_w, grad_b) in enumerate(outs):
        assert torch.equal(grad_w, outs[0][0]) and torch.equal(grad_b, outs[0][1]), f"rank {rank} differs from 0"
        torch.testing.assert_close(grad_w, dense_norm.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_b, dense_norm.bias.grad, rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_of_a_parallelized_llama_counts_shared_heads_once(rank_pools):
    """A tiny Llama through parallelize at 3 ranks (4 query heads in 2 groups: key/value head 1 lives on ranks 1
    and 2): the total of fused_tp.clip_grad_norm_ on every rank is torch's on the dense model, each shared head
    counted once."""
    for rank, (total, dense_total) in enumerate(rank_pools(3).run(dist_cases.clipped_llama_total, 2.0)):
        torch.testing.assert_close(total, dense_total, rtol=1e-5, atol=0, msg=lambda m: f"rank {rank}: {m}")


@pytest.mark.parametrize("data_parallel", ["fsdp2", "ddp"])
@pytest.mark.parametrize("kind, activation", [("mlp", "gelu"), ("parallel_mlp", "gelu"), ("parallel_mlp", "swiglu")])
def test_data_parallel_over_dp_with_the_layers_over_tp_matches_the_dense_mlp(
    rank_pools, device, kind, activation, data_parallel
):
    """2-D parallelism on 4 ranks: the MLP tensor-parallel over mesh["tp"] (2 ranks) and data-parallel over
    mesh["dp"] (2 ranks, each half the batch) by FSDP2's fully_shard or by DistributedDataParallel: every rank's
    output rows and every gradient (the dp-mean; FSDP's shards gathered) match the dense MLP on the whole batch.
    CPU only (FSDP2 over gloo)."""
    if device != "cpu" or 4 not in WORLDS:
        pytest.skip("data parallelism over gloo ranks: CPU tensors, 4 ranks")
    hidden, ffn, tokens = 6, 5, 7
    w1, b1 = _dense_linear(hidden, ffn * (2 if activation == "swiglu" else 1), True, torch.float32, 0)
    w2, b2 = _dense_linear(ffn, hidden, True, torch.float32, 1)
    x, grad_y = _inputs((tokens,), hidden, hidden, torch.float32, 0)

    outs = rank_pools(4).run(dist_cases.dp_tp_step, kind, [(w1, b1), (w2, b2)], x, grad_y, activation, data_parallel)

    ref, mag = mlp_reference(x, w1, b1, w2, b2, grad_y, activation)
    t = tol(torch.float32, max(hidden, ffn, tokens), rounds=4, stages=MLP_STAGES)
    for rank, out in enumerate(outs):
        assert_close(f"y on rank {rank}", out["y"], ref["y"][out["rows"]], mag["y"][out["rows"]], t)
        if data_parallel == "fsdp2":
            assert out["clip"].startswith("model: expected plain tensor gradients, got DTensor ones")
    # tp rank r (of mesh["tp"]: rank % 2) holds shard r; data parallelism averaged the dp ranks' gradients
    for name, key, dim in (("w1", "w0", 0), ("b1", "b0", 0), ("w2", "w1", 1)):
        whole = torch.cat([outs[r]["grad_" + key] for r in (0, 1)], dim)
        assert_close(f"grad_{name}", 2 * whole, ref["grad_" + name], mag["grad_" + name], t)
    for rank, out in enumerate(outs):
        assert_close(f"grad_b2 on rank {rank}", 2 * out["grad_b1"], ref["grad_b2"], mag["grad_b2"], t)


@pytest.mark.parametrize("world", WORLDS)
def test_layers_take_a_device_mesh(rank_pools, device, world):
    """A 1-D DeviceMesh wherever a process group goes, bitwise the same; a 2-D mesh raises, naming process_group;
    its named dim mesh["tp"] shards over that dim's ranks."""
    for rank, (equal, refusal, sub, matches) in enumerate(rank_pools(world).run(dist_cases.mesh_calls, device)):
        assert equal, f"rank {rank}: the mesh and its group gave different bits"
        if world % 2 == 0:
            assert refusal.startswith("process_group: expected a 1-D DeviceMesh (of a larger one, its dim: mesh['tp'])")
            assert sub == (2, rank % 2) and matches


@pytest.mark.parametrize("world", WORLDS)
@dist_settings
@given(
    tokens=st.integers(1, 11),
    hidden=sizes,
    ffn=sizes,
    dtype=dtypes,
    has_bias=st.booleans(),
    seed=seeds,
    kind=st.sampled_from(["mlp", "parallel_mlp"]),
    activation=st.sampled_from(["gelu", "swiglu"]),
    seq_dim=st.sampled_from([0, 1]),
)
@example(
    tokens=5,
    hidden=7,
    ffn=3,
    dtype=torch.float32,
    has_bias=True,
    seed=0,
    kind="parallel_mlp",
    activation="swiglu",
    seq_dim=1,
)  # uneven sequence shards, an empty one at world 4 ... and uneven pairs
def test_sequence_parallel_mlp_matches_dense(
    rank_pools, device, world, tokens, hidden, ffn, dtype, has_bias, seed, kind, activation, seq_dim
):
    """Sequence parallelism: each rank feeds its share of the sequence (torch.tensor_split, uneven lengths too) and
    gets its share of the output; concatenated along the sequence, outputs and input gradients equal the dense MLP
    on the whole sequence, and the shards' weight gradients (the row bias's, the same on every rank) too."""
    assume(not (kind == "mlp" and activation == "swiglu"))
    w1, b1 = _dense_linear(hidden, ffn * (2 if activation == "swiglu" else 1), has_bias, dtype, seed)
    w2, b2 = _dense_linear(ffn, hidden, has_bias, dtype, seed + 1)
    x, grad_y = _inputs((tokens, 2), hidden, hidden, dtype, seed)  # [S, B, K]
    if seq_dim == 1:
        x, grad_y = x.transpose(0, 1).contiguous(), grad_y.transpose(0, 1).contiguous()  # [B, S, K]

    outs = rank_pools(world).run(
        dist_cases.sequence_parallel_step, kind, device, [(w1, b1), (w2, b2)], x, grad_y, activation, seq_dim
    )

    ref, mag = mlp_reference(x.reshape(-1, hidden), w1, b1, w2, b2, grad_y.reshape(-1, hidden), activation)
    t = tol(dtype, max(hidden, ffn, 2 * tokens), rounds=world, stages=MLP_STAGES)
    y = torch.cat([o["y"] for o in outs], seq_dim).reshape(-1, hidden)
    grad_x = torch.cat([o["grad_x"] for o in outs], seq_dim).reshape(-1, hidden)
    assert_close("y", y, ref["y"], mag["y"], t)
    assert_close("grad_x", grad_x, ref["grad_x"], mag["grad_x"], t)
    assert_close("grad_w1", torch.cat([o["grad_w0"] for o in outs], 0), ref["grad_w1"], mag["grad_w1"], t)
    assert_close("grad_w2", torch.cat([o["grad_w1"] for o in outs], 1), ref["grad_w2"], mag["grad_w2"], t)
    if has_bias:
        assert_close("grad_b1", torch.cat([o["grad_b0"] for o in outs], 0), ref["grad_b1"], mag["grad_b1"], t)
        _assert_replicated("grad_b1", outs)
        assert_close("grad_b2", outs[0]["grad_b1"], ref["grad_b2"], mag["grad_b2"], t)
    assert not any(o["saved_the_sequence"] for o in outs), "forward saved the gathered input, not this rank's share"
    # README's formula at TP = N: per rank the layer input's share, S/N x B x H, and the hidden activations,
    # S x B x F/N, twice (the activation's input and output; a gated pre-activation is twice as wide)
    for rank, o in enumerate(outs):
        share = torch.tensor_split(torch.empty(tokens), world)[rank].numel()
        f_r = torch.tensor_split(torch.empty(ffn), world)[rank].numel()
        want = share * 2 * hidden + tokens * 2 * f_r * (3 if activation == "swiglu" else 2)
        assert o["saved_activations"] == want, f"rank {rank}: saved {o['saved_activations']} elements, want {want}"


@pytest.mark.parametrize("world", WORLDS)
def test_a_replicated_row_bias_takes_its_gradient_from_the_column_sum_kernel(rank_pools, device, world):
    """A row layer's bias is replicated, and its gradient must have the same bits on every rank, whatever each
    rank's shard width: the column-sum kernel writes it, never the weight gradient's launch as at world size 1
    (tests/test_edges.py), sequence parallelism (whose row Functions are told world size 1) included."""
    for rank, counts in enumerate(rank_pools(world).run(dist_cases.row_bias_launches, device)):
        want = {"row": 0, "sequence-parallel row": 0, "sequence-parallel ParallelMLP": 1}  # the last: fc1's
        assert counts == want, f"rank {rank}: {counts}"


@pytest.mark.parametrize("world", WORLDS)
def test_sequence_parallel_bad_input_raises_the_same_error_on_every_rank(rank_pools, device, world):
    outs = rank_pools(world).run(dist_cases.sequence_parallel_bad_calls, device)
    for errors, group_ok in outs:
        assert errors[0] == outs[0][0][0] and errors[0].startswith(
            "input: expected the sequence (dim 0) split as torch.tensor_split splits"
        ), errors
        assert (
            errors[1] == "sequence_dim: expected a dim of the input other than its last (the features), got 0 "
            "for an input of 1 dims"
        ), errors
        assert group_ok


@pytest.mark.parametrize("world", WORLDS)
def test_sequence_parallel_matches_dtensor(rank_pools, device, world):
    """fused_tp's sequence-parallel ParallelMLP against DTensor's SequenceParallel-style Colwise / Rowwise plan on
    the same weights and the same sequence shards (even: DTensor's Shard chunks by ceil division): outputs and input
    gradients within the fp32 rounding of the two summation orders."""
    for rank, out in enumerate(rank_pools(world).run(dist_cases.sequence_parallel_against_dtensor, device, 0)):
        (y_ref, gx_ref), (y, gx) = out["dtensor"], out["fused_tp"]
        assert y.shape == y_ref.shape and gx.shape == gx_ref.shape
        for name, a, b in (("y", y, y_ref), ("grad_x", gx, gx_ref)):
            err = ((a.double() - b.double()).norm() / b.double().norm()).item()
            assert err <= 1e-5, f"rank {rank}: {name} off DTensor's by {err:.3g}"
