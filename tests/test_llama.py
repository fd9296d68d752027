"""A real client: a Hugging Face LlamaForCausalLM (tiny config, random weights, no download) whose MLP projections are
fused_tp layers (gate and up column-parallel, down row-parallel, world size 1), against the dense model, eagerly and
under torch.compile(fullgraph=True, dynamic=True): aot_eager on the CPU (the interpreter runs the kernels), inductor
too on a GPU."""

import copy

import pytest
import torch
import torch._dynamo.testing
from transformers import LlamaConfig, LlamaForCausalLM

import fused_tp
from fused_tp.tolerance import tol

BACKENDS = ["aot_eager", "inductor"] if torch.cuda.is_available() else ["aot_eager"]


def _models(device):
    """(dense model, the same with fused_tp MLP projections), equal weights, fp32."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
    )
    dense = LlamaForCausalLM(config).to(device)
    model = LlamaForCausalLM(config).to(device)
    model.load_state_dict(dense.state_dict())
    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.gate_proj = fused_tp.ColumnParallelLinear.from_linear(mlp.gate_proj)
        mlp.up_proj = fused_tp.ColumnParallelLinear.from_linear(mlp.up_proj)
        mlp.down_proj = fused_tp.RowParallelLinear.from_linear(mlp.down_proj)
    return dense, model


def _assert_near(name: str, out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """||out - ref|| <= rel * ||ref||: a whole transformer has no elementwise magnitude to scale with (the tolerance
    table's |x| @ |w|.T), so the bound is on the norm."""
    err = (out.double() - ref.double()).norm().item()
    assert err <= rel * ref.double().norm().item(), (
        f"{name}: relative error {err / ref.double().norm():.3g} > {rel:.3g}"
    )


def _step(fn, model, ids):
    """(logits, {parameter name: gradient}) of one forward and backward of sum(logits * fixed weights)."""
    model.zero_grad(set_to_none=True)
    logits = fn(ids).logits
    weights = torch.linspace(-1, 1, logits.numel(), device=logits.device).view_as(logits)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_with_fused_tp_mlps_matches_dense_and_compiles_whole(device, backend):
    """Eager: logits and every gradient as the dense model's (fp32, within the rounding of a few stages of sums
    over the hidden and intermediate widths). Compiled whole (fullgraph: no graph break), at two sequence lengths
    through one compile, within the same bound of eager. Not bitwise, even under aot_eager: AOTAutograd decomposes
    some of the model's own operators (SiLU's and the embedding's backward; on a GPU also the forward's) into
    other sums; graphs of fused_tp's layers alone are compared bitwise in test_compile.py."""
    dense, model = _models(device)
    bound = tol(torch.float32, 64, stages=8, tf32=device == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(1)
    frames = None
    for seq in (8, 13):
        ids = torch.randint(0, 96, (2, seq), generator=gen).to(device)
        ref, ref_grads = _step(dense, dense, ids)
        eager, eager_grads = _step(model, model, ids)
        traced, traced_grads = _step(compiled, model, ids)
        # the dense model's parameter names: fused_tp's layers keep weight and bias under the same names
        assert set(eager_grads) == set(ref_grads) == set(traced_grads)
        for name, (a, b) in {"logits": (eager, ref), **{n: (eager_grads[n], ref_grads[n]) for n in ref_grads}}.items():
            _assert_near(f"seq {seq}: {name}", a, b, bound.rel)
        for name, (a, b) in {
            "logits": (traced, eager),
            **{n: (traced_grads[n], eager_grads[n]) for n in eager_grads},
        }.items():
            _assert_near(f"seq {seq}: {name}", a, b, bound.rel)
        frames = counter.frame_count if frames is None else frames
    assert counter.frame_count == frames, "a new sequence length recompiled"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parallelized_llama_compiles_whole(device, backend):
    """fused_tp.parallelize(model) (q, k, v column-parallel by heads, o_proj row-parallel, each MLP a SwiGLU
    ParallelMLP) at world size 1, compiled whole: logits and every attention projection's gradients as the dense
    model's, eagerly and compiled, within test 1's bound (the SwiGLU MLPs' gradients: the next test)."""
    dense, _ = _models(device)
    model = copy.deepcopy(dense)
    fused_tp.parallelize(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, fused_tp.ColumnParallelLinear)
    bound = tol(torch.float32, 64, stages=8, tf32=device == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1)).to(device)
    ref, ref_grads = _step(dense, dense, ids)
    for fn in (model, compiled):
        logits, grads = _step(fn, model, ids)
        _assert_near("logits", logits, ref, bound.rel)
        attention = [n for n in grads if "self_attn" in n]
        assert len(attention) == 4 * len(model.model.layers)
        for name in attention:
            _assert_near(name, grads[name], ref_grads[name], bound.rel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_with_fused_swiglu_mlps_matches_dense_and_compiles_whole(device, backend):
    """Each LlamaMLP replaced whole by ParallelMLP.from_llama_mlp (gate and up in one launch, SwiGLU in its
    epilogue): logits and every gradient as the dense model's, the MLP's mapped back to gate_proj / up_proj /
    down_proj (fc1's rows interleave gate's and up's), eagerly and compiled whole, within test 1's bound."""
    dense, model = _models(device)
    for layer, dense_layer in zip(model.model.layers, dense.model.layers):
        layer.mlp = fused_tp.ParallelMLP.from_llama_mlp(dense_layer.mlp)
    bound = tol(torch.float32, 64, stages=8, tf32=device == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)

    def dense_names(grads):
        out = {}
        for name, g in grads.items():
            prefix, _, leaf = name.rpartition("mlp.")
            if leaf == "fc1.weight":
                out[prefix + "mlp.gate_proj.weight"], out[prefix + "mlp.up_proj.weight"] = g[0::2], g[1::2]
            elif leaf == "fc2.weight":
                out[prefix + "mlp.down_proj.weight"] = g
            else:
                out[name] = g
        return out

    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1)).to(device)
    ref, ref_grads = _step(dense, dense, ids)
    for fn in (model, compiled):
        logits, grads = _step(fn, model, ids)
        grads = dense_names(grads)
        assert set(grads) == set(ref_grads)
        for name, (a, b) in {"logits": (logits, ref), **{n: (grads[n], ref_grads[n]) for n in ref_grads}}.items():
            _assert_near(name, a, b, bound.rel)
