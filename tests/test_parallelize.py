"""fused_tp.parallelize on tiny random-weight Hugging Face models of the Llama family (no downloads), on gloo ranks:
logits, every gradient and greedy generate() as the dense model's."""

import os

import dist_cases
import pytest
import torch
from torch import nn

import fused_tp
from fused_tp.parallelize import head_spans
from fused_tp.tolerance import tol

WORLDS = [int(w) for w in os.environ.get("FUSED_TP_TEST_WORLDS", "2,3,4").split(",")]


# Llama at every world size; Mistral (the same layers, a sliding window) and Qwen2 (q/k/v biases) at 3 and 4; Qwen3
# and Gemma 3 (a norm of each query and key head, its gradient summed over the ranks) at 4, where key/value heads are
# shared; Gemma (GeGLU: the tanh GELU's gate) at 2. Sequence-parallel: Llama at 2 and 4, Gemma 2 (four norms a
# decoder layer) and Qwen2 (q/k/v biases) at 3.
CASES = (
    [("llama", w, False) for w in WORLDS]
    + [(f, w, False) for f in ("mistral", "qwen2") for w in WORLDS if w >= 3]
    + [(f, w, False) for f, at in (("qwen3", 4), ("gemma", 2), ("gemma3", 4)) for w in WORLDS if w == at]
    + [("llama", w, True) for w in WORLDS if w != 3]
    + [(f, w, True) for f in ("gemma2", "qwen2") for w in WORLDS if w == 3]
)


@pytest.mark.parametrize("family, world, sequence_parallel", CASES)
def test_a_parallelized_model_matches_the_dense_one(rank_pools, device, world, family, sequence_parallel):
    """4 query heads in 2 groups over 2, 3 and 4 ranks (at 4, each key/value head on two ranks, its gradient summed
    over them), an intermediate width of 40 split unevenly at 3, Qwen2's q/k/v biases; and sequence-parallel (7
    tokens: shares 4/3, 3/2/2, 2/2/2/1; generate()'s one-token steps leave every rank but the first an empty share):
    norm-wise within the rounding of a few stages of fp32 sums and an all-reduce over the ranks."""
    bound = tol(torch.float32, 64, rounds=world, stages=8).rel
    outs = rank_pools(world).run(dist_cases.parallel_model_step, family, device, bound, sequence_parallel)
    for rank, out in enumerate(outs):
        assert out.pop("generate"), f"rank {rank}: greedy generate() gave other tokens than the dense model"
        # the attention module takes the whole sequence in; the MLP, sequence-parallel, this rank's share
        share = len(torch.tensor_split(torch.arange(7), world)[rank]) if sequence_parallel else 7
        assert out.pop("lengths") == [("attention", 7), ("mlp", share)], f"rank {rank}"
        bad = {name: r for name, r in out.items() if not r <= 1}
        assert not bad, f"rank {rank}: over the bound (ratio): {bad}"


def test_head_spans_and_refusals():
    """Query heads split as tensor_split; each rank's key/value heads are the ones its query heads read."""
    assert head_spans(4, 2, 3) == [(0, 2, 0, 1), (2, 3, 1, 2), (3, 4, 1, 2)]
    assert head_spans(8, 2, 4) == [(0, 2, 0, 1), (2, 4, 0, 1), (4, 6, 1, 2), (6, 8, 1, 2)]
    assert head_spans(32, 8, 8) == [(4 * r, 4 * r + 4, r, r + 1) for r in range(8)]
    with pytest.raises(
        ValueError,
        match=r"num_key_value_heads: 8 query heads in 2 groups over 3 ranks give rank 1 "
        r"query heads \[3, 6\), which do not read key/value heads \[0, 2\) in "
        r"equal groups",
    ):
        head_spans(8, 2, 3)
    with pytest.raises(ValueError, match="num_attention_heads: expected at least one head per rank, got 2 heads for 4"):
        head_spans(2, 2, 4)


def test_a_sequence_parallel_model_compiles_whole(rank_pools):
    """parallelize(sequence_parallel=True) compiled with fullgraph (aot_eager) on 2 gloo ranks, even shares: the
    scatter, the gathers and the layers' collectives trace; logits and every gradient are eager's, bit for bit."""
    for rank, (same_logits, other_grads) in enumerate(rank_pools(2).run(dist_cases.compiled_sequence_parallel_model)):
        assert same_logits and not other_grads, f"rank {rank}: logits equal {same_logits}, other grads {other_grads}"


def test_a_deepcopy_of_a_parallelized_model_shares_its_group_and_steps_alike(rank_pools):
    """copy.deepcopy of a model parallelized on a group of its own (before, TypeError: cannot pickle ProcessGroup):
    the copy runs on the same group, and its gradients (with the norms' and, at 4 ranks, the shared key/value
    heads' sums) are the original's bit for bit, the original's untouched by the copy's step. Pickling the model
    (torch.save) raises an error naming process_group and the way out, not pickle's about a ProcessGroup object."""
    for rank, (same_group, twin_differs, original_changed, saved) in enumerate(
        rank_pools(max(WORLDS)).run(dist_cases.deepcopied_model_step)
    ):
        assert same_group and not twin_differs and not original_changed, (
            f"rank {rank}: same group {same_group}, the copy's other grads {twin_differs}, "
            f"the original's changed {original_changed}"
        )
        assert saved.startswith("process_group: a model with fused_tp layers") and "state_dict" in saved, saved


def test_a_sequence_parallel_model_under_activation_checkpointing_steps_alike(rank_pools):
    """Hugging Face's gradient_checkpointing_enable() on a sequence-parallel Llama at 2 ranks, with and without
    reentrant checkpoints: logits and every gradient are the un-checkpointed model's, bit for bit."""
    for rank, out in enumerate(rank_pools(2).run(dist_cases.checkpointed_model_step)):
        for reentrant, (same_logits, other_grads) in out.items():
            assert same_logits and not other_grads, f"rank {rank}, use_reentrant={reentrant}: grads {other_grads}"


def test_a_sequence_parallel_model_under_fsdp2_sums_its_replicated_gradients(rank_pools):
    """FSDP2 over a sequence-parallel Qwen3 on a 2 x 2 mesh: the norms' and per-head norms' gradients, summed over
    the TP ranks by hooks on the parameters FSDP2 gathers for each forward, are the dense model's, and so are the
    logits (without the hooks' re-registration the norms' gradients were each rank's share: errors of 0.2-1)."""
    bound = tol(torch.float32, 64, rounds=4, stages=8).rel
    for rank, (logits_err, grad_err) in enumerate(rank_pools(4).run(dist_cases.sequence_parallel_2d)):
        assert logits_err <= bound and grad_err <= bound, f"rank {rank}: logits {logits_err:.3g}, grads {grad_err:.3g}"


def test_parallelize_refuses_what_it_cannot_shard():
    with pytest.raises(ValueError, match=r"plan: expected a plan for a Sequential \(without one: LlamaForCausalLM"):
        fused_tp.parallelize(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(
        ValueError,
        match=r"plan\['0'\]: expected one of 'colwise', 'rowwise', 'swiglu', 'attention', "
        r"got 'diagonal'",
    ):
        fused_tp.parallelize(nn.Sequential(nn.Linear(4, 4)), {"0": "diagonal"})
    with pytest.raises(ValueError, match=r"plan\['fc\*'\]: no module of the model has a matching name"):
        fused_tp.parallelize(nn.Sequential(nn.Linear(4, 4)), {"fc*": "colwise"})
    # a module no style can shard, or one two patterns match: raised before the model changes (the first layer, which
    # its style could shard, stays dense)
    dense = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
    with pytest.raises(TypeError, match="linear: expected an nn.Linear, got ReLU"):
        fused_tp.parallelize(dense, {"0": "colwise", "1": "rowwise"})
    with pytest.raises(ValueError, match=r"plan\['\[02\]'\]: module '0' matches '0' too"):
        fused_tp.parallelize(dense, {"0": "colwise", "[02]": "rowwise"})
    # patterns match name by name, as DTensor's parallelize_module: '*' does not reach into "b.a.dense"
    toy = nn.ModuleDict({"a": nn.ModuleDict({"dense": nn.Linear(4, 6)})})
    toy["b"] = nn.ModuleDict({"a": nn.ModuleDict({"dense": nn.Linear(6, 4)})})
    fused_tp.parallelize(toy, {"*.dense": "colwise"})
    assert type(toy.a.dense) is fused_tp.ColumnParallelLinear and type(toy.b.a.dense) is nn.Linear
    _, _, llama = dist_cases._tiny_model()
    with pytest.raises(
        ValueError,
        match=r"plan\['model.layers.\*.mlp.down_proj'\]: module 'model.layers.0.mlp.down_proj' lies inside "
        r"'model.layers.0.mlp', which 'model.layers.\*.mlp' shards whole",
    ):
        fused_tp.parallelize(llama, {"model.layers.*.mlp": "swiglu", "model.layers.*.mlp.down_proj": "rowwise"})
    assert type(llama.model.layers[0].mlp.down_proj) is nn.Linear
    with pytest.raises(ValueError, match=r"sequence_parallel: expected plan=None \(a model of the Llama family"):
        fused_tp.parallelize(dense, {"0": "colwise", "2": "rowwise"}, sequence_parallel=True)
    _, _, llama = dist_cases._tiny_model()
    del llama.model.norm  # not the decoder whose regions sequence parallelism places: refused, nothing changed
    with pytest.raises(
        ValueError, match=r"sequence_parallel: expected the Llama family's decoder \(model.model.layers"
    ):
        fused_tp.parallelize(llama, sequence_parallel=True)
    assert type(llama.model.layers[0].mlp.gate_proj) is nn.Linear
    import transformers  # OLMo-2 normalises the whole query projection, which a split by heads cannot

    config = transformers.Olmo2Config(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4
    )
    olmo = transformers.Olmo2ForCausalLM(config)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_norm: expected a norm over each head's 8"):
        fused_tp.parallelize(olmo, {"model.layers.*.self_attn": "attention", "model.layers.*.mlp": "swiglu"})
    assert type(olmo.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(dense[0]) is nn.Linear and type(dense[2]) is nn.Linear
    model = fused_tp.parallelize(
        nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4)), {"0": "colwise", "2": "rowwise"}
    )
    assert isinstance(model[0], fused_tp.ColumnParallelLinear) and isinstance(model[2], fused_tp.RowParallelLinear)


def test_a_model_parallelized_inside_a_meta_device_block_stays_there():
    """Built and parallelized inside `with torch.device("meta")` (a model of any size, loaded afterwards): every
    shard is on the meta device; from_llama_mlp's check of act_fn computes on the CPU there."""
    with torch.device("meta"):
        mlp = nn.Module()
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(6, 8)
        mlp.act_fn = nn.SiLU()
        model = fused_tp.parallelize(nn.Sequential(mlp, nn.Linear(8, 8)), {"0": "swiglu", "1": "colwise"})
    assert isinstance(model[0], fused_tp.ParallelMLP) and all(p.is_meta for p in model.parameters())


def test_a_dense_checkpoint_of_another_size_is_refused(tmp_path):
    """load_dense_state_dict checks each dense tensor's shape against the model's layer before it reads the rank's
    slice (from a state dict or a safetensors file): a checkpoint of a wider model would otherwise load a slice of
    the wrong tensor without an error. The right checkpoint loads bit for bit."""
    dense, other = (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4)) for _ in range(2))
    model = fused_tp.parallelize(other, {"0": "colwise", "2": "rowwise"})  # other weights: loading must change them
    assert not torch.equal(fused_tp.checkpoint.dense_state_dict(model)["0.weight"], dense[0].weight)
    wider = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 4)).state_dict()
    message = r"source: '0.weight' has shape \(7, 4\), expected \(6, 4\) \(the model's layer\)"
    with pytest.raises(ValueError, match=message):
        fused_tp.checkpoint.load_dense_state_dict(model, wider)
    save_file = pytest.importorskip("safetensors.torch").save_file
    save_file(wider, tmp_path / "wider.safetensors")
    with pytest.raises(ValueError, match=message):
        fused_tp.checkpoint.load_dense_state_dict(model, str(tmp_path / "wider.safetensors"))
    fused_tp.checkpoint.load_dense_state_dict(model, dense.state_dict())
    loaded = fused_tp.checkpoint.dense_state_dict(model)
    assert loaded.keys() == dense.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in dense.state_dict().items())


def test_checkpoints_round_trip_between_any_two_world_sizes(rank_pools, tmp_path):
    """At TP = 1-4 the gathered state dict of a parallelized Llama is the dense one, bit for bit, under the dense
    names (the fused SwiGLU's fc1 back to gate_proj and up_proj); the dense safetensors file written at each loads
    into a meta-device model at TP = 1-4, each rank reading its slices, and gathers back to the file bit for bit;
    so do DCP checkpoints saved at TP = N (dcp.save and dcp.async_save of the state dict, whose shards carry their
    place, and of get_model_state_dict's; a state dict of plain tensors with SavePlanner), loaded with LoadPlanner at
    TP = 5 - N, where DCP's default load planner refuses the shards."""
    from safetensors.torch import load_file

    files = {}
    for world in (1, 2, 3, 4):
        files[world] = str(tmp_path / f"tp{world}.safetensors")
        assert all(rank_pools(world).run(dist_cases.checkpoint_save, files[world])), f"TP {world}: gathered != dense"
    first = load_file(files[1])
    for world in (2, 3, 4):
        assert all(torch.equal(first[k], v) for k, v in load_file(files[world]).items())
    bound = tol(torch.float32, 64, rounds=4, stages=8).rel
    for world in (1, 2, 3, 4):
        loaded = rank_pools(world).run(dist_cases.checkpoint_load, files[5 - world])
        for rank, (same, on_meta, err) in enumerate(loaded):
            assert same and not on_meta, f"TP {world}, rank {rank}: loaded shards gather to other tensors {on_meta}"
            assert err <= bound, f"TP {world}, rank {rank}: logits off the dense model's by {err:.3g}"


def test_optimizer_states_round_trip_through_dcp(rank_pools, tmp_path):
    """With place_optimizer_state, DCP checkpoints of an MLP and its Adam (DCP's get_state_dict) saved at TP 2 and
    3 load at TP 2 and 3 (the same size, and the other), the Adam states gathering to the saved dense ones bit for
    bit and held as plain tensors; DCP's default load planner refuses them. Without it each state is saved as a
    whole tensor, one rank's for all: the same-size loads fail."""
    for world in (2, 3):
        rank_pools(world).run(dist_cases.optimizer_checkpoint_save, str(tmp_path / f"tp{world}"))
    for world in (2, 3):
        for saved in (2, 3):
            out = rank_pools(world).run(dist_cases.optimizer_checkpoint_load, str(tmp_path / f"tp{saved}"))
            for rank, (same, plain, refused) in enumerate(out):
                assert same, f"TP {saved} -> {world}, rank {rank}: the loaded Adam states are not the saved ones"
                assert plain and refused, f"TP {saved} -> {world}, rank {rank}: plain {plain}, refused {refused}"


def test_a_state_with_no_place_in_the_dense_tensor_is_refused():
    """An optimizer state of a shard not of the shard's shape (a factored moment) raises at state_dict(), naming
    it, where a placed state dict would otherwise save it as replicated; scalars (step counts) stay as they are."""
    layer = fused_tp.ColumnParallelLinear(8, 6)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    fused_tp.checkpoint.place_optimizer_state(optimizer, layer)
    optimizer.state[layer.weight] = {"step": torch.tensor(1.0), "row_var": torch.zeros(6, 1)}
    with pytest.raises(ValueError, match="optimizer: its state 'row_var' of a fused_tp shard is of shape"):
        optimizer.state_dict()
    optimizer.state[layer.weight] = {"step": torch.tensor(1.0), "momentum_buffer": torch.zeros(6, 8)}
    state = optimizer.state_dict()["state"][0]
    assert type(state["step"]) is torch.Tensor and type(state["momentum_buffer"]).__name__ == "PlacedShard"
    assert type(optimizer.state[layer.weight]["momentum_buffer"]) is torch.Tensor  # the optimizer's own untouched


def test_a_layers_state_dict_entries_are_tensors_that_know_their_place():
    """A layer's state dict holds its shards as PlacedShard (world size 1 here: the shard is the dense tensor) with
    the place DCP reads; every op returns plain tensors, torch.save writes plain ones (torch.load's weights_only
    takes them), a deep copy keeps the place, load_state_dict takes the entries (with assign=True as plain
    Parameters), keep_vars gives the Parameters, and a Row layer's whole bias is a plain tensor."""
    import copy
    import io

    from fused_tp.checkpoint import PlacedShard

    col, row = fused_tp.ColumnParallelLinear(8, 6), fused_tp.RowParallelLinear(6, 8)
    sd = col.state_dict()
    assert all(type(v) is PlacedShard for v in sd.values())
    assert (sd["weight"].offsets, sd["weight"].dense_size) == (torch.Size([0, 0]), torch.Size([6, 8]))
    assert (sd["bias"].offsets, sd["bias"].dense_size) == (torch.Size([0]), torch.Size([6]))
    assert type(sd["weight"] + 1) is torch.Tensor and type(sd["weight"].clone()) is torch.Tensor
    assert type(sd["weight"].view_as(torch.empty(48))) is torch.Tensor  # another shape: no place
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert all(type(v) is torch.Tensor and torch.equal(v, sd[k]) for k, v in loaded.items())
    copied = copy.deepcopy(sd)
    assert type(copied["weight"]) is PlacedShard and copied["weight"].offsets == sd["weight"].offsets
    assert copied["weight"].data_ptr() != sd["weight"].data_ptr() and torch.equal(copied["weight"], sd["weight"])
    other = fused_tp.ColumnParallelLinear(8, 6)
    other.load_state_dict(copied)
    assert torch.equal(other.weight, col.weight) and torch.equal(other.bias, col.bias)
    assert all(type(v) is nn.Parameter for v in col.state_dict(keep_vars=True).values())
    # assign=True makes Parameters of the entries: plain ones (nn.Parameter refuses PlacedShard itself); the
    # caller's dict keeps its entries
    on_meta = fused_tp.ColumnParallelLinear(8, 6, device="meta")
    on_meta.load_state_dict(sd, assign=True)
    assert type(on_meta.weight) is nn.Parameter and type(on_meta.weight.data) is torch.Tensor
    assert torch.equal(on_meta.weight, col.weight) and all(type(v) is PlacedShard for v in sd.values())
    with pytest.raises(RuntimeError, match="Creating a Parameter from an instance of type PlacedShard"):
        nn.Parameter(sd["weight"])
    assert type(nn.Parameter(fused_tp.checkpoint.unplaced(sd["weight"])).data) is torch.Tensor
    row_sd = row.state_dict()
    assert type(row_sd["weight"]) is PlacedShard and type(row_sd["bias"]) is torch.Tensor


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_a_2d_checkpoint_round_trips_through_dcp(rank_pools, tmp_path, activation):
    """FSDP2 over TP on a 2 x 2 mesh (gloo): DCP checkpoints of the 2-D ParallelMLP (dcp.save and dcp.async_save of
    its state dict, and a plain copy with SavePlanner) load with LoadPlanner into the MLP at TP 4 and at 2 x 2, bit
    for bit; DCP's default load planner refuses the shards; an Adam's states saved with it load at 2 x 2 bit for
    bit."""
    for rank, out in enumerate(rank_pools(4).run(dist_cases.checkpoint_2d, str(tmp_path / "ck"), activation)):
        assert out.pop("refused"), f"rank {rank}: DCP's default load planner took the shards"
        assert out.pop("optimizer"), f"rank {rank}: the loaded Adam states are not the saved ones"
        bad = {saved: ok for saved, ok in out.items() if ok != (True, True)}
        assert not bad, f"rank {rank}: (TP 4 == dense, 2-D == saved) per checkpoint: {bad}"


def test_save_pretrained_writes_the_dense_checkpoint(rank_pools, tmp_path):
    """A parallelized model's own save_pretrained refuses, naming the function that works; that one writes the dense
    checkpoint (rank 0, after the gather on every rank), here over several files, and from_pretrained loads the
    dense model bit for bit, as load_dense_state_dict does into a parallelized meta-device model from the
    directory and from its index file."""
    for refusal, files, same in rank_pools(3).run(dist_cases.pretrained_round_trip, str(tmp_path / "tp3")):
        assert refusal is not None and "fused_tp.checkpoint.save_pretrained(model, directory)" in refusal
        assert len(files) > 1, files
        assert same == [True, True, True], "from_pretrained, the directory, the index file"
