"""Gradients across ranks for a training step with fused_tp's layers: what the layers themselves cannot do.

    clip_grad_norm_(model, max_norm, norm_type=2.0)   torch.nn.utils.clip_grad_norm_ with the norm of the dense
                                                      model's gradients: the same on every rank
    sequence_parallel_grads(module, process_group)    the gradients of a module each rank runs on its share of the
                                                      sequence (a norm between sequence-parallel regions) summed
                                                      over the group in backward: the whole sequence's, on every rank

torch's clip_grad_norm_ on a tensor-parallel model takes each rank's own norm, in which a sharded weight counts
with this rank's shard only: the ranks then scale by different factors, and the parameters every rank holds (norms,
embeddings, a Row layer's bias) drift apart, silently. Here the sharded parameters of fused_tp's layers (Column's
weight and bias, Row's weight) add their ranks' shares over the layers' group, each dense element once (a
key/value head that parallelize puts on several ranks counts once), and every other parameter counts once, as one
every rank holds alike.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .autograd import SharesGroup, group_size_rank, resolve_group
from .guard import collective_device
from .modules import _ParallelLinear


def clip_grad_norm_(
    model: nn.Module, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> torch.Tensor:
    """Scale every gradient of `model` in place by min(1, max_norm / (total + 1e-6)), as
    torch.nn.utils.clip_grad_norm_ does, where total is the `norm_type` norm of the dense model's gradients, summed
    in fp32; returns total (fp32, the same on every rank). Call it on every rank of the layers' group, after
    backward (it runs collectives). Parameters outside fused_tp's layers are taken as replicated: a module
    sharded by other means is counted as if every rank held all of it. ValueError naming `model` where its layers
    are on more than one process group; RuntimeError, on every rank alike, where error_if_nonfinite and the total
    is NaN or infinite; ValueError for DTensor gradients (a model sharded again by FSDP2); TypeError naming `model`
    for anything but a module (torch's parameters, say)."""
    if not isinstance(model, nn.Module):  # torch's takes parameters; which of them are shards is the model's
        raise TypeError(
            f"model: expected the nn.Module whose gradients to clip, got {type(model).__name__} (torch's "
            "clip_grad_norm_(model.parameters(), ...) is fused_tp.clip_grad_norm_(model, ...): its fused_tp layers "
            "tell which parameters are shards)"
        )
    layers = [m for m in model.modules() if isinstance(m, _ParallelLinear)]
    groups = {id(_named(layer.process_group)) for layer in layers}
    if len(groups) > 1:
        raise ValueError("model: expected its fused_tp layers on one process group, found several")
    group = layers[0].process_group if layers else None
    params = [p for p in model.parameters() if p.grad is not None]
    if any(isinstance(p.grad, DTensor) for p in params):  # FSDP2's shards: their own norm across the mesh
        raise ValueError("model: expected plain tensor gradients, got DTensor ones (FSDP2's, say): not supported")
    p_norm = float(norm_type)
    device = params[0].grad.device if params else torch.device("cpu")
    sharded, seen = [], set()
    world = group_size_rank(group)[0] if layers else 1
    all_spans = _every_rank_span(layers, group, world)
    for layer, spans in zip(layers, all_spans):
        split = [(layer.weight, layer._split_dim)] + ([(layer.bias, 0)] if layer._split_dim == 0 else [])
        for t, dim in split:
            seen.add(id(t))
            if t is not None and t.grad is not None:
                sharded.append(_norm_part(t.grad, dim, layer.shard_span, spans, p_norm))
    replicated = [_norm_part(p.grad, None, None, None, p_norm) for p in params if id(p) not in seen]
    shared = _combine(sharded, p_norm, device)
    if world > 1:
        where = collective_device(group)
        shared = shared.to(where)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX if math.isinf(p_norm) else dist.ReduceOp.SUM, group=group)
        shared = shared.to(device)
    total = _combine([shared, _combine(replicated, p_norm, device)], p_norm, device)
    if not math.isinf(p_norm):
        total = total ** (1.0 / p_norm)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with torch.no_grad():
        for p in params:
            p.grad.mul_(scale.to(p.grad.device))  # an fp32 scalar tensor, as torch's clip multiplies by
    return total


def _named(group):
    """The group a layer's process_group stands for: None is the default group (where there is one)."""
    return dist.group.WORLD if group is None and dist.is_initialized() else group


def sequence_parallel_grads(module: nn.Module, process_group=None) -> nn.Module:
    """Make every parameter of `module` get, in backward, its gradient summed over `process_group` (default: the
    default group; or a 1-D DeviceMesh), and return `module`. For what each rank runs on its own share of the
    sequence between sequence-parallel layers (a norm, a bias added to the residual): its gradient on a rank is that
    share's alone, so without the sum the replicated parameter would get a different update on every rank; the sum
    is the whole sequence's (what Megatron-LM's all-reduce of sequence-parallel gradients and DTensor's
    SequenceParallel do). One all-reduce per parameter per backward, eagerly; a parameter already summed so is
    left as it is (calling this twice does not sum twice). World size 1: nothing to do. Under FSDP2's fully_shard,
    applied after this call, each forward of the module puts the sum on the parameters FSDP2 gathered for it
    (grad_hooks)."""
    sum_grads(module, resolve_group(process_group))
    return module


def sum_grads(module: nn.Module, group, params: Callable[[str], bool] | None = None) -> None:
    """sequence_parallel_grads for the parameters of `module` whose names `params` accepts (None: all), on a group
    already resolved: for parameters every rank holds alike whose gradient each rank computes from its own part of
    the work."""
    if group_size_rank(group)[0] > 1:
        grad_hooks(module, functools.partial(_SummedGrad, group), "_fused_tp_sequence_summed", params)


def grad_hooks(module: nn.Module, make_hook, tag: str, params: Callable[[str], bool] | None = None) -> None:
    """A tensor hook make_hook() on each parameter of `module` (those whose names `params` accepts) that requires a
    gradient, once per parameter object (marked `tag`): now, and after each eager forward of `module` on the objects
    it used. FSDP2's fully_shard (of `module` or of a module around it), applied after, swaps the module's
    parameters for sharded ones and, for each forward, for unsharded ones whose gradients it reduces: a hook on the
    objects of now would never run. A forward hook rather than a pre-hook: it runs before FSDP2's own post-forward
    hook on `module` (registered later) puts the sharded ones back, and after its pre-forward gather."""
    keeper = _HookKeeper(make_hook, tag, params)
    keeper(module)
    module.register_forward_hook(keeper)


class _HookKeeper:
    """grad_hooks' forward hook (it registers nothing while torch.compile traces: the hooks of the first call
    serve a compiled module, whose parameters stay the same objects)."""

    def __init__(self, make_hook, tag: str, params):
        self.make_hook, self.tag, self.params = make_hook, tag, params

    def __call__(self, module: nn.Module, *args) -> None:
        if torch.compiler.is_compiling():
            return
        for name, p in module.named_parameters():
            if (self.params is None or self.params(name)) and p.requires_grad and not getattr(p, self.tag, False):
                p.register_hook(self.make_hook())
                setattr(p, self.tag, True)


class _SummedGrad(SharesGroup):
    """A parameter hook: the gradient summed over the group (a new tensor: the hook's input is autograd's)."""

    def __init__(self, group):
        self.group = group

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        summed = grad.clone()
        dist.all_reduce(summed, group=self.group)
        return summed


def _every_rank_span(layers: list, group, world: int) -> list[list[tuple[int, int]]]:
    """Per layer, every rank's shard_span, in one all-gather for all the layers."""
    if world == 1 or not layers:
        return [[layer.shard_span] for layer in layers]
    mine = torch.tensor([layer.shard_span for layer in layers], dtype=torch.int64, device=collective_device(group))
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    return [[tuple(every[r][i].tolist()) for r in range(world)] for i in range(len(layers))]


def _norm_part(grad: torch.Tensor, dim: int | None, span, spans, p_norm: float) -> torch.Tensor:
    """This tensor's part of the total (|g|^p summed, or with p = inf the largest |g|), in fp32; for a shard along
    `dim` ([start, stop) = span of the dense tensor's dim), each index divided by how many ranks' spans hold it."""
    g = grad.detach().float().abs()
    if math.isinf(p_norm):
        return g.max() if g.numel() else g.new_zeros(())
    g = g.pow(p_norm)
    if dim is None:
        return g.sum()
    start, stop = span
    holders = torch.zeros(stop - start, device=g.device)
    for a, b in spans:
        lo, hi = max(a, start), min(b, stop)
        if lo < hi:
            holders[lo - start : hi - start] += 1
    per_index = g.sum(dim=1 - dim) if g.dim() == 2 else g
    return (per_index / holders).sum()


def _combine(parts: list, p_norm: float, device) -> torch.Tensor:
    """The parts of a norm put together: their largest (p = inf) or their sum; zero of none."""
    if not parts:
        return torch.zeros((), device=device)
    stacked = torch.stack([t.to(device) for t in parts])
    return stacked.max() if math.isinf(p_norm) else stacked.sum()
