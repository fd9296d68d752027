"""Sharding a whole model: `parallelize(model)` replaces its attention and MLP projections by fused_tp layers, in
place, on every rank of a group. Built on modules.py; the only collective of its own is the gradient sum of
key/value heads that several ranks hold (below).

    plan style     what it takes                                  what it becomes
    "colwise"      an nn.Linear                                   ColumnParallelLinear.from_linear
    "rowwise"      an nn.Linear                                   RowParallelLinear.from_linear
    "swiglu"       a gated MLP (gate_proj, up_proj, down_proj,    ParallelMLP.from_llama_mlp: gate and up in one
                   a SiLU act_fn: Hugging Face's LlamaMLP)        launch, SwiGLU in its epilogue
    "attention"    an attention module (q_proj, k_proj, v_proj,   q, k, v column-parallel by whole heads, o_proj
                   o_proj, head_dim, num_key_value_groups:        row-parallel over the same heads; the module's
                   Hugging Face's LlamaAttention)                 num_key_value_groups set to this rank's

Heads split as torch.tensor_split splits them: rank r keeps query heads [a, b) of H, and the key/value heads those
heads read, [a // G, (b - 1) // G + 1) of H / G (G query heads share one key/value head). A key/value head that
several ranks need (fewer key/value heads than ranks, or a group cut by the split) is held by each of them, as
Megatron-LM and vLLM replicate them; its weight gradient is then the sum of what those ranks compute, which a hook
on the parameter adds up over the group (eagerly; one all-reduce of the dense key/value weight's size per
parameter). A rank's query heads must read its key/value heads in equal groups (Hugging Face's repeat_kv), else
parallelize raises ValueError naming num_key_value_heads.

With sequence_parallel=True (the Llama family's own plan), what runs between the parallel regions runs on each
rank's share of the sequence (dim 1, torch.tensor_split's shares, uneven ones too), as in Megatron-LM: the first
decoder layer's input is split (its gradient gathered in backward); the norms and residual adds run on the share,
their parameters' gradients summed over the group; the attention module's input is
gathered, since Hugging Face's attention takes its shapes from it (its q, k and v layers' all-reduced input
gradients give every rank the whole sequence's, of which backward keeps this rank's slice), and o_proj
reduce-scatters its output along the sequence in place of the all-reduce; each MLP is a sequence-parallel
ParallelMLP (its input gathered inside, its output reduce-scattered); the final norm's output is gathered for the
LM head. Hidden states returned by output_hidden_states are the shares.
"""

from __future__ import annotations

import fnmatch
import functools

import torch
import torch.distributed as dist
from torch import nn

from .autograd import SharesGroup, gather_sequence, group_size_rank, resolve_group, scatter_sequence, shard_range
from .checkpoint import RefuseShardedSave
from .grads import grad_hooks, sum_grads
from .modules import ColumnParallelLinear, ParallelMLP, RowParallelLinear

# The Hugging Face causal LMs whose decoder layers are Llama's: LlamaAttention-like self_attn (Qwen3's with a norm
# of each head's queries and keys), LlamaMLP-like mlp.
LLAMA_FAMILY = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)
LLAMA_PLAN = {"model.layers.*.self_attn": "attention", "model.layers.*.mlp": "swiglu"}
STYLES = ("colwise", "rowwise", "swiglu", "attention")


def parallelize(
    model: nn.Module, plan: dict[str, str] | None = None, process_group=None, *, sequence_parallel: bool = False
) -> nn.Module:
    """Shard `model` in place over `process_group` (default: the default group; or a 1-D DeviceMesh) and return it.

    plan: {module-name pattern: style of the table above}, a pattern matched against named_modules' names one
    dot-separated part at a time, as DTensor's parallelize_module matches (fnmatch within a part: "layers.*.mlp"
    matches "layers.0.mlp", not "layers.0.block.mlp"); None for a
    Hugging Face model of LLAMA_FAMILY, whose every attention and MLP is sharded (LLAMA_PLAN). Every rank must hold
    the same dense model (the same seed, or the same checkpoint loaded), as tensor parallelism's replicated input
    needs; the rest of the model (embeddings, norms, the LM head) stays replicated. A pattern that matches nothing
    raises ValueError, so a plan cannot silently leave a model dense. A Hugging Face model's save_pretrained then
    raises, pointing to fused_tp.checkpoint.save_pretrained, which writes the dense checkpoint.

    sequence_parallel: the regions between the parallel ones on each rank's share of the sequence (above), for a
    model of LLAMA_FAMILY without a plan (ValueError naming sequence_parallel otherwise)."""
    process_group = resolve_group(process_group)
    if sequence_parallel and plan is not None:
        raise ValueError(
            "sequence_parallel: expected plan=None (a model of the Llama family, whose regions parallelize knows); "
            "with a plan, give the layers sequence_parallel=True and place the sequence's gathers yourself"
        )
    if plan is None:
        if type(model).__name__ not in LLAMA_FAMILY:
            raise ValueError(
                f"plan: expected a plan for a {type(model).__name__} (without one: {', '.join(LLAMA_FAMILY)})"
            )
        plan = LLAMA_PLAN
    for pattern, style in plan.items():
        if style not in STYLES:
            raise ValueError(f"plan[{pattern!r}]: expected one of {', '.join(map(repr, STYLES))}, got {style!r}")
    names = [name.split(".") for name, _ in model.named_modules() if name]
    matched_by = {}
    for pattern in plan:
        parts = pattern.split(".")
        found = [".".join(n) for n in names if len(n) == len(parts) and all(map(fnmatch.fnmatchcase, n, parts))]
        if not found:
            raise ValueError(f"plan[{pattern!r}]: no module of the model has a matching name")
        for name in found:
            if name in matched_by:
                raise ValueError(f"plan[{pattern!r}]: module {name!r} matches {matched_by[name]!r} too")
            matched_by[name] = pattern
    # a module inside one that another pattern shards would be sharded in the discarded dense module
    for name, pattern in matched_by.items():
        outer = next((o for o in matched_by if name.startswith(o + ".")), None)
        if outer is not None:
            raise ValueError(
                f"plan[{pattern!r}]: module {name!r} lies inside {outer!r}, which {matched_by[outer]!r} shards whole"
            )
    # every shard built before the model changes, so that bad input (a module a style cannot shard, a head count)
    # leaves it as it was; the cost, for the call, is the new shards' memory beside the dense layers
    sequence = dict(sequence_parallel=True, sequence_dim=1) if sequence_parallel else {}
    if sequence_parallel:
        _check_decoder(model)
    changes = []
    for name, pattern in matched_by.items():
        parent, _, leaf = name.rpartition(".")
        changes += _shard(model.get_submodule(parent), leaf, plan[pattern], name, process_group, sequence)
    for change in changes:
        change() if callable(change) else setattr(*change)
    if sequence_parallel:
        _sequence_regions(model.model, process_group)
    if hasattr(model, "save_pretrained"):  # a Hugging Face model: its own would write one rank's shards
        model.save_pretrained = RefuseShardedSave()
    return model


def _shard(owner: nn.Module, leaf: str, style: str, name: str, group, sequence: dict) -> list:
    """The changes (module, attribute, new value), or calls, that shard `owner.<leaf>` (named `name`) in `style`;
    `sequence`: the sequence-parallel options of the layers whose output leaves a parallel region (none without
    it)."""
    module = getattr(owner, leaf)
    if style == "colwise":
        return [(owner, leaf, ColumnParallelLinear.from_linear(module, process_group=group))]
    if style == "rowwise":
        return [(owner, leaf, RowParallelLinear.from_linear(module, process_group=group))]
    if style == "swiglu":
        return [(owner, leaf, ParallelMLP.from_llama_mlp(module, process_group=group, **sequence))]
    return _shard_attention(module, name, group, sequence)


def _check_decoder(model: nn.Module) -> None:
    """ValueError naming sequence_parallel unless `model` has the Llama family's decoder: model.model.layers, each
    with self_attn and mlp, and model.model.norm."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if (
        not hasattr(inner, "norm")
        or not layers
        or not all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in layers)
    ):
        raise ValueError(
            "sequence_parallel: expected the Llama family's decoder (model.model.layers with self_attn and mlp; "
            "model.model.norm)"
        )


def _sequence_regions(inner: nn.Module, group) -> None:
    """The hooks that put a Llama-family decoder's regions between the parallel ones on each rank's share of the
    sequence (the module docstring); the projections are already sequence-parallel. What a decoder layer holds
    besides its attention and MLP (its norms: two in Llama's, four in Gemma 2's) runs on the share, and so does
    the final norm: their gradients are summed over the group."""
    inner.layers[0].register_forward_pre_hook(_OnHiddenStates(scatter_sequence, group), with_kwargs=True)
    for layer in inner.layers:
        layer.self_attn.register_forward_pre_hook(_OnHiddenStates(gather_sequence, group), with_kwargs=True)
        for name, child in layer.named_children():
            if name not in ("self_attn", "mlp"):
                sum_grads(child, group)
        if any(True for _ in layer.parameters(recurse=False)):
            sum_grads(layer, group, lambda name: "." not in name)
    inner.norm.register_forward_hook(lambda module, args, out: gather_sequence(out, 1, group))
    sum_grads(inner.norm, group)


class _OnHiddenStates(SharesGroup):
    """A forward pre-hook (with kwargs) applying fn(hidden_states, 1, group) to a module's hidden_states, given
    first or by name."""

    def __init__(self, fn, group):
        self.fn, self.group = fn, group

    def __call__(self, module, args, kwargs):
        if args:
            return (self.fn(args[0], 1, self.group), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.fn(kwargs["hidden_states"], 1, self.group)}


def head_spans(heads: int, kv_heads: int, world: int, where: str = "") -> list[tuple[int, int, int, int]]:
    """(a, b, kv_a, kv_b) of every rank: its query heads [a, b) and the key/value heads [kv_a, kv_b) they read.
    ValueError naming the head counts where a rank would get no query head, or query heads that do not read its
    key/value heads in equal groups (repeat_kv gives local query head i the key/value head i // group)."""
    if heads < world:
        raise ValueError(
            f"num_attention_heads: expected at least one head per rank, got {heads} heads for {world} ranks{where}"
        )
    groups = heads // kv_heads
    spans = []
    for rank in range(world):
        a, b = shard_range(heads, world, rank)
        kv_a, kv_b = a // groups, (b - 1) // groups + 1
        local = (b - a) // (kv_b - kv_a)
        if (b - a) % (kv_b - kv_a) or any((a + i) // groups - kv_a != i // local for i in range(b - a)):
            raise ValueError(
                f"num_key_value_heads: {heads} query heads in {kv_heads} groups over {world} ranks give "
                f"rank {rank} query heads [{a}, {b}), which do not read key/value heads [{kv_a}, "
                f"{kv_b}) in equal groups{where}"
            )
        spans.append((a, b, kv_a, kv_b))
    return spans


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _shard_attention(attn: nn.Module, name: str, group, sequence: dict) -> list:
    for part in (*PROJECTIONS, "head_dim", "num_key_value_groups"):
        if not hasattr(attn, part):
            raise ValueError(f"{name}: expected an attention module with {part} (Hugging Face's LlamaAttention)")
    d = attn.head_dim
    for part in ("q_norm", "k_norm"):  # Qwen3's and Gemma3's normalise each head; OLMo-2's the whole projection
        weight = getattr(getattr(attn, part, None), "weight", None)
        if weight is not None and weight.numel() != d:
            raise ValueError(
                f"{name}.{part}: expected a norm over each head's {d} features, got one over {weight.numel()} (the "
                "whole projection's): split by heads, its statistics would be each rank's heads' alone"
            )
    heads, kv_heads = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    world, rank = group_size_rank(group)
    spans = head_spans(heads, kv_heads, world, f" ({name})")
    a, b, kv_a, kv_b = spans[rank]
    shared = any(s[3] > t[2] for s, t in zip(spans, spans[1:]))  # a key/value head on two ranks
    changes = [(attn, "q_proj", ColumnParallelLinear._from_linear(attn.q_proj, (a * d, b * d), process_group=group))]
    for part in ("k_proj", "v_proj"):
        layer = ColumnParallelLinear._from_linear(getattr(attn, part), (kv_a * d, kv_b * d), process_group=group)
        if shared:
            rows = functools.partial(_SharedRowsGrad, kv_heads * d, kv_a * d, group)
            grad_hooks(layer, rows, "_fused_tp_shared_rows")
        changes.append((attn, part, layer))
    o_proj = RowParallelLinear._from_linear(attn.o_proj, (a * d, b * d), process_group=group, **sequence)
    changes.append((attn, "o_proj", o_proj))
    changes.append((attn, "num_key_value_groups", (b - a) // (kv_b - kv_a)))

    # The attention's other parameters (a per-head norm's weight) are every rank's alike, but each rank's gradient
    # is its own heads' share: summed over the group, it is the dense one (a key/value head that several ranks hold
    # gets each one's part).
    def other(part: str) -> bool:
        return part.partition(".")[0] not in PROJECTIONS

    if any(other(part) for part, _ in attn.named_parameters()):
        changes.append(lambda: sum_grads(attn, group, other))
    return changes


class _SharedRowsGrad(SharesGroup):
    """A parameter hook: the gradient of rows [start, start + n) of a dense [rows, ...] parameter that other ranks
    hold too, summed over the group (each rank adds its rows into a dense buffer of zeros; one all-reduce)."""

    def __init__(self, rows: int, start: int, group):
        self.rows, self.start, self.group = rows, start, group

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        dense = grad.new_zeros((self.rows, *grad.shape[1:]))
        dense[self.start : self.start + grad.shape[0]] = grad
        dist.all_reduce(dense, group=self.group)
        return dense[self.start : self.start + grad.shape[0]]
