"""Drop-in tensor-parallel replacements for nn.Linear. Parameters, sharding and options; no math of their own."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .autograd import SharesGroup, column_call, group_size_rank, mlp_call, resolve_group, row_call, shard_range


def _placed_shards(module: _ParallelLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """The layer's state dict hook: its shards with their place in the dense tensors (checkpoint.placed), which
    torch.distributed.checkpoint reads (a plain tensor under the dense layer's name would be saved as a whole
    tensor: one rank's shard for all)."""
    from .checkpoint import placed  # checkpoint.py builds on this module

    for leaf, (offsets, size) in module.dense_chunks().items():
        if prefix + leaf in state_dict:
            state_dict[prefix + leaf] = placed(state_dict[prefix + leaf], offsets, size)


def _unplaced_shards(module: _ParallelLinear, state_dict: dict, prefix: str, *args) -> None:
    """The layer's load_state_dict hook: PlacedShard entries as plain tensors (in load_state_dict's own copy of the
    dict), so that load_state_dict(..., assign=True) makes plain Parameters of them (nn.Parameter refuses a tensor
    subclass whose detach() returns a plain tensor, as PlacedShard's does)."""
    from .checkpoint import unplaced

    for leaf in ("weight", "bias"):
        if prefix + leaf in state_dict:
            state_dict[prefix + leaf] = unplaced(state_dict[prefix + leaf])


class _ParallelLinear(SharesGroup, nn.Module):
    """What Column and Row share: shards of a dense nn.Linear, by torch.tensor_split along `_split_dim`."""

    _group_attr = "process_group"

    _split_dim: int  # the dim of the dense weight [out_features, in_features] that is split across ranks

    def __init__(
        self, in_features, out_features, bias, process_group, device, dtype, sequence_parallel=False, sequence_dim=0
    ):
        # Refused here, not at the first call: a float64 layer would otherwise build and fail later, blaming the input.
        kernels.check_dtype("dtype", torch.get_default_dtype() if dtype is None else dtype)
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        self.process_group = resolve_group(process_group)
        self.world_size, self.rank = group_size_rank(self.process_group)
        # Building the dense layer and slicing it makes the shards equal, value for value, to those of an
        # nn.Linear built under the same seed, whatever the world size.
        dense = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self._load_dense(dense.weight, dense.bias)
        self.register_state_dict_post_hook(_placed_shards)
        self.register_load_state_dict_pre_hook(_unplaced_shards)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options):
        """This rank's shard of `linear` (copied; `linear` is not modified), with the keyword options of __init__."""
        return cls._from_linear(linear, None, **options)

    @classmethod
    def _from_linear(cls, linear: nn.Linear, span: tuple[int, int] | None, **options):
        """from_linear with the shard's `span` of _load_dense (an attention head's slice); None: tensor_split's."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        kernels.check_dtype("linear.weight", w.dtype)
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None, device="meta", dtype=w.dtype, **options
        )
        module._load_dense(w, linear.bias, span=span)
        return module

    def _load_dense(
        self, weight: torch.Tensor, bias: torch.Tensor | None, unit: int = 1, span: tuple[int, int] | None = None
    ) -> None:
        """This rank's shards of the dense parameters: along the split dim, the rows (Column) or columns (Row)
        [start, stop) of `span`, by default torch.tensor_split's share with `unit` rows or columns kept together
        (a gated fc1's (gate, up) pairs, an attention head's rows)."""
        if span is None:
            start, stop = shard_range(weight.shape[self._split_dim] // unit, self.world_size, self.rank)
            span = (unit * start, unit * stop)
        self.shard_span = span  # checkpoint.py reads and writes the dense tensors' slices through it

        def param(t: torch.Tensor) -> nn.Parameter:
            part = t.detach().clone(memory_format=torch.contiguous_format)
            return nn.Parameter(part, requires_grad=t.requires_grad)

        w_part, b_part = self._parts(weight, bias)
        self.weight = param(w_part)
        self.register_parameter("bias", None if bias is None else param(b_part))

    def _parts(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's views of the dense (weight, bias) by shard_span: Column splits the bias with the output
        features; Row keeps all of it on every rank."""
        start, stop = self.shard_span
        bias_part = bias if bias is None or self._split_dim == 1 else bias.narrow(0, start, stop - start)
        return weight.narrow(self._split_dim, start, stop - start), bias_part

    def dense_chunks(self) -> dict[str, tuple[torch.Size, torch.Size]]:
        """{"weight" / "bias": (where this rank's shard starts in the dense tensor, the dense tensor's size)} for
        each parameter the layer holds a shard of (a Row layer's bias is whole on every rank: not listed)."""
        out = {}
        dense = self.out_features if self._split_dim == 0 else self.in_features
        for leaf in ("weight", "bias"):
            t = getattr(self, leaf)
            dim = self._split_dim if leaf == "weight" else (0 if self._split_dim == 0 else None)
            if t is None or dim is None:
                continue
            offsets, size = [0] * t.dim(), list(t.shape)
            offsets[dim], size[dim] = self.shard_span[0], dense
            out[leaf] = (torch.Size(offsets), torch.Size(size))
        return out

    def reset_parameters(self) -> None:
        """Initialise the shards in place as nn.Linear.reset_parameters initialises the dense layer: under the same
        torch seed on every rank, this rank's slice (shard_span) of what nn.Linear(in_features, out_features) draws,
        as the constructor does. For initialisation on the meta device: build there, `to_empty(device=...)`, then
        this (which FSDP's materialisation calls too); the parameters stay the same objects."""
        w = self.weight
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        self._copy_dense(dense.weight, dense.bias)

    def _copy_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """This rank's slices of the dense (weight, bias) into the parameters, in place."""
        with torch.no_grad():
            for param, part in zip((self.weight, self.bias), self._parts(weight, bias)):
                if param is not None:
                    param.copy_(part)

    def _check_group(self) -> tuple[int, int]:
        """(R, r) of the layer's group, as it was when the layer was built; RuntimeError if the group changed."""
        world_rank = group_size_rank(self.process_group)
        if world_rank != (self.world_size, self.rank):
            raise RuntimeError(
                f"process_group: the layer was built for rank {self.rank} of {self.world_size}, "
                f"but the group now gives rank {world_rank[1]} of {world_rank[0]}"
            )
        return world_rank

    def _weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias), read from the module's parameter dict where they are there: nn.Module's attribute
        fallback costs host time on every call (bench/NOTES.md, attempt 56). A parametrized one
        (torch.nn.utils.parametrize) is a property instead, read as such."""
        params = self._parameters
        if "weight" in params and "bias" in params:
            return params["weight"], params["bias"]
        return self.weight, self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight_shard={tuple(self.weight.shape)}, rank={self.rank}, world_size={self.world_size}"
        )


class ColumnParallelLinear(_ParallelLinear):
    """nn.Linear with the output features split across ranks: weight [N_r, in_features], bias [N_r].

    The input [..., in_features] is replicated. forward returns this rank's features [..., N_r], or with
    gather_output=True all of them, [..., out_features], on every rank.
    """

    _split_dim = 0

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        sequence_dim: int = 0,
        process_group=None,
        device=None,
        dtype=None,
    ):
        if gather_output and sequence_parallel:
            raise ValueError(
                "gather_output: a sequence-parallel Column layer feeds a Row layer (its output is the "
                "whole sequence's features of this rank); gather_output=True is not taken with it"
            )
        self.gather_output = gather_output
        super().__init__(in_features, out_features, bias, process_group, device, dtype, sequence_parallel, sequence_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world_rank = self._check_group()
        gather_size = self.out_features if self.gather_output else None
        return column_call(
            x,
            *self._weight_bias(),
            self.process_group,
            gather_size,
            self.out_features,
            world_rank,
            self.sequence_dim if self.sequence_parallel else None,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gather_output={self.gather_output}" + _sequence_repr(self)


class RowParallelLinear(_ParallelLinear):
    """nn.Linear with the input features split across ranks: weight [out_features, K_r], bias [out_features].

    forward takes this rank's input features [..., K_r] (or with input_is_parallel=False the replicated input
    [..., in_features], of which it uses its own slice) and returns [..., out_features], summed over ranks, on
    every rank. The bias is added once.
    """

    _split_dim = 1

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        sequence_dim: int = 0,
        process_group=None,
        device=None,
        dtype=None,
    ):
        if sequence_parallel and not input_is_parallel:
            raise ValueError(
                "input_is_parallel: a sequence-parallel Row layer takes a Column layer's output (this "
                "rank's features); input_is_parallel=False is not taken with it"
            )
        self.input_is_parallel = input_is_parallel
        super().__init__(in_features, out_features, bias, process_group, device, dtype, sequence_parallel, sequence_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world_rank = self._check_group()
        scatter_size = None if self.input_is_parallel else self.in_features
        return row_call(
            x,
            *self._weight_bias(),
            self.process_group,
            scatter_size,
            self.in_features,
            world_rank,
            self.sequence_dim if self.sequence_parallel else None,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", input_is_parallel={self.input_is_parallel}" + _sequence_repr(self)


class ParallelMLP(nn.Module):
    """fc1 -> activation -> fc2 (Megatron's MLP): fc1 a ColumnParallelLinear, fc2 a RowParallelLinear, on one group.

    The drop-in for nn.Sequential(nn.Linear, nn.GELU(approximate=...), nn.Linear), or with activation="swiglu" for
    Llama's gated MLP down(silu(gate(x)) * up(x)) ("geglu_tanh": Gemma's, with the tanh GELU), whose activation runs
    inside the kernels: fc1's launch applies it and keeps the pre-activation, fc2's grad_input launch applies its
    derivative.
    x [..., in_features] replicated  ->  [..., out_features] on every rank (out_features defaults to in_features).

    activation     fc1.weight (this rank's)                         between fc1 and fc2
    "gelu"         [F_r, in_features]                               F.gelu
    "gelu_tanh"    [F_r, in_features]                               F.gelu(approximate="tanh")
    "swiglu"       [2 F_r, in_features]: row 2j is gate row j,      silu(gate) * up, [..., F_r]
                   row 2j + 1 up row j (this rank's F_r features)
    "geglu_tanh"   as "swiglu" (Gemma's gated MLP)                  F.gelu(gate, approximate="tanh") * up

    F_r is this rank's share of hidden_features (torch.tensor_split); a gated fc1 keeps each (gate, up) pair on one
    rank, so one launch computes both projections and the product of their activations.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        bias: bool = True,
        *,
        activation: str = "gelu",
        sequence_parallel: bool = False,
        sequence_dim: int = 0,
        process_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        kernels.check_activation(activation, allow_none=False)
        self.activation = activation
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        out_features = in_features if out_features is None else out_features
        if kernels.ACTIVATIONS[activation].gated:
            # gate, up, then down, as Llama builds them: the same shards as from_gated of layers built under one seed
            gate, up = (nn.Linear(in_features, hidden_features, bias, device=device, dtype=dtype) for _ in range(2))
            self.fc1 = ColumnParallelLinear(
                in_features,
                2 * hidden_features,
                bias,
                process_group=process_group,
                device="meta",
                dtype=gate.weight.dtype,
            )
            self.fc1._load_dense(*_interleaved(gate, up), unit=2)
        else:
            self.fc1 = ColumnParallelLinear(
                in_features, hidden_features, bias, process_group=process_group, device=device, dtype=dtype
            )
        self.fc2 = RowParallelLinear(
            hidden_features, out_features, bias, process_group=process_group, device=device, dtype=dtype
        )

    def reset_parameters(self) -> None:
        """Initialise fc1 and fc2 in place as the constructor does under the same torch seed (a gated fc1 from a
        dense gate's and up's nn.Linear initialisation, interleaved); see _ParallelLinear.reset_parameters."""
        fc1, fc2 = self.fc1, self.fc2
        if kernels.ACTIVATIONS[self.activation].gated:
            w, hidden = fc1.weight, fc2.in_features
            gate, up = (
                nn.Linear(fc1.in_features, hidden, fc1.bias is not None, device=w.device, dtype=w.dtype)
                for _ in range(2)
            )
            fc1._copy_dense(*_interleaved(gate, up))
        else:
            fc1.reset_parameters()
        fc2.reset_parameters()

    @classmethod
    def from_linears(cls, fc1: nn.Linear, fc2: nn.Linear, *, activation: str = "gelu", process_group=None, **sequence):
        """This rank's shards of the dense fc1 -> activation -> fc2 (copied; the layers are not modified). For
        activation="swiglu", fc1's output rows are interleaved (gate, up) pairs, as fc1.weight above; from_gated
        takes separate gate and up layers."""
        _check_linears(("fc1", fc1), ("fc2", fc2))
        kernels.check_activation(activation, allow_none=False)
        gated = kernels.ACTIVATIONS[activation].gated
        kernels.check_gated_width(activation, fc1.out_features, "fc1", "out_features")
        hidden = kernels.ACTIVATIONS[activation].width(fc1.out_features)
        if fc2.in_features != hidden:
            why = "half fc1.out_features" if gated else "fc1.out_features"
            raise ValueError(f"fc2: expected in_features {hidden} ({why}), got {fc2.in_features}")
        module = cls(
            fc1.in_features,
            hidden,
            fc2.out_features,
            fc1.bias is not None,
            activation=activation,
            process_group=process_group,
            device="meta",
            dtype=fc1.weight.dtype,
            **sequence,
        )
        module.fc1._load_dense(fc1.weight, fc1.bias, unit=2 if gated else 1)
        module.fc2 = RowParallelLinear.from_linear(fc2, process_group=process_group)
        return module

    @classmethod
    def from_gated(
        cls,
        gate: nn.Linear,
        up: nn.Linear,
        down: nn.Linear,
        *,
        activation: str = "swiglu",
        process_group=None,
        **sequence,
    ):
        """This rank's shards of down(f(gate(x)) * up(x)) (copied; the layers are not modified), as a ParallelMLP
        with a gated `activation` ("swiglu": f = silu; "geglu_tanh": the tanh GELU): fc1 interleaves the rows of gate
        and up."""
        _check_linears(("gate", gate), ("up", up), ("down", down))
        kernels.check_activation(activation, allow_none=False)
        if not kernels.ACTIVATIONS[activation].gated:
            gated = ", ".join(repr(k) for k, v in kernels.ACTIVATIONS.items() if v.gated)
            raise ValueError(f"activation: expected a gated one ({gated}), got {activation!r}")
        if (up.in_features, up.out_features) != (gate.in_features, gate.out_features):
            raise ValueError(
                f"up: expected in_features {gate.in_features} and out_features {gate.out_features} "
                f"(gate's), got {up.in_features} and {up.out_features}"
            )
        if down.in_features != gate.out_features:
            raise ValueError(
                f"down: expected in_features {gate.out_features} (gate.out_features), got {down.in_features}"
            )
        module = cls(
            gate.in_features,
            gate.out_features,
            down.out_features,
            gate.bias is not None,
            activation=activation,
            process_group=process_group,
            device="meta",
            dtype=gate.weight.dtype,
            **sequence,
        )
        module.fc1._load_dense(*_interleaved(gate, up), unit=2)
        module.fc2 = RowParallelLinear.from_linear(down, process_group=process_group)
        return module

    @classmethod
    def from_llama_mlp(cls, mlp: nn.Module, *, process_group=None, **sequence):
        """This rank's shards of a Hugging Face LlamaMLP (or any module with gate_proj, up_proj and down_proj
        nn.Linear layers and an act_fn computing SiLU: Mistral's and Qwen's too; or the tanh GELU: Gemma's, as
        "geglu_tanh")."""
        act = getattr(mlp, "act_fn", None)
        # act_fn's class differs between libraries and versions: ask it, on the CPU (under a `torch.device("meta")`
        # block too, where a model is built and parallelized), against each gated activation's gate (up = 1)
        probe = torch.linspace(-6.0, 6.0, 13, device="cpu")
        with_up = torch.stack((probe, torch.ones_like(probe)), -1).flatten()
        for name, entry in kernels.ACTIVATIONS.items():
            if entry.gated and callable(act) and torch.allclose(act(probe), entry.torch_fn(with_up)):
                return cls.from_gated(
                    mlp.gate_proj, mlp.up_proj, mlp.down_proj, activation=name, process_group=process_group, **sequence
                )
        raise ValueError(
            f"mlp: expected an act_fn computing SiLU (SwiGLU) or the tanh GELU (GeGLU), got {type(act).__name__}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the submodules from the module dict, not through nn.Module's attribute fallback (_weight_bias says why)
        fc1, fc2 = self._modules["fc1"], self._modules["fc2"]
        world_rank = fc1._check_group()
        fc2._check_group()
        return mlp_call(
            x,
            *fc1._weight_bias(),
            *fc2._weight_bias(),
            fc1.process_group,
            self.activation,
            fc1.out_features,
            world_rank,
            self.sequence_dim if self.sequence_parallel else None,
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}" + _sequence_repr(self)


def _sequence_repr(module) -> str:
    return f", sequence_parallel=True, sequence_dim={module.sequence_dim}" if module.sequence_parallel else ""


def _check_linears(*named: tuple[str, nn.Module]) -> None:
    """TypeError or ValueError naming the argument unless every layer is an nn.Linear of one supported dtype, all
    with a bias or none."""
    for name, layer in named:
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{name}: expected an nn.Linear, got {type(layer).__name__}")
        kernels.check_dtype(f"{name}.weight", layer.weight.dtype)
    first_name, first = named[0]
    for name, layer in named[1:]:
        if layer.weight.dtype != first.weight.dtype:
            raise TypeError(
                f"{name}.weight: expected dtype {first.weight.dtype} ({first_name}.weight's), got {layer.weight.dtype}"
            )
        if (layer.bias is None) != (first.bias is None):
            raise ValueError(f"{name}: expected a bias exactly when {first_name} has one")


def _interleaved(gate: nn.Linear, up: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of one layer whose output rows alternate gate's and up's: row 2j gate's j, 2j + 1 up's j."""

    def pairs(g, u):
        return torch.stack((g.detach(), u.detach()), 1).flatten(0, 1).requires_grad_(g.requires_grad)

    bias = None if gate.bias is None else pairs(gate.bias, up.bias)
    return pairs(gate.weight, up.weight), bias
