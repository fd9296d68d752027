"""Drop-in tensor-parallel replacements for nn.Linear. Parameters, sharding and options; no math of their own."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .autograd import column_call, group_size_rank, mlp_call, row_call


class _ParallelLinear(nn.Module):
    """What Column and Row share: shards of a dense nn.Linear, by torch.tensor_split along `_split_dim`."""

    _split_dim: int  # the dim of the dense weight [out_features, in_features] that is split across ranks

    def __init__(self, in_features, out_features, bias, process_group, device, dtype):
        # Refused here, not at the first call: a float64 layer would otherwise build and fail later, blaming the input.
        kernels.check_dtype("dtype", torch.get_default_dtype() if dtype is None else dtype)
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.process_group = process_group
        self.world_size, self.rank = group_size_rank(process_group)
        # Building the dense layer and slicing it makes the shards equal, value for value, to those of an
        # nn.Linear built under the same seed, whatever the world size.
        dense = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self._load_dense(dense.weight, dense.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options):
        """This rank's shard of `linear` (copied; `linear` is not modified), with the keyword options of __init__."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        kernels.check_dtype("linear.weight", w.dtype)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     device="meta", dtype=w.dtype, **options)  # fmt: skip
        module._load_dense(w, linear.bias)
        return module

    def _load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        def param(t: torch.Tensor, dim: int | None) -> nn.Parameter:
            part = t.detach() if dim is None else torch.tensor_split(t.detach(), self.world_size, dim)[self.rank]
            return nn.Parameter(part.clone(memory_format=torch.contiguous_format), requires_grad=t.requires_grad)

        self.weight = param(weight, self._split_dim)
        # Column splits the bias with the output features; Row keeps all of it on every rank.
        bias_dim = 0 if self._split_dim == 0 else None
        self.register_parameter("bias", None if bias is None else param(bias, bias_dim))

    def _check_group(self) -> tuple[int, int]:
        """(R, r) of the layer's group, as it was when the layer was built; RuntimeError if the group changed."""
        world_rank = group_size_rank(self.process_group)
        if world_rank != (self.world_size, self.rank):
            raise RuntimeError(
                f"process_group: the layer was built for rank {self.rank} of {self.world_size}, "
                f"but the group now gives rank {world_rank[1]} of {world_rank[0]}"
            )
        return world_rank

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

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, gather_output: bool = False,
                 process_group=None, device=None, dtype=None):  # fmt: skip
        self.gather_output = gather_output
        super().__init__(in_features, out_features, bias, process_group, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world_rank = self._check_group()
        gather_size = self.out_features if self.gather_output else None
        return column_call(x, self.weight, self.bias, self.process_group, gather_size, self.out_features, world_rank)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gather_output={self.gather_output}"


class RowParallelLinear(_ParallelLinear):
    """nn.Linear with the input features split across ranks: weight [out_features, K_r], bias [out_features].

    forward takes this rank's input features [..., K_r] (or with input_is_parallel=False the replicated input
    [..., in_features], of which it uses its own slice) and returns [..., out_features], summed over ranks, on
    every rank. The bias is added once.
    """

    _split_dim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, input_is_parallel: bool = True,
                 process_group=None, device=None, dtype=None):  # fmt: skip
        self.input_is_parallel = input_is_parallel
        super().__init__(in_features, out_features, bias, process_group, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world_rank = self._check_group()
        scatter_size = None if self.input_is_parallel else self.in_features
        return row_call(x, self.weight, self.bias, self.process_group, scatter_size, self.in_features, world_rank)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", input_is_parallel={self.input_is_parallel}"


class ParallelMLP(nn.Module):
    """fc1 -> GELU -> fc2 (Megatron's MLP): fc1 a ColumnParallelLinear, fc2 a RowParallelLinear, on one group.

    The drop-in for nn.Sequential(nn.Linear, nn.GELU(approximate=...), nn.Linear) whose activation runs inside the
    kernels: fc1's launch applies it and keeps the pre-activation, fc2's grad_input launch applies its derivative.
    x [..., in_features] replicated  ->  [..., out_features] on every rank (out_features defaults to in_features).
    activation: "gelu" (F.gelu) or "gelu_tanh" (F.gelu with approximate="tanh").
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True,
                 *, activation: str = "gelu", process_group=None, device=None, dtype=None):  # fmt: skip
        super().__init__()
        kernels.check_activation(activation, allow_none=False)
        self.activation = activation
        out_features = in_features if out_features is None else out_features
        self.fc1 = ColumnParallelLinear(in_features, hidden_features, bias, process_group=process_group,
                                        device=device, dtype=dtype)  # fmt: skip
        self.fc2 = RowParallelLinear(hidden_features, out_features, bias, process_group=process_group,
                                     device=device, dtype=dtype)  # fmt: skip

    @classmethod
    def from_linears(cls, fc1: nn.Linear, fc2: nn.Linear, *, activation: str = "gelu", process_group=None):
        """This rank's shards of the dense fc1 -> activation -> fc2 (copied; the layers are not modified)."""
        for name, layer in (("fc1", fc1), ("fc2", fc2)):
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"{name}: expected an nn.Linear, got {type(layer).__name__}")
            kernels.check_dtype(f"{name}.weight", layer.weight.dtype)
        if fc2.weight.dtype != fc1.weight.dtype:
            raise TypeError(f"fc2.weight: expected dtype {fc1.weight.dtype} (fc1.weight's), got {fc2.weight.dtype}")
        if fc2.in_features != fc1.out_features:
            raise ValueError(f"fc2: expected in_features {fc1.out_features} (fc1.out_features), got {fc2.in_features}")
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError("fc2: expected a bias exactly when fc1 has one")
        module = cls(fc1.in_features, fc1.out_features, fc2.out_features, fc1.bias is not None, activation=activation,
                     process_group=process_group, device="meta", dtype=fc1.weight.dtype)  # fmt: skip
        module.fc1 = ColumnParallelLinear.from_linear(fc1, process_group=process_group)
        module.fc2 = RowParallelLinear.from_linear(fc2, process_group=process_group)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world_rank = self.fc1._check_group()
        self.fc2._check_group()
        return mlp_call(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                        self.fc1.process_group, self.activation, self.fc1.out_features, world_rank)  # fmt: skip

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
