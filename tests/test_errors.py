"""Bad input raises a clear error naming the argument, before any collective, and modifies nothing.

BAD_CALLS is also run on every rank of a gloo group (tests/test_dist.py), which must stay usable afterwards."""

import copy
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import fused_tp
from fused_tp import kernels
from fused_tp.tolerance import assert_close, linear_reference, tol


def _other_device(device):
    return "cpu" if device == "cuda" else "meta"


# name -> (call(column, row, row_full_input, device), error type, what the message must say)
BAD_CALLS = {
    "column: input of the wrong width": (
        lambda c, r, rf, d: c(torch.randn(2, c.in_features + 1, device=d)),
        ValueError,
        "input: expected last dim",
    ),
    "column: input dtype differs from the weight's": (
        lambda c, r, rf, d: c(torch.randn(2, c.in_features, device=d, dtype=torch.float16)),
        TypeError,
        "input: expected dtype torch.float32",
    ),
    "column: input that needs grad, in another dtype than the weight's": (
        lambda c, r, rf, d: c(torch.randn(2, c.in_features, device=d, dtype=torch.bfloat16, requires_grad=True)),
        TypeError,
        "input: expected dtype torch.float32",
    ),
    "column: integer input": (
        lambda c, r, rf, d: c(torch.ones(2, c.in_features, device=d, dtype=torch.int64)),
        TypeError,
        "input: expected dtype float32, float16 or bfloat16",
    ),
    "column: input on another device": (
        lambda c, r, rf, d: c(torch.randn(2, c.in_features, device=_other_device(d))),
        ValueError,
        "input: expected device",
    ),
    "column: a list as input": (lambda c, r, rf, d: c([1.0, 2.0]), TypeError, "input: expected a torch.Tensor"),
    "row: input of the full width where the shard is expected": (
        lambda c, r, rf, d: r(torch.randn(2, r.in_features + 1, device=d)),
        ValueError,
        "input: expected last dim",
    ),
    "row (input_is_parallel=False): input of the wrong width": (
        lambda c, r, rf, d: rf(torch.randn(2, rf.in_features - 1, device=d)),
        ValueError,
        "input: expected last dim",
    ),
    "row (input_is_parallel=False): a scalar input": (
        lambda c, r, rf, d: rf(torch.tensor(1.0, device=d)),
        ValueError,
        "input: expected last dim",
    ),
    "column_parallel_linear: bias of the wrong shape": (
        lambda c, r, rf, d: fused_tp.column_parallel_linear(
            torch.randn(2, c.in_features, device=d), c.weight, torch.zeros(c.weight.shape[0] + 1, device=d)
        ),
        ValueError,
        "bias: expected shape",
    ),
    "ParallelMLP: input of the wrong width": (
        lambda c, r, rf, d: fused_tp.ParallelMLP(c.in_features, 6, device=d)(torch.randn(2, 3, device=d)),
        ValueError,
        "input: expected last dim",
    ),
    "ParallelMLP: input dtype differs from the weights'": (
        lambda c, r, rf, d: fused_tp.ParallelMLP(c.in_features, 6, device=d)(
            torch.randn(2, c.in_features, device=d, dtype=torch.float16)
        ),
        TypeError,
        "input: expected dtype torch.float32",
    ),
    "column: a layer made float64 after construction (model.double())": (
        lambda c, r, rf, d: copy.deepcopy(c).double()(torch.randn(2, c.in_features, device=d, dtype=torch.float64)),
        TypeError,
        "weight: expected dtype float32, float16 or bfloat16, got torch.float64",
    ),
    "ParallelMLP: made float64 after construction, given a float32 input": (
        lambda c, r, rf, d: fused_tp.ParallelMLP(c.in_features, 6, device=d).double()(
            torch.randn(2, c.in_features, device=d)
        ),
        TypeError,
        "fc1.weight: expected dtype float32, float16 or bfloat16, got torch.float64",
    ),
    # autocast casts no float64 tensor (as for F.linear): a float64 layer is refused inside it too, not run in bf16
    "column under autocast: a layer made float64": (
        lambda c, r, rf, d: _autocast(d, copy.deepcopy(c).double(), torch.randn(2, c.in_features, device=d)),
        TypeError,
        "weight: expected dtype float32, float16 or bfloat16, got torch.float64",
    ),
    "ParallelMLP under autocast: made float64, given a float64 input": (
        lambda c, r, rf, d: _autocast(
            d,
            fused_tp.ParallelMLP(c.in_features, 6, device=d).double(),
            torch.randn(2, c.in_features, device=d, dtype=torch.float64),
        ),
        TypeError,
        "fc1.weight: expected dtype float32, float16 or bfloat16, got torch.float64",
    ),
    "row_parallel_linear: bias in another dtype": (
        lambda c, r, rf, d: fused_tp.row_parallel_linear(
            torch.randn(2, r.weight.shape[1], device=d), r.weight, r.bias.detach().half()
        ),
        TypeError,
        "bias: expected dtype torch.float32",
    ),
}


def _autocast(device, layer, x):
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        return layer(x)


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_call_raises_naming_the_argument(device, name):
    call, error, message = BAD_CALLS[name]
    col = fused_tp.ColumnParallelLinear(7, 5, device=device)
    row = fused_tp.RowParallelLinear(7, 5, device=device)
    row_full = fused_tp.RowParallelLinear(7, 5, input_is_parallel=False, device=device)
    before = [p.detach().clone() for m in (col, row, row_full) for p in m.parameters()]
    with pytest.raises(error, match=message):
        call(col, row, row_full, device)
    after = [p.detach() for m in (col, row, row_full) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# A change of one fact check_linear_args reads, for x, weight or bias: its new value from its value. A new check
# in linear_args_pass and check_linear_args_one_by_one reads a fact: its change belongs here.
_ONE_CHANGE = {
    "dtype float64": lambda t: t.double(),
    "dtype int64": lambda t: t.long(),
    "dtype float16": lambda t: t.half(),
    "on meta": lambda t: t.to("meta"),
    "one longer": lambda t: torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device),
    "one dim less": lambda t: t.sum(0),  # (not t[0]: after "no rows" there is no row 0)
    "one dim more": lambda t: t[None],
    "no rows": lambda t: t[:0],
    "a list": lambda t: [1.0],
}


@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    changes=st.lists(st.tuples(st.sampled_from(["x", "w", "b"]), st.sampled_from(sorted(_ONE_CHANGE))), max_size=3),
    bias=st.booleans(),
)
@example(dtype=torch.float32, changes=[], bias=True)
@example(dtype=torch.bfloat16, changes=[("x", "one dim more")], bias=False)
@example(dtype=torch.float16, changes=[("b", "on meta")], bias=True)
@example(dtype=torch.float32, changes=[("b", "a list")], bias=True)
@example(dtype=torch.float32, changes=[("x", "one dim less"), ("x", "one dim less")], bias=True)  # a 0-D input
@example(dtype=torch.float32, changes=[("x", "no rows"), ("x", "one dim less")], bias=False)
def test_the_layers_one_expression_check_accepts_what_the_checks_one_by_one_accept(device, dtype, changes, bias):
    """check_linear_args decides in one expression (linear_args_pass) for the calls that pass and runs the checks
    one by one, with their errors, for the others: both must accept the same calls, or a bad call would slip
    through the quick one, or a good one pay for the slow one. A valid call (x [2, 3], weight [4, 3], bias [4] or
    None) with up to three of its facts changed (a change that cannot apply to what the others left is skipped)."""
    x, w = torch.zeros(2, 3, dtype=dtype, device=device), torch.zeros(4, 3, dtype=dtype, device=device)
    args = {"x": x, "w": w, "b": torch.zeros(4, dtype=dtype, device=device) if bias else None}
    for name, change in changes:
        if isinstance(args[name], torch.Tensor) and args[name].dim() > 0:
            args[name] = _ONE_CHANGE[change](args[name])
    x, w, b = args.values()

    class OneByOne(Exception):
        pass

    def stand_in(*_):
        raise OneByOne

    # check_linear_args, with the checks one by one replaced: returns where its one expression accepts the call
    with mock.patch.object(kernels.matmul, "check_linear_args_one_by_one", stand_in):
        try:
            kernels.check_linear_args(x, w, b)
            quick = True
        except OneByOne:
            quick = False
    try:
        kernels.matmul.check_linear_args_one_by_one(x, w, b, ("input", "weight", "bias"))
        one_by_one = True
    except (TypeError, ValueError):
        one_by_one = False
    assert quick == one_by_one


def test_kernel_launcher_checks(device):
    x, w = torch.randn(3, 4, device=device), torch.randn(5, 4, device=device)
    with pytest.raises(ValueError, match=r"input: expected last dim 4 \(weight.shape\[1\]\), got shape \(3, 5\)"):
        kernels.linear(torch.randn(3, 5, device=device), w)
    with pytest.raises(ValueError, match=r"weight: expected 2 dims"):
        kernels.linear(x, w[0])
    with pytest.raises(TypeError, match=r"weight: expected dtype float32, float16 or bfloat16, got torch.float64"):
        kernels.linear(x, w.double())


def test_backward_kernels_check_their_arguments(device):
    """kernels.grad_input and kernels.grad_params check their operands as kernels.linear does, naming the argument,
    before anything launches: mismatched widths, rows, dtypes or devices would otherwise be read through the wrong
    strides and give a wrong result without an error."""
    w, g = torch.randn(5, 4, device=device), torch.randn(3, 5, device=device)
    x = torch.randn(3, 4, device=device)
    bad_grad_input = [
        (
            (torch.randn(3, 7, device=device), w),
            ValueError,
            r"grad_y: expected last dim 5 \(weight.shape\[0\]\), got shape \(3, 7\)",
        ),
        ((g.bfloat16(), w), TypeError, r"grad_y: expected dtype torch.float32 \(the weight's\), got torch.bfloat16"),
        (
            (g.double(), w.double()),
            TypeError,
            r"weight: expected dtype float32, float16 or bfloat16, got torch.float64",
        ),
        ((g, w[0]), ValueError, r"weight: expected 2 dims \[out_features, in_features\], got shape \(4,\)"),
        (([1.0], w), TypeError, "grad_y: expected a torch.Tensor, got list"),
        ((g.to("meta"), w), ValueError, rf"grad_y: expected device {w.device} \(the weight's\), got meta"),
    ]
    for args, error, message in bad_grad_input:
        with pytest.raises(error, match=message):
            kernels.grad_input(*args)
    bad_grad_params = [
        ((g, torch.randn(4, 4, device=device)), {}, ValueError, r"x: expected leading dims \(3,\) \(grad_y's\)"),
        ((g, x.bfloat16()), {}, TypeError, r"x: expected dtype torch.float32 \(the grad_y's\), got torch.bfloat16"),
        ((g, None), {}, TypeError, "x: expected a torch.Tensor, got NoneType"),
        ((g[0, 0], x), {}, ValueError, r"grad_y: expected at least 1 dim \[..., N\], got shape \(\)"),
        ((g, x.to("meta")), {"bias": False}, ValueError, rf"x: expected device {g.device} \(the grad_y's\), got meta"),
    ]
    for args, kwargs, error, message in bad_grad_params:
        with pytest.raises(error, match=message):
            kernels.grad_params(*args, **kwargs)
    # x is not read without the weight gradient: None is fine there, and the bias gradient is grad_y's column sums.
    grad_w, grad_b = kernels.grad_params(g, None, weight=False)
    assert grad_w is None
    assert_close("grad_b", grad_b, *linear_reference(torch.ones(3, device=device), g.t()), tol(torch.float32, 3))


@pytest.mark.parametrize(
    "call, names",
    [
        ("linear", ("input", "weight", "bias")),
        ("linear, gelu", ("input", "weight", "bias")),
        ("grad_input", ("grad_y", "weight")),
        ("grad_input, gelu", ("grad_y", "weight", "pre")),
        ("grad_params", ("grad_y", "x")),
    ],
)
def test_the_kernels_refuse_a_call_autograd_would_record(device, call, names):
    """The products record no autograd: where autograd would record a call (grad mode on, an operand requiring grad)
    they raise, naming the operand, instead of returning a result that silently carries no gradient to it. Under
    no_grad the same call runs and gives the bits of the same operands without requires_grad."""
    gen = torch.Generator().manual_seed(0)
    t = lambda *shape: torch.randn(shape, generator=gen).to(device)  # noqa: E731
    operands = {"input": t(3, 4), "weight": t(5, 4), "bias": t(5), "grad_y": t(3, 5), "pre": t(3, 4), "x": t(3, 4)}
    run = {
        "linear": lambda o: kernels.linear(o["input"], o["weight"], o["bias"]),
        "linear, gelu": lambda o: kernels.linear(o["input"], o["weight"], o["bias"], activation="gelu"),
        "grad_input": lambda o: kernels.grad_input(o["grad_y"], o["weight"]),
        "grad_input, gelu": lambda o: kernels.grad_input(o["grad_y"], o["weight"], activation="gelu", pre=o["pre"]),
        "grad_params": lambda o: kernels.grad_params(o["grad_y"], o["x"]),
    }[call]
    plain = run(operands)
    fn = call.split(",")[0]
    for name in names:
        given = {k: v.detach().requires_grad_(k == name) for k, v in operands.items()}
        with pytest.raises(
            RuntimeError, match=rf"^{name}: requires grad, but fused_tp.kernels.{fn} records no autograd"
        ):
            run(given)
        with torch.no_grad():
            again = run(given)
        for a, b in zip(
            plain if isinstance(plain, tuple) else (plain,), again if isinstance(again, tuple) else (again,)
        ):
            assert torch.equal(a, b), f"{call}, {name} requiring grad, under no_grad"


def test_activation_options_are_checked(device):
    x, w = torch.randn(3, 4, device=device), torch.randn(5, 4, device=device)
    with pytest.raises(
        ValueError, match=r"activation: expected None, 'gelu', 'gelu_tanh', 'swiglu' or 'geglu_tanh', got 'relu'"
    ):
        kernels.linear(x, w, activation="relu")
    with pytest.raises(ValueError, match=r"pre: expected shape \(3, 4\) and dtype torch.float32, got \(3, 5\)"):
        kernels.grad_input(torch.randn(3, 5, device=device), w, activation="gelu", pre=torch.randn(3, 5, device=device))
    with pytest.raises(ValueError, match="pre: expected a tensor exactly when activation is given"):
        kernels.grad_input(torch.randn(3, 5, device=device), w, activation="gelu")
    with pytest.raises(
        ValueError, match=r"activation: expected 'gelu', 'gelu_tanh', 'swiglu' or 'geglu_tanh', got None"
    ):
        fused_tp.ParallelMLP(4, 8, activation=None, device=device)
    # An MLP has an activation: ParallelMLP's message never offers None, whatever it is given.
    with pytest.raises(
        ValueError, match=r"activation: expected 'gelu', 'gelu_tanh', 'swiglu' or 'geglu_tanh', got 'silu'"
    ):
        fused_tp.ParallelMLP(4, 8, activation="silu", device=device)
    with pytest.raises(
        ValueError, match=r"activation: expected 'gelu', 'gelu_tanh', 'swiglu' or 'geglu_tanh', got \['gelu'\]"
    ):
        fused_tp.ParallelMLP(4, 8, activation=["gelu"], device=device)
    fc1, fc2 = torch.nn.Linear(4, 8, device=device), torch.nn.Linear(8, 4, device=device)
    with pytest.raises(ValueError, match=r"fc2: expected in_features 8 \(fc1.out_features\), got 6"):
        fused_tp.ParallelMLP.from_linears(fc1, torch.nn.Linear(6, 4, device=device))
    with pytest.raises(ValueError, match="fc2: expected a bias exactly when fc1 has one"):
        fused_tp.ParallelMLP.from_linears(fc1, torch.nn.Linear(8, 4, bias=False, device=device))
    with pytest.raises(TypeError, match="fc1: expected an nn.Linear, got Sequential"):
        fused_tp.ParallelMLP.from_linears(torch.nn.Sequential(fc1), fc2)
    mlp = fused_tp.ParallelMLP.from_linears(fc1, fc2)
    with pytest.raises(ValueError, match=r"input: expected last dim 4 \(fc1.weight.shape\[1\]\), got shape \(3, 5\)"):
        mlp(torch.randn(3, 5, device=device))
    mlp.fc2.weight = torch.nn.Parameter(torch.randn(4, 7, device=device))  # fc2 no longer reads fc1's output
    with pytest.raises(ValueError, match=r"fc1's output: expected last dim 7 \(fc2.weight.shape\[1\]\)"):
        mlp(torch.randn(3, 4, device=device))


def test_gated_options_are_checked(device):
    """SwiGLU reads (gate, up) pairs: an odd width, a pre-activation of the wrong width and mismatched layers raise,
    naming the argument."""
    x, w = torch.randn(3, 4, device=device), torch.randn(5, 4, device=device)
    with pytest.raises(
        ValueError,
        match=r"weight: expected an even number of rows for 'swiglu' \(interleaved gate "
        r"and up pairs\), got 5",
    ):
        kernels.linear(x, w, activation="swiglu")
    with pytest.raises(ValueError, match=r"pre: expected shape \(3, 8\) and dtype torch.float32, got \(3, 4\)"):
        kernels.grad_input(
            torch.randn(3, 5, device=device), w, activation="swiglu", pre=torch.randn(3, 4, device=device)
        )
    fc1, fc2 = torch.nn.Linear(4, 8, device=device), torch.nn.Linear(8, 4, device=device)
    with pytest.raises(ValueError, match=r"fc2: expected in_features 4 \(half fc1.out_features\), got 8"):
        fused_tp.ParallelMLP.from_linears(fc1, fc2, activation="swiglu")
    with pytest.raises(ValueError, match=r"fc1: expected an even number of out_features for 'swiglu'"):
        fused_tp.ParallelMLP.from_linears(torch.nn.Linear(4, 7, device=device), fc2, activation="swiglu")
    gate, down = torch.nn.Linear(4, 6, device=device), torch.nn.Linear(6, 4, device=device)
    with pytest.raises(ValueError, match=r"up: expected in_features 4 and out_features 6 \(gate's\), got 4 and 5"):
        fused_tp.ParallelMLP.from_gated(gate, torch.nn.Linear(4, 5, device=device), down)
    with pytest.raises(ValueError, match=r"down: expected in_features 6 \(gate.out_features\), got 5"):
        fused_tp.ParallelMLP.from_gated(gate, gate, torch.nn.Linear(5, 4, device=device))
    with pytest.raises(ValueError, match="up: expected a bias exactly when gate has one"):
        fused_tp.ParallelMLP.from_gated(gate, torch.nn.Linear(4, 6, bias=False, device=device), down)
    with pytest.raises(ValueError, match="mlp: expected an act_fn computing SiLU"):
        fused_tp.ParallelMLP.from_llama_mlp(torch.nn.Module())
    with pytest.raises(ValueError, match=r"activation: expected a gated one \('swiglu', 'geglu_tanh'\), got 'gelu'"):
        fused_tp.ParallelMLP.from_gated(gate, gate, down, activation="gelu")
    mlp = fused_tp.ParallelMLP.from_gated(gate, gate, down)
    mlp.fc1.weight = torch.nn.Parameter(torch.randn(7, 4, device=device))  # no longer (gate, up) pairs
    mlp.fc1.bias = torch.nn.Parameter(torch.randn(7, device=device))
    with pytest.raises(ValueError, match=r"fc1.weight: expected an even number of rows for 'swiglu'"):
        mlp(x)


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda d: fused_tp.ColumnParallelLinear(4, 6, device=d, dtype=torch.float64), "dtype"),
        (lambda d: fused_tp.RowParallelLinear(4, 6, device=d, dtype=torch.int32), "dtype"),
        (lambda d: fused_tp.ParallelMLP(4, 8, device=d, dtype=torch.float64), "dtype"),
        (
            lambda d: fused_tp.ColumnParallelLinear.from_linear(torch.nn.Linear(4, 6, device=d).double()),
            "linear.weight",
        ),
        (lambda d: fused_tp.RowParallelLinear.from_linear(torch.nn.Linear(4, 6, device=d).double()), "linear.weight"),
        (
            lambda d: fused_tp.ParallelMLP.from_linears(
                torch.nn.Linear(4, 8, device=d).double(), torch.nn.Linear(8, 4, device=d)
            ),
            "fc1.weight",
        ),
    ],
)
def test_an_unsupported_parameter_dtype_is_refused_at_construction(device, build, name):
    """A float64 (or integer) layer raises when it is built, naming the argument, not at its first call."""
    with pytest.raises(TypeError, match=rf"^{name}: expected dtype float32, float16 or bfloat16, got torch\."):
        build(device)


def test_a_float64_default_dtype_is_refused_at_construction(device):
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(TypeError, match=r"^dtype: expected dtype float32, float16 or bfloat16, got torch.float64"):
            fused_tp.ColumnParallelLinear(4, 6, device=device)
    finally:
        torch.set_default_dtype(before)


def test_from_linears_refuses_layers_of_two_dtypes(device):
    message = r"^fc2.weight: expected dtype torch.float32 \(fc1.weight's\), got torch.float16"
    with pytest.raises(TypeError, match=message):
        fused_tp.ParallelMLP.from_linears(
            torch.nn.Linear(4, 8, device=device), torch.nn.Linear(8, 4, device=device, dtype=torch.float16)
        )


def test_clip_grad_norm_refuses_layers_on_two_groups(device):
    """fused_tp.clip_grad_norm_ sums the layers' shards over one group; layers on two raise, naming model, before
    any collective or any gradient changes, and so do torch's arguments (the parameters rather than the model)."""
    model = torch.nn.Sequential(*(fused_tp.ColumnParallelLinear(4, 4, device=device) for _ in range(2)))
    model(torch.randn(2, 4, device=device)).sum().backward()
    model[1].process_group = object()  # stands for another group (two groups need torch.distributed)
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="^model: expected its fused_tp layers on one process group"):
        fused_tp.clip_grad_norm_(model, 1.0)
    # torch's form, the parameters: which of them are shards only the model's layers tell
    with pytest.raises(TypeError, match=r"^model: expected the nn.Module whose gradients to clip, got generator"):
        fused_tp.clip_grad_norm_(model.parameters(), 1.0)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="linear: expected an nn.Linear, got Conv1d"):
        fused_tp.ColumnParallelLinear.from_linear(torch.nn.Conv1d(2, 3, 1))


def test_layer_refuses_a_group_of_another_size(device, monkeypatch):
    import fused_tp.modules

    layer = fused_tp.ColumnParallelLinear(4, 6, device=device)  # built at world size 1
    monkeypatch.setattr(fused_tp.modules, "group_size_rank", lambda group: (2, 1))
    with pytest.raises(RuntimeError, match="process_group: the layer was built for rank 0 of 1, but the group now"):
        layer(torch.randn(3, 4, device=device))


def test_a_process_group_of_another_type_is_refused():
    with pytest.raises(TypeError, match="process_group: expected None, a ProcessGroup or a 1-D DeviceMesh, got str"):
        fused_tp.ColumnParallelLinear(4, 6, process_group="tp")
    with pytest.raises(TypeError, match="process_group: expected None, a ProcessGroup or a 1-D DeviceMesh, got int"):
        fused_tp.column_parallel_linear(torch.randn(2, 4), torch.randn(3, 4), process_group=0)


def test_sequence_parallel_options_that_do_not_go_together_are_refused():
    with pytest.raises(ValueError, match="gather_output: a sequence-parallel Column layer feeds a Row layer"):
        fused_tp.ColumnParallelLinear(4, 6, gather_output=True, sequence_parallel=True)
    with pytest.raises(ValueError, match="input_is_parallel: a sequence-parallel Row layer takes a Column layer's"):
        fused_tp.RowParallelLinear(6, 4, input_is_parallel=False, sequence_parallel=True)
    layer = fused_tp.ColumnParallelLinear(4, 6, sequence_parallel=True, sequence_dim=2)
    with pytest.raises(ValueError, match="sequence_dim: expected a dim of the input other than its last"):
        layer(torch.randn(3, 4))


def test_a_bad_host_descriptors_setting_fails_the_import():
    """FUSED_TP_HOST_DESCRIPTORS (read at import: where launches through tensor descriptors take them made on the
    host) accepts 'graphs', 'always' or 'never'; anything else fails the import with the variable named, rather
    than quietly taking the default."""
    env = {**os.environ, "FUSED_TP_HOST_DESCRIPTORS": "sometimes"}
    run = subprocess.run([sys.executable, "-c", "import fused_tp"], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "ValueError: FUSED_TP_HOST_DESCRIPTORS='sometimes': expected 'graphs', 'always' or 'never'" in run.stderr
