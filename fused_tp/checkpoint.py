"""Checkpoints of sharded models in the dense model's layout: gather the shards into the dense state dict, and load
a dense state dict (or a safetensors checkpoint, each rank reading only its slices) straight into the shards. Together
they reshard: a model saved at TP = N loads at TP = M. save_pretrained writes a parallelized Hugging Face model's
dense checkpoint, which from_pretrained loads. For torch.distributed.checkpoint (DCP), the layers' state dicts hold
their shards as PlacedShard, which DCP's default planner saves as their chunks of the dense tensors; LoadPlanner reads
each shard's chunk back at any TP size (DCP's default load planner refuses a shard: its size is not the dense one),
and SavePlanner places the entries of a state dict of plain tensors by their names. place_optimizer_state makes an
optimizer's state dict hold its states of the shards the same way (Adam's moments, SGD's momentum: each a shard).

    what a fused_tp layer holds            the dense tensors it maps to
    ColumnParallelLinear  weight, bias     <name>.weight rows, <name>.bias rows [start, stop) (its shard_span)
    RowParallelLinear     weight, bias     <name>.weight columns [start, stop); <name>.bias whole
    ParallelMLP, GELU     fc1, fc2         <name>.fc1.*, <name>.fc2.* as above
    ParallelMLP, SwiGLU   fc1, fc2         <name>.gate_proj.*, <name>.up_proj.* (fc1's interleaved pairs: gate rows
                                           [start, stop), up rows the same), <name>.down_proj.* (as Row): the names of
                                           Hugging Face's LlamaMLP, which from_llama_mlp and parallelize shard

Everything else in the model (embeddings, norms, buffers) is replicated and keeps its name. Key/value heads that
several ranks hold (parallelize) come from, and go to, the same dense rows.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.tensor import DTensor

from .autograd import group_size_rank, resolve_group
from .kernels import ACTIVATIONS
from .modules import ParallelMLP, _ParallelLinear


def _pieces(model: nn.Module):
    """(the layer's state dict prefix, the layer, the dense layers' names) for each fused_tp linear layer of `model`:
    one name, or for a gated MLP's fc1 two (gate's, up's: its rows interleave theirs)."""
    for name, module in model.named_modules():
        if not isinstance(module, _ParallelLinear):
            continue
        prefix = f"{name}." if name else ""
        owner, _, leaf = name.rpartition(".")
        parent = model.get_submodule(owner)
        gated = isinstance(parent, ParallelMLP) and ACTIVATIONS[parent.activation].gated
        if gated:
            base = f"{owner}." if owner else ""
            names = {"fc1": (f"{base}gate_proj", f"{base}up_proj"), "fc2": (f"{base}down_proj",)}[leaf]
        else:
            names = (name,)
        yield prefix, module, names


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The dense model's state dict, on every rank: each fused_tp layer's shards gathered over its process group
    (one all-gather of the shard spans and one of the shards per tensor), bit for bit; the rest as
    model.state_dict() has it. Call it on every rank."""
    local = model.state_dict()
    out = {}
    covered = set()
    for prefix, layer, names in _pieces(model):
        process_group, world = layer.process_group, layer.world_size
        spans = _all_spans(layer.shard_span, process_group, world)
        for leaf in ("weight", "bias"):
            t = getattr(layer, leaf)
            covered.add(prefix + leaf)
            if t is None:
                continue
            dim = layer._split_dim if leaf == "weight" else (0 if layer._split_dim == 0 else None)
            full = t.detach() if dim is None else _gather(t.detach(), dim, spans, process_group, world)
            if len(names) == 2:  # gated fc1: interleaved (gate, up) rows
                out[f"{names[0]}.{leaf}"], out[f"{names[1]}.{leaf}"] = full[0::2].clone(), full[1::2].clone()
            else:
                out[f"{names[0]}.{leaf}"] = full
    for key, value in local.items():
        if key not in covered:
            out[key] = value
    return out


def load_dense_state_dict(model: nn.Module, source, device=None, strict: bool = True) -> None:
    """Load a dense state dict into `model`'s shards, in place: `source` a {name: tensor} dict, or the path of a
    .safetensors file, of a Hugging Face checkpoint directory (model.safetensors, or the files its
    model.safetensors.index.json lists: a checkpoint sharded over several files) or of that index file, from which
    each rank reads only its slices. A fused_tp layer on the meta device (a model built on it, then parallelize)
    gets new parameters on `device` (default: the CPU): a model of any size loads without a dense copy of its
    layers. Replicated tensors load as model.load_state_dict(..., assign=True) loads
    them. strict: every dense tensor the model needs must be in `source`, and nothing else (KeyError naming it;
    the tensors read before it stay loaded)."""
    reader = _Reader(source)
    try:
        used = set()
        for _prefix, layer, names in _pieces(model):
            start, stop = layer.shard_span
            rows = layer.out_features // len(names)  # a gated fc1's rows interleave gate's and up's
            for leaf in ("weight", "bias"):
                old = getattr(layer, leaf)
                if old is None:
                    continue
                dim = layer._split_dim if leaf == "weight" else (0 if layer._split_dim == 0 else None)
                shape = (rows, layer.in_features) if leaf == "weight" else (rows,)
                if len(names) == 2:
                    parts = [reader.read(f"{n}.{leaf}", dim, start // 2, stop // 2, shape) for n in names]
                    value = torch.stack(parts, 1).flatten(0, 1)
                else:
                    value = reader.read(f"{names[0]}.{leaf}", dim, start, stop, shape)
                used.update(f"{n}.{leaf}" for n in names)
                target = device if old.is_meta else old.device
                setattr(
                    layer,
                    leaf,
                    nn.Parameter(value.to(device=target or "cpu", dtype=old.dtype), requires_grad=old.requires_grad),
                )
        fused = {f"{prefix}{leaf}" for prefix, _, _ in _pieces(model) for leaf in ("weight", "bias")}
        rest = {k: reader.read(k, None, 0, 0) for k in reader.keys() if k not in used}
        missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
        missing = [k for k in missing if k not in fused]
        if strict and (missing or unexpected):
            what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
            raise KeyError(f"source: {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
    finally:
        reader.close()


def save_pretrained(model: nn.Module, directory, process_group=None, **options) -> None:
    """A parallelized Hugging Face model's dense checkpoint: the shards gathered (dense_state_dict) and written by
    rank 0 of `process_group` (the model's layers' group) with the model's own save_pretrained(directory,
    state_dict=..., **options), so that from_pretrained loads the dense model. Call it on every rank (the gather is
    a collective); it returns when the files are written."""
    process_group = resolve_group(process_group)
    dense = dense_state_dict(model)
    world, rank = group_size_rank(process_group)
    if rank == 0:
        type(model).save_pretrained(model, directory, state_dict=dense, **options)
    if world > 1:
        dist.barrier(group=process_group)


class RefuseShardedSave:
    """What parallelize puts in place of a sharded model's save_pretrained: the model's own would write this rank's
    shards under the dense names, a checkpoint no one can load."""

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            "save_pretrained: this model's layers are fused_tp shards; call "
            "fused_tp.checkpoint.save_pretrained(model, directory) on every rank, which gathers them "
            "and writes the dense checkpoint from rank 0"
        )


def _placements(model: nn.Module, prefix: str = "") -> dict[str, tuple[torch.Size, torch.Size]]:
    """{state dict key: (the shard's offsets in the dense tensor, the dense tensor's size)} of every sharded tensor
    of `model`."""
    return {
        f"{prefix}{name}{leaf}": placed
        for name, layer, _ in _pieces(model)
        for leaf, placed in layer.dense_chunks().items()
    }


def place_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """From now on `optimizer.state_dict()` (and so DCP's get_optimizer_state_dict and get_state_dict) holds the
    states it keeps for `model`'s shards placed as model.state_dict() holds the shards (PlacedShard): dcp.save
    writes each as its chunk of the dense state, and LoadPlanner reads it back at any TP size, where a plain
    tensor would be saved as one rank's state for all (silently wrong on every other rank, at the same TP size
    too). optimizer.load_state_dict takes them back as plain tensors. A state of a shard that is not of the
    shard's shape (a factored second moment) has no place in a dense tensor: ValueError naming it, at
    state_dict(). Call it once, on every rank, for each optimizer over the model's parameters."""
    optimizer.register_state_dict_post_hook(functools.partial(_placed_optimizer_state, model=model))
    optimizer.register_load_state_dict_pre_hook(_unplaced_optimizer_state)


def _placed_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict, model: nn.Module) -> dict:
    """optimizer.state_dict()'s post hook: a new dict (its per-parameter dicts are the optimizer's own), the states
    of the model's shards placed."""
    places = {
        id(getattr(layer, leaf)): place
        for _, layer, _ in _pieces(model)
        for leaf, place in layer.dense_chunks().items()
    }
    params = {}  # state_dict's index of a parameter -> the parameter
    for group, packed in zip(optimizer.param_groups, state_dict["param_groups"], strict=True):
        params.update(zip(packed["params"], group["params"], strict=True))
    state = {}
    for index, values in state_dict["state"].items():
        param = params[index]
        place = places.get(id(param))
        state[index] = values if place is None else {k: _placed_state(k, v, param, place) for k, v in values.items()}
    return {**state_dict, "state": state}


def _placed_state(name: str, value, param: torch.Tensor, place: tuple[torch.Size, torch.Size]):
    """One optimizer state of a shard `param`, placed: of the shard's shape, at the shard's place; a scalar (a step
    count) as it is, replicated."""
    if not isinstance(value, torch.Tensor) or (value.numel() == 1 and value.shape != param.shape):
        return value
    if value.shape != param.shape:
        raise ValueError(
            f"optimizer: its state {name!r} of a fused_tp shard is of shape {tuple(value.shape)}, not the shard's "
            f"{tuple(param.shape)}: it has no place in the dense tensor (place_optimizer_state places states of the "
            "shard's shape, as Adam's and SGD's are)"
        )
    return placed(value, *place)


def _unplaced_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """optimizer.load_state_dict's pre hook: the states as plain tensors, in a new dict (the caller's is left as it
    is), so that the optimizer keeps plain tensors (a PlacedShard would send every step's ops through Python)."""
    state = {
        index: {k: unplaced(v) for k, v in values.items()} if isinstance(values, dict) else values
        for index, values in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


class PlacedShard(torch.Tensor):
    """A shard as a fused_tp layer's state dict holds it: the parameter's data (detached, as state_dict gives it),
    a plain tensor to every op, which also tells torch.distributed.checkpoint where it lies in the dense tensor,
    through the protocol DCP asks of DTensor (__create_write_items__, __create_chunk_list__,
    __get_tensor_shard__). So dcp.save with DCP's default planner writes each shard as its chunk of the dense
    tensor, and DCP's default load planner refuses a shard (its size is not the dense one's) instead of reading one
    rank's. Not DTensor: its Shard placement chunks by ceil division, the layers by torch.tensor_split (under
    FSDP2, the entry is FSDP2's DTensor around a PlacedShard: placed). Pickled (torch.save) as the plain tensor."""

    def __new__(cls, shard: torch.Tensor, offsets: torch.Size, dense_size: torch.Size):
        t = torch.Tensor._make_subclass(cls, shard, False)
        t.offsets, t.dense_size = offsets, dense_size
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """Every op sees plain tensors and returns plain ones (the place belongs to the state dict's entry, not to
        values computed from it), but for two that copy or alias the entry itself: DCP's staging for async_save
        copies a tensor as new_empty, then set_ (to the entry's size) and the attributes; DTensor.from_local wraps
        local.view_as(local)."""
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        entry = args[0] if args else None
        if func is torch.Tensor.new_empty or (func is torch.Tensor.view_as and out.shape == entry.shape):
            out = cls(out, entry.offsets, entry.dense_size)
        return out

    def __deepcopy__(self, memo):
        out = PlacedShard(copy.deepcopy(self.as_subclass(torch.Tensor), memo), self.offsets, self.dense_size)
        memo[id(self)] = out
        return out

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        chunk = ChunkStorageMetadata(self.offsets, self.size())
        properties = TensorProperties.create_from_tensor(self)
        return [
            WriteItem(
                index=MetadataIndex(fqn, self.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=chunk, properties=properties, size=self.dense_size),
            )
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(self.offsets, self.size())]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)

    def __reduce_ex__(self, protocol):
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


def placed(value, offsets: torch.Size, dense_size: torch.Size):
    """A state dict's entry for a shard that starts at `offsets` in a dense tensor of `dense_size`, with its place:
    a plain tensor as PlacedShard; FSDP2's DTensor (the shard sharded again over another mesh dim) as the same
    DTensor around a PlacedShard at the shard's offsets plus its own chunk's (DTensor hands DCP's protocol calls to
    its local tensor); anything else (keep_vars' Parameters) as it is. The layers' state dict hook."""
    if type(value) is torch.Tensor:
        return PlacedShard(value, offsets, dense_size)
    if isinstance(value, DTensor) and type(value.to_local()) is torch.Tensor and not isinstance(value, nn.Parameter):
        local = PlacedShard(value.to_local(), _dense_chunk(value, offsets).offsets, dense_size)
        return DTensor.from_local(
            local, value.device_mesh, value.placements, run_check=False, shape=value.shape, stride=value.stride()
        )
    return value


def unplaced(value):
    """`value` without its place: a PlacedShard as the plain tensor, FSDP2's DTensor around one as the DTensor
    around the plain tensor; anything else as it is."""
    if isinstance(value, PlacedShard):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, DTensor) and isinstance(value.to_local(), PlacedShard):
        local = value.to_local().as_subclass(torch.Tensor)
        return DTensor.from_local(
            local, value.device_mesh, value.placements, run_check=False, shape=value.shape, stride=value.stride()
        )
    return value


def _dense_chunk(value, offsets: torch.Size) -> ChunkStorageMetadata:
    """The chunk of the dense tensor that the local data of `value`, a state dict's entry for the shard at
    `offsets`, covers: a placed entry's own; FSDP2's DTensor's chunk of the shard, moved to the shard's place; a
    plain tensor's whole."""
    if not isinstance(value, (PlacedShard, DTensor)):
        return ChunkStorageMetadata(offsets, value.size())
    (chunk,) = value.__create_chunk_list__()
    if _is_placed(value):
        return chunk
    return ChunkStorageMetadata(torch.Size(a + b for a, b in zip(offsets, chunk.offsets)), chunk.sizes)


def _local(value) -> torch.Tensor:
    """The data of a state dict's entry for a shard, as DCP reads and writes it."""
    if isinstance(value, (PlacedShard, DTensor)):
        return value.__get_tensor_shard__(None)
    return value


def _dense_size(value) -> torch.Size:
    """The dense tensor's size, of a placed entry."""
    return (value.to_local() if isinstance(value, DTensor) else value).dense_size


def _is_placed(value) -> bool:
    return isinstance(value, PlacedShard) or (isinstance(value, DTensor) and isinstance(value.to_local(), PlacedShard))


class SavePlanner(DefaultSavePlanner):
    """torch.distributed.checkpoint's planner for a state dict of `model` whose entries carry no place (copies,
    keep_vars' Parameters; or under `prefix` in a larger one): each shard is written as its chunk of the dense
    tensor, placed by its name (and, sharded again by FSDP2, by its own chunk), where the default planner would
    take the shards for whole tensors and keep one rank's. model.state_dict() itself needs no planner
    (PlacedShard). dcp.save(sd, checkpoint_id=..., planner=fused_tp.checkpoint.SavePlanner(model)); LoadPlanner
    loads it at any TP size."""

    def __init__(self, model: nn.Module, prefix: str = "", **options):
        super().__init__(**options)
        self.placements = _placements(model, prefix)

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items = []
        for item in plan.items:
            fqn = item.index.fqn
            value = self.state_dict.get(fqn)
            if fqn not in self.placements or _is_placed(value):
                items.append(item)
                continue
            offsets, size = self.placements[fqn]
            chunk = _dense_chunk(value, offsets)
            properties = TensorProperties.create_from_tensor(_local(value))
            items.append(
                WriteItem(
                    index=MetadataIndex(fqn, chunk.offsets),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(chunk=chunk, properties=properties, size=size),
                )
            )
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def lookup_object(self, index: MetadataIndex):
        if index.fqn in self.placements:
            return _local(self.state_dict[index.fqn])
        return super().lookup_object(index)


class LoadPlanner(DefaultLoadPlanner):
    """The planner that loads a checkpoint of the dense tensors' chunks (dcp.save of the state dict, or with
    SavePlanner; at any TP size, sharded again by FSDP2 or not) into a state dict of shards: each reads its chunk
    of the dense tensor. Placed entries (model.state_dict()'s shards, an optimizer's states after
    place_optimizer_state) need no `model`; plain ones (copies) are placed by their names in `model`'s state dict,
    under `prefix`. sd = model.state_dict(); dcp.load(sd, checkpoint_id=...,
    planner=fused_tp.checkpoint.LoadPlanner()); model.load_state_dict(sd)."""

    def __init__(self, model: nn.Module | None = None, prefix: str = "", **options):
        super().__init__(**options)
        self.placements = {} if model is None else _placements(model, prefix)

    def create_local_plan(self) -> LoadPlan:
        self.places = {}  # {fqn: (the chunk of the dense tensor the entry's data covers, the dense size)}
        for fqn, value in self.state_dict.items():
            if _is_placed(value):
                self.places[fqn] = (_dense_chunk(value, None), _dense_size(value))
            elif fqn in self.placements:
                offsets, size = self.placements[fqn]
                self.places[fqn] = (_dense_chunk(value, offsets), size)
        rest = {k: v for k, v in self.state_dict.items() if k not in self.places}
        plan = create_default_local_load_plan(rest, self.metadata, not self.allow_partial_load)
        items = list(plan.items)
        for fqn, (chunk, size) in self.places.items():
            md = self.metadata.state_dict_metadata.get(fqn)
            if md is None:
                if self.allow_partial_load:
                    continue
                raise RuntimeError(f"Missing key in checkpoint state_dict: {fqn}.")
            if md.size != size:
                raise ValueError(
                    f"{fqn}: the checkpoint's dense size {tuple(md.size)} is not this model's {tuple(size)}"
                )
            items += create_read_items_for_chunk_list(fqn, md, [chunk])
        return dataclasses.replace(plan, items=items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        if index.fqn in self.places:
            return _local(self.state_dict[index.fqn])
        return super().lookup_tensor(index)


def _all_spans(span, group, world):
    if world == 1:
        return [span]
    spans = [None] * world
    dist.all_gather_object(spans, tuple(span), group=group)
    return spans


def _gather(t: torch.Tensor, dim: int, spans, group, world) -> torch.Tensor:
    """The dense tensor from every rank's [start, stop) slice along `dim` (slices may repeat: shared heads)."""
    if world == 1:
        return t.clone()
    longest = max(b - a for a, b in spans)
    pad = list(t.shape)
    pad[dim] = longest
    buf = t.new_zeros(pad)
    buf.narrow(dim, 0, t.shape[dim]).copy_(t)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    shape = list(t.shape)
    shape[dim] = max(b for _, b in spans)
    full = t.new_empty(shape)
    for (a, b), part in zip(spans, parts):
        full.narrow(dim, a, b - a).copy_(part.narrow(dim, 0, b - a))
    return full


INDEX = "model.safetensors.index.json"  # Hugging Face's map of a checkpoint sharded over several files


def _safetensors_files(path) -> list[str]:
    """The .safetensors files of a checkpoint: `path` itself, or those of a directory (Hugging Face's layout: one
    model.safetensors, or the files INDEX lists), or those an index file lists."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, INDEX)):
            path = os.path.join(path, INDEX)
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            return [os.path.join(path, "model.safetensors")]
        else:
            raise FileNotFoundError(f"source: {path} holds neither model.safetensors nor {INDEX}")
    if path.endswith(".json"):
        with open(path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(os.path.dirname(path), name) for name in files]
    return [path]


class _Reader:
    """Dense tensors, whole or a slice along one dim, from a state dict or safetensors files (slices read alone)."""

    def __init__(self, source):
        self.files = {}  # a tensor's name -> the open safetensors file holding it
        if isinstance(source, (str, os.PathLike)):
            from safetensors import safe_open  # a dependency of transformers; needed only for files

            for path in _safetensors_files(source):
                handle = safe_open(path, framework="pt")
                self.files.update(dict.fromkeys(handle.keys(), handle))
        elif not isinstance(source, dict):
            raise TypeError(
                "source: expected a state dict, a .safetensors file or a checkpoint directory, "
                f"got {type(source).__name__}"
            )
        self.source = source if isinstance(source, dict) else None
        self.names = set(self.files if self.source is None else source)

    def keys(self):
        return sorted(self.names)

    def read(self, name: str, dim: int | None, start: int, stop: int, shape: tuple | None = None) -> torch.Tensor:
        """The tensor `name`, or its [start, stop) along `dim`; ValueError unless its dense shape is `shape` (where
        given): a slice of a tensor of another size (a checkpoint of another model) would load without an error."""
        if name not in self.names:
            raise KeyError(f"source: missing {name!r}")
        file = self.files.get(name)
        whole = self.source[name] if file is None else file.get_slice(name)
        if shape is not None:  # (a state dict's other entries need not be tensors: _extra_state)
            found = tuple(whole.shape) if file is None else tuple(whole.get_shape())
            if found != tuple(shape):
                raise ValueError(f"source: {name!r} has shape {found}, expected {tuple(shape)} (the model's layer)")
        if file is None:
            return whole if dim is None else whole.narrow(dim, start, stop - start)
        if dim is None:
            return file.get_tensor(name)
        return whole[start:stop] if dim == 0 else whole[:, start:stop]

    def close(self):
        self.files = {}
