"""What each gloo rank runs for tests/test_dist.py (imported by name in the rank processes).

Each case takes CPU tensors drawn by the parent, runs on the test device, and returns CPU tensors, so the
parent can check every rank's results against one float64 reference."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fused_tp


def _dense_linear(weight, bias, device):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device=device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _cpu(t):
    return None if t is None else t.detach().cpu()


def layers_step(kind, device, dense, x, grad_y):
    """Forward and backward of one stack of layers built with from_linear from the dense (weight, bias) pairs.

    kind: "mlp"            Column -> GELU -> Row (Megatron's MLP)
          "column_gather"  Column with gather_output=True
          "row_scatter"    Row with input_is_parallel=False
    Returns y, grad_x and, per layer, the shard of weight and bias with their gradients; for "row_scatter" also
    the output for a zero input (the bias alone, if it is added exactly once).
    """
    linears = [_dense_linear(w, b, device) for w, b in dense]
    if kind == "mlp":
        layers = [fused_tp.ColumnParallelLinear.from_linear(linears[0]),
                  fused_tp.RowParallelLinear.from_linear(linears[1])]  # fmt: skip
        forward = lambda t: layers[1](F.gelu(layers[0](t)))  # noqa: E731
    elif kind == "column_gather":
        layers = [fused_tp.ColumnParallelLinear.from_linear(linears[0], gather_output=True)]
        forward = layers[0]
    else:
        layers = [fused_tp.RowParallelLinear.from_linear(linears[0], input_is_parallel=False)]
        forward = layers[0]
    x = x.to(device).requires_grad_()
    y = forward(x)
    y.backward(grad_y.to(device))
    out = {"y": _cpu(y), "grad_x": _cpu(x.grad)}
    for i, layer in enumerate(layers):
        out[f"w{i}"], out[f"grad_w{i}"] = _cpu(layer.weight), _cpu(layer.weight.grad)
        if layer.bias is not None:
            out[f"b{i}"], out[f"grad_b{i}"] = _cpu(layer.bias), _cpu(layer.bias.grad)
    if kind == "row_scatter":
        with torch.no_grad():
            out["y_zero_input"] = _cpu(forward(torch.zeros_like(x)))
    return out


def init_shards(seed, in_features, out_features, bias, dtype):
    """The parameters each constructor makes on this rank under `seed`."""
    out = {}
    for cls in (fused_tp.ColumnParallelLinear, fused_tp.RowParallelLinear):
        torch.manual_seed(seed)
        layer = cls(in_features, out_features, bias, dtype=dtype)
        out[cls.__name__] = (_cpu(layer.weight), _cpu(layer.bias), repr(layer))
    return out


def bad_calls(device, in_features, out_features):
    """Each bad call from tests/test_errors.py on this rank: the error type and message it raised, or None."""
    from test_errors import BAD_CALLS

    col = fused_tp.ColumnParallelLinear(in_features, out_features, device=device)
    row = fused_tp.RowParallelLinear(in_features, out_features, device=device)
    row_full = fused_tp.RowParallelLinear(in_features, out_features, input_is_parallel=False, device=device)
    results = {}
    for name, (call, _, _) in BAD_CALLS.items():
        try:
            call(col, row, row_full, device)
            results[name] = None
        except Exception as e:  # the parent checks type and message
            results[name] = (type(e).__name__, str(e))
    # The group must still work: every rank raised before any collective.
    t = torch.ones(1)
    dist.all_reduce(t)
    results["all_reduce after the errors"] = t.item()
    return results
