"""The products of a linear layer as functions: y = x @ w.T + b (with an activation epilogue), grad_input, and the
weight and bias gradients. Each checks its arguments (the public ones), looks up its launch plan (plan.py: one
cache lookup keyed by sizes, strides, dtype, alignment and flags), allocates its outputs, copies an operand where
the plan says so, and launches (launch.py).

Where kernels run: CUDA tensors through compiled Triton; any tensor through Triton's interpreter when
TRITON_INTERPRET=1 was set before fused_tp was imported; CPU tensors otherwise through a torch path that computes
the same function (fp32 accumulation, bias on the accumulator, one rounding), with a warning the first time.
`kernel_path` says which one a device gets and `path_counts` how many launches took each path.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from . import autotune, configs, jit, layout, plan
from .epilogues import ACTIVATIONS, check_activation
from .launch import launch, path_counts, tile_counters

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETED = jit.INTERPRETED
_warned_torch_path = False


def kernel_path(device: torch.device | str) -> str:
    """Which implementation runs for tensors on `device`: "triton", "triton-interpreter" or "torch"."""
    if jit.INTERPRETED:
        return "triton-interpreter"
    return "triton" if torch.device(device).type == "cuda" else "torch"


def check_dtype(name: str, dtype: torch.dtype) -> None:
    """TypeError naming `name` unless the kernels take `dtype`."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {dtype}")


def check_operands(*args: tuple[str, torch.Tensor | None, bool]) -> None:
    """TypeError / ValueError naming the argument, for a kernel call's tensors given as (name, tensor, optional) in
    the order their errors name them: each a torch.Tensor (or None where optional), of a dtype the kernels take, and
    of the first one's dtype and device. The first is the reference, what a layer owns (its weight), against what
    the caller passes; it is checked first, so that a layer turned float64 after construction (model.double()) is
    named rather than its input."""
    for name, t, optional in args:
        if not isinstance(t, torch.Tensor) and not (t is None and optional):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    for name, t, _ in args:
        if t is not None:
            check_dtype(name, t.dtype)
    ref_name, ref, _ = args[0]
    for name, t, _ in args[1:]:
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {ref.dtype} (the {ref_name}'s), got {t.dtype}")
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: expected device {ref.device} (the {ref_name}'s), got {t.device}")


def refuse_autograd(fn: str, *named: tuple[str, torch.Tensor | None]) -> None:
    """RuntimeError naming the first of `named` that requires grad, for a call autograd would record (the caller has
    found grad mode on and an operand requiring grad, in one expression: this runs on every call of the checked
    products). The products record no autograd, so their result would silently carry no gradient back to it. The
    layers and fused_tp.column_parallel_linear are the differentiable forms; the registered operators carry no
    autograd either (kernels/ops.py says why)."""
    for name, t in named:
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"{name}: requires grad, but fused_tp.kernels.{fn} records no autograd (its result would carry "
                "no gradient): call it under torch.no_grad(), or use the layers or "
                "fused_tp.column_parallel_linear, which are differentiable"
            )


def linear_args_pass(
    dtype: torch.dtype, device: torch.device, last: int, weight: torch.Tensor, bias: torch.Tensor | None
) -> bool:
    """Whether an input tensor of `dtype`, on `device`, of at least one dim and last dim `last` passes
    check_linear_args with `weight` and `bias`: its checks in one expression, for the calls that pass (a layer runs
    them on each call, and one expression costs it less host time than the checks one by one: bench/NOTES.md,
    attempt 56). False says only that check_linear_args_one_by_one must run, for the error that
    names the argument. The two hold the same checks: a check added to one belongs in the other, and
    tests/test_errors.py compares them over changes of each fact they read (a new fact's change belongs there)."""
    if not isinstance(weight, torch.Tensor):
        return False
    w_dtype, w_device, w_shape = weight.dtype, weight.device, weight.shape
    return (
        w_dtype in SUPPORTED_DTYPES
        and dtype is w_dtype
        and device == w_device
        and len(w_shape) == 2
        and last == w_shape[1]
        and (
            bias is None
            or isinstance(bias, torch.Tensor)
            and bias.dtype is w_dtype
            and bias.device == w_device
            and bias.shape == w_shape[:1]
        )
    )


def autocast_args(*tensors) -> tuple:
    """A call's tensors (its input first, then the weights and biases) as F.linear takes them inside a torch.autocast
    region of the input's device type: every floating tensor other than float64 cast to the region's dtype (what
    autocast does for F.linear), by a cast autograd records, so that a layer's gradients reach its parameters in
    their own dtype. Unchanged outside such a region, and where the input is not a tensor (the checks then name
    it)."""
    x = tensors[0]
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype is not torch.float64 else t
        for t in tensors
    )


def check_linear_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    names: tuple[str, str, str] = ("input", "weight", "bias"),
) -> None:
    """Raise TypeError / ValueError naming the argument (by `names`) if (x, weight, bias) is not a valid F.linear
    call."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and linear_args_pass(x.dtype, x.device, x.shape[-1], weight, bias):
        return
    check_linear_args_one_by_one(x, weight, bias, names)


def check_linear_args_one_by_one(x, weight, bias, names: tuple[str, str, str]) -> None:
    """check_linear_args' checks one at a time, each with its error (what linear_args_pass decides at once)."""
    in_name, w_name, b_name = names
    check_operands((w_name, weight, False), (in_name, x, False), (b_name, bias, True))
    if weight.dim() != 2:
        raise ValueError(f"{w_name}: expected 2 dims [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{in_name}: expected last dim {weight.shape[1]} ({w_name}.shape[1]), got shape {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{b_name}: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, activation: str | None = None
) -> torch.Tensor:
    """y = x @ weight.T + bias, the contract of F.linear; with activation="gelu" (or "gelu_tanh"),
    F.gelu(x @ weight.T + bias) (approximate="tanh"), computed on the fp32 accumulator before rounding; with
    activation="swiglu", silu(gate) * up of the product's interleaved (gate, up) column pairs (epilogues.py).

    x [..., K], weight [N, K], bias [N] or None  ->  y [..., N] (swiglu: [..., N / 2]) contiguous, in x's dtype;
    inside torch.autocast, as F.linear there, all three cast to its dtype first (autocast_args).
    """
    if torch._C._is_any_autocast_enabled():
        x, weight, bias = autocast_args(x, weight, bias)
    check_linear_args(x, weight, bias)
    activation = check_activation(activation)
    check_gated_width(activation, weight.shape[0], "weight", "rows")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias is not None and bias.requires_grad):
        refuse_autograd("linear", ("input", x), ("weight", weight), ("bias", bias))
    return linear_prechecked(x, weight, bias, activation)[0]


def check_gated_width(activation: str, width: int, name: str, what: str) -> None:
    """ValueError naming `name` where a gated activation gets an odd pre-activation width (its gate/up pairs)."""
    if activation and ACTIVATIONS[activation].gated and width % 2:
        raise ValueError(
            f"{name}: expected an even number of {what} for {activation!r} (interleaved gate and up pairs), got {width}"
        )


def linear_prechecked(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "", save_pre: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, pre) of linear() for arguments that check_linear_args has passed (the layers check theirs before any
    collective); `activation` as check_activation returns it. With save_pre, pre [..., N] is the pre-activation
    x @ weight.T + bias (rounded), else None; y is [..., N / 2] for a gated activation."""
    if save_pre and not activation:
        raise ValueError("save_pre: the pre-activation is saved for an activation's derivative; no activation given")
    aux = "store" if save_pre else ""
    b_facts = None if bias is None else (bias.stride(), bias.data_ptr() % 16)
    key, call = _found("fwd", x, weight, b_facts, activation, aux)
    if call is not None:
        return _run(call, x, weight, bias, activation, aux, None)
    matrix, M, x_strides = _matrix(x)
    N, K = weight.shape
    lead = x.shape[:-1]
    out = (*lead, ACTIVATIONS[activation].width(N) if activation else N)
    w_strides = weight.stride()
    return _matmul(
        "fwd",
        M,
        N,
        K,
        matrix,
        x_strides,
        weight,
        (w_strides[1], w_strides[0]),
        bias,
        out,
        activation,
        aux,
        pre_shape=(*lead, N) if save_pre else None,
        key=key if matrix is x else None,  # a copy is made on each call: none to skip
    )


def grad_input(
    grad_y: torch.Tensor, weight: torch.Tensor, *, activation: str | None = None, pre: torch.Tensor | None = None
) -> torch.Tensor:
    """grad_x = grad_y @ weight.   grad_y [..., N], weight [N, K]  ->  grad_x [..., K].

    With `activation` and `pre` [..., K], the pre-activation of the layer whose activation made this one's input
    x = activation(pre): grad_pre = (grad_y @ weight) * activation'(pre), in the same launch. A gated activation's
    pre is [..., 2K], its (gate, up) pairs interleaved, and so is grad_pre: both gradients of each pair.
    """
    check_operands(("weight", weight, False), ("grad_y", grad_y, False), ("pre", pre, True))
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2 dims [out_features, in_features], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if grad_y.dim() < 1 or grad_y.shape[-1] != N:
        raise ValueError(f"grad_y: expected last dim {N} (weight.shape[0]), got shape {tuple(grad_y.shape)}")
    act = check_activation(activation)
    if (pre is None) != (act == ""):
        raise ValueError("pre: expected a tensor exactly when activation is given")
    pre_width = 2 * K if act and ACTIVATIONS[act].gated else K
    if pre is not None and (pre.shape != (*grad_y.shape[:-1], pre_width) or pre.dtype != grad_y.dtype):
        raise ValueError(
            f"pre: expected shape {(*grad_y.shape[:-1], pre_width)} and dtype {grad_y.dtype}, got "
            f"{tuple(pre.shape)} {pre.dtype}"
        )
    if torch.is_grad_enabled() and (
        grad_y.requires_grad or weight.requires_grad or pre is not None and pre.requires_grad
    ):
        refuse_autograd("grad_input", ("grad_y", grad_y), ("weight", weight), ("pre", pre))
    return grad_input_prechecked(grad_y, weight, act, pre)


def grad_input_prechecked(
    grad_y: torch.Tensor, weight: torch.Tensor, activation: str = "", pre: torch.Tensor | None = None
) -> torch.Tensor:
    """grad_input for arguments grad_input has checked (the layers' own)."""
    pre = None if pre is None else pre.contiguous()  # read with the output's (contiguous) strides
    aux = "load" if activation else ""
    key, call = _found("dgrad", grad_y, weight, activation, None if pre is None else pre.data_ptr() % 16)
    if call is not None:
        return _run(call, grad_y, weight, None, activation, aux, pre)[0]
    matrix, M, g_strides = _matrix(grad_y)
    N, K = weight.shape
    gated = bool(activation) and ACTIVATIONS[activation].gated
    return _matmul(
        "dgrad_gated" if gated else "dgrad",
        M,
        K,
        N,
        matrix,
        g_strides,
        weight,
        weight.stride(),
        None,
        (*grad_y.shape[:-1], 2 * K if gated else K),
        activation,
        aux,
        pre,
        key=key if matrix is grad_y else None,
    )[0]


def grad_params(
    grad_y: torch.Tensor, x: torch.Tensor | None, *, weight: bool = True, bias: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_w, grad_b) = (grad_y.T @ x, grad_y summed over rows): the matmul kernel and the column-sum kernel, or
    over a few tokens the matmul kernel alone (plan.matmul_plan's row_sum); either may be skipped (None; x may be
    None without the weight gradient). The bias gradient's bits then follow that launch's config, which x's width
    steers: a bias replicated over ranks whose x differ in width takes its gradient with weight=False, from the
    column-sum kernel alone (the row-parallel layers: grad_params_prechecked's fuse_bias=False).

    grad_y [..., N], x [..., K] with grad_y's leading dims  ->  grad_w [N, K], grad_b [N]
    """
    check_operands(("grad_y", grad_y, False), ("x", x, not weight))
    if grad_y.dim() < 1:
        raise ValueError(f"grad_y: expected at least 1 dim [..., N], got shape {tuple(grad_y.shape)}")
    if weight and (x.dim() < 1 or x.shape[:-1] != grad_y.shape[:-1]):
        raise ValueError(
            f"x: expected leading dims {tuple(grad_y.shape[:-1])} (grad_y's) and a last dim, got shape {tuple(x.shape)}"
        )
    if torch.is_grad_enabled() and (grad_y.requires_grad or x is not None and x.requires_grad):
        refuse_autograd("grad_params", ("grad_y", grad_y), ("x", x))
    return grad_params_prechecked(grad_y, x, weight=weight, bias=bias)


def grad_params_prechecked(
    grad_y: torch.Tensor, x: torch.Tensor | None, *, weight: bool = True, bias: bool = True, fuse_bias: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """grad_params for arguments grad_params would pass (the layers' own). fuse_bias=False: the bias gradient from
    the column-sum kernel whatever the tokens, in an order x's width does not steer (a replicated bias)."""
    # The bias gradient comes from the weight gradient's launch where its plan writes A's row sums (a short K loop:
    # plan.matmul_plan), else from a column sum of its own.
    row_sum = bias and fuse_bias
    key, call = _found("wgrad", grad_y, x, row_sum) if weight else (None, None)
    if call is not None:
        grad_w, grad_b = _run(call, grad_y, x, None, "", "", None)
        if bias and grad_b is None:
            # the column sum's rows and strides: the weight gradient's K (grad_y's rows) and its A's, swapped
            rows, (g_cols, g_rows) = call[3], call[4]
            grad_b = colsum(grad_y, rows, (g_rows, g_cols))
        return grad_w, grad_b
    matrix, M, (g_rows, g_cols) = _matrix(grad_y)
    N = grad_y.shape[-1]
    grad_w = grad_b = None
    if weight:
        x_matrix, _, x_strides = _matrix(x)
        K = x.shape[-1]
        stored = key if matrix is grad_y and x_matrix is x else None
        grad_w, grad_b = _matmul(
            "wgrad", N, K, M, matrix, (g_cols, g_rows), x_matrix, x_strides, None, (N, K), key=stored, row_sum=row_sum
        )
    if bias and grad_b is None:
        grad_b = colsum(matrix, M, (g_rows, g_cols))
    return grad_w, grad_b


def paired_grads(
    grad_y: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, *, bias: bool = True, fuse_bias: bool = True
) -> tuple | None:
    """(grad_x, grad_w, grad_b) of a layer y = x @ weight.T (+ b) in one launch where plan.pair_plan pairs its
    grad_input and weight gradient (few tokens, a small weight), else None: the caller launches them apart
    (grad_input_prechecked, grad_params_prechecked), as it must where a collective waits on grad_x alone. For
    arguments the layers pass (grad_y [..., N], weight [N, K], x [..., K]); grad_b None unless `bias`, written by
    the pair's launch where fuse_bias (as grad_params_prechecked writes it), else by the column-sum kernel."""
    row_sum = bias and fuse_bias
    key, entry = _found("pair", grad_y, x, weight.shape, weight.stride(), weight.data_ptr() % 16, row_sum)
    if key is None:  # a config chosen per launch (pinned, autotuned) is a single product's
        return None
    if entry is None:
        matrix, tokens, g_strides = _matrix(grad_y)
        x_matrix, _, x_strides = _matrix(x)
        entry = False  # kept too, so that a layer whose products launch apart looks this up once a call
        if matrix is grad_y and x_matrix is x:  # operands that need a copy first launch apart
            aligned = (not grad_y.data_ptr() % 16, not weight.data_ptr() % 16, not x.data_ptr() % 16)
            args = (tokens, *weight.shape, g_strides, weight.stride(), x_strides, grad_y.dtype, aligned)
            p = plan.pair_plan(*args, grad_y.get_device(), key[9], row_sum)  # key[9]: TF32 (_found)
            entry = False if p is None else (p, tokens, g_strides)
        _keep(key, entry)
    if entry is False:
        return None
    p, tokens, (g_rows, g_cols) = entry
    path_counts.update(p.counts)
    N, K = weight.shape
    dtype, device = grad_y.dtype, grad_y.device
    grad_x = _out((*grad_y.shape[:-1], K), dtype, device, p.wide)
    grad_w = _out((N, K), dtype, device, p.wide)
    sums = _out((N,), dtype, device, p.wide) if p.row_sum else grad_w
    launch(jit.pair_kernel, p.launch, (grad_y, weight, grad_x, grad_y, x, sums, grad_w))
    grad_b = _rounded(sums, dtype) if p.row_sum else colsum(grad_y, tokens, (g_rows, g_cols)) if bias else None
    return _rounded(grad_x, dtype), _rounded(grad_w, dtype), grad_b


def colsum(g: torch.Tensor, M: int, strides: tuple[int, int]) -> torch.Tensor:
    """g viewed as [M, N] with `strides` -> its column sums [N], summed in fp32 in a fixed order, rounded once."""
    N = g.shape[-1]
    dev = plan.device(g.get_device())
    path_counts[dev.path] += 1
    if dev.path == "torch":
        _warn_torch_path_once()
        return torch.as_strided(g, (M, N), strides).float().sum(0).to(g.dtype)
    out = _out((N,), g.dtype, g.device, dev.path == "triton-interpreter")
    if N:
        p = plan.colsum_plan(M, N, dev.index, configs.COLSUM_CONFIG, g.dtype, out.dtype, strides, not g.data_ptr() % 16)
        _colsum(p, g, out)
    return _rounded(out, g.dtype)


def _colsum(p: plan.ColsumPlan, g: torch.Tensor, out: torch.Tensor) -> None:
    partial = out if p.then is None else torch.empty((p.chunks, p.N), device=g.device, dtype=torch.float32)
    launch(jit.colsum_kernel, p.launch, (g, partial))
    if p.then is not None:
        _colsum(p.then, partial, out)


def _found(product: str, a: torch.Tensor, b: torch.Tensor, *facts) -> tuple:
    """(key, call) of a launch whose tensors are a and b: its key in plan.calls (their sizes, strides, dtype,
    device, 16-byte alignment and TF32, with `facts`, the rest its plan reads) and what is kept there, or None;
    (None, None) where the config is chosen per launch (pinned, autotuned)."""
    if configs.chosen_per_launch():
        return None, None
    dtype = a.dtype
    key = (
        product,
        a.shape,
        a.stride(),
        b.shape,
        b.stride(),
        dtype,
        a.get_device(),
        a.data_ptr() % 16,
        b.data_ptr() % 16,
        dtype is torch.float32 and _tf32(),
        *facts,
    )
    return key, plan.calls.get(key)


def _keep(key: tuple, entry) -> None:
    """Keep what a launch derived under its key in plan.calls (emptied when full)."""
    if len(plan.calls) >= plan.PLAN_CACHE_SIZE:
        plan.calls.clear()
    plan.calls[key] = entry


def _matrix(t: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """(t, rows, (row stride, column stride)) of t [..., D] read as a matrix [rows, D]: t itself where its strides
    allow that without a copy (a view would cost a tensor's creation on every launch), else a contiguous copy."""
    shape, strides = t.shape, t.stride()
    if len(shape) == 2:
        return t, shape[0], strides
    rows = layout.rows_stride(shape, strides)
    if rows is None:
        return t.contiguous(), math.prod(shape[:-1]), (shape[-1], 1)
    return t, math.prod(shape[:-1]), (rows, strides[-1])


def _matmul(
    product: str,
    M: int,
    N: int,
    K: int,
    a: torch.Tensor,
    a_strides: tuple[int, int],
    b: torch.Tensor,
    b_strides: tuple[int, int],
    bias: torch.Tensor | None,
    out_shape: tuple,
    activation: str = "",
    aux: str = "",
    pre: torch.Tensor | None = None,
    pre_shape: tuple | None = None,
    key: tuple | None = None,
    row_sum: bool = False,
) -> tuple:
    """(C, its second output or None) of C[M, N] = A[M, K] @ B[K, N] (+ bias), A and B read from `a` and `b`
    through the given strides; C new and contiguous, of `out_shape` (M * N elements, or a gated activation's
    width); the second output the pre-activation stored (aux == "store") of `pre_shape`, or with `row_sum` A's row
    sums [M] where the plan has the launch write them (plan.matmul_plan). `key`: the raw facts of the caller's
    tensors, under which plan.calls keeps what this launch derived (None: nothing kept)."""
    dtype, index = a.dtype, a.get_device()
    tf32 = dtype is torch.float32 and _tf32()
    aligned = (
        not a.data_ptr() % 16,
        not b.data_ptr() % 16,
        bias is None or not bias.data_ptr() % 16,
        pre is None or not pre.data_ptr() % 16,
    )
    pinned = configs.pinned_config()
    pinned = None if pinned is None else (pinned, "pinned")
    bias_stride = None if bias is None else bias.stride(0)
    # matmul_plan's arguments before the config's source and the row sums: autotuning plans again with others
    facts = (product, M, N, K, a_strides, b_strides, dtype, aligned, bias_stride, activation, aux, index, tf32)
    p = plan.matmul_plan(*facts, pinned, row_sum)
    if pinned is None and configs.autotune_enabled() and p.path != "torch":
        p = _autotuned(p, facts, a, b, bias, row_sum)
    call = (p, M, N, K, a_strides, b_strides, out_shape, pre_shape)
    if key is not None:
        _keep(key, call)
    return _run(call, a, b, bias, activation, aux, pre)


def _run(call: tuple, a: torch.Tensor, b: torch.Tensor, bias, activation: str, aux: str, pre) -> tuple:
    """_matmul's launch, from its plan and the arguments the plan was derived from (`call`, as plan.calls keeps
    them): outputs allocated, operands copied where the plan says so, the kernel launched; (C, the second output)."""
    p, M, N, K, a_strides, b_strides, out_shape, pre_shape = call
    dtype = a.dtype
    for name in p.counts:
        path_counts[name] += 1
    if p.path == "torch":
        _warn_torch_path_once()
        return _torch_matmul(M, N, K, a, a_strides, b, b_strides, bias, out_shape, activation, aux, pre, pre_shape)
    device = a.device
    c = _out(out_shape, dtype, device, p.wide)
    saved = sums = None
    if aux == "store":
        saved = _out(pre_shape, dtype, device, p.wide)
    elif p.row_sum:
        sums = _out((M,), dtype, device, p.wide)
    if p.launch is not None:
        if p.copy_a is not None:
            a = layout.aligned_copy(torch.as_strided(a, (M, K), a_strides), p.copy_a)
        if p.copy_b is not None:
            b = layout.aligned_copy(torch.as_strided(b, (K, N), b_strides), p.copy_b)
        if p.splits > 1:  # the partials need no initialising: every split writes its whole slab
            partials = torch.empty((p.splits, M, N), device=device, dtype=torch.float32)
            counters = tile_counters(p.tiles, device)
        else:
            partials = counters = c
        aux_t = saved if saved is not None else pre if pre is not None else c
        first = sums if sums is not None else c if bias is None else bias  # the bias's slot: read, or written
        launch(jit.matmul_kernel, p.launch, (a, b, first, c, partials, aux_t, counters))
    second = saved if saved is not None else sums
    return _rounded(c, dtype), None if second is None else _rounded(second, dtype)


def _tf32() -> bool:
    # F.linear's setting, torch.backends.cuda.matmul.allow_tf32, read past its Python wrapper (attempt 56)
    return torch._C._get_cublas_allow_tf32()


def _autotuned(p, facts: tuple, a, b, bias, row_sum: bool):
    """FUSED_TP_AUTOTUNE=1: the plan with the config autotune chose for this launch's key (timed epilogue-free:
    the same tiles). An empty launch times nothing but still takes part in a consensus, so that every rank makes
    the same collectives. `facts`: matmul_plan's arguments before the config's source."""
    product, M, N, K, a_strides, b_strides, dtype, _, _, activation, aux, index, tf32 = facts
    replan = functools.partial(plan.matmul_plan, *facts)
    # The operands' path, found with a descriptor config as tune finds it: the planned config may read through
    # pointers operands that descriptors could address (tma=False), and their candidates are the descriptor ones.
    probe = replan((configs.ROUTE_PROBE, "pinned"))
    tma = probe.launch is not None and probe.launch.kwargs["TMA"]
    aux_tile = plan.aux_tiles(activation, aux)
    key = (p.path, index, product, dtype, tf32, tma, aux_tile, M, N, K)
    cands = [c for c in configs.candidates(M, N, K, dtype, tma) if configs.fits(c, dtype.itemsize, tma, aux_tile)]
    rule = configs.rule_config(M, dtype, jit.INTERPRETED, tma, aux_tile)
    out = (M, N)
    cfg = autotune.autotuned_config(
        key,
        cands if M and N else [],
        rule,
        lambda: _matmul(product, M, N, K, a, a_strides, b, b_strides, bias, out),
        lambda c: configs.fits(c, dtype.itemsize, tma, aux_tile),
    )
    if cfg is None or p.launch is None:
        return p
    return replan((cfg, "autotuned"), row_sum)


def _torch_matmul(M, N, K, a, a_strides, b, b_strides, bias, out_shape, activation, aux, pre, pre_shape):
    """The torch path: the kernels' function (fp32 accumulation, bias and activation on the accumulator, one
    rounding) for CPU tensors when Triton's interpreter is off."""
    c = torch.as_strided(a, (M, K), a_strides).float() @ torch.as_strided(b, (K, N), b_strides).float()
    c = c if bias is None else c + bias.float()
    saved = c.to(a.dtype).view(pre_shape) if aux == "store" else None
    if aux == "load":
        c = ACTIVATIONS[activation].torch_grad(c, pre.reshape(M, -1).float())
    elif activation:
        c = ACTIVATIONS[activation].torch_fn(c)
    return c.to(a.dtype).view(out_shape), saved


def _out(shape, dtype: torch.dtype, device: torch.device, wide: bool) -> torch.Tensor:
    """An output buffer for a kernel: in the operands' dtype, or fp32 where the interpreter must not round.

    The interpreter multiplies bf16 bit patterns in tl.dot, gets bf16 elementwise ops and sums wrong, and truncates
    fp32 -> bf16 casts (FIELD-NOTES). Its fp32 arithmetic and bf16 -> fp32 casts are exact, so there 16-bit
    operands are widened before any arithmetic, the kernels write fp32, and `_rounded` rounds once to nearest
    even: the same function the compiled kernels compute, up to the order of fp32 sums.
    """
    # The sizes as separate arguments: torch parses them faster than one tuple (bench/NOTES.md, attempt 56). `shape`
    # has at least one dim.
    return torch.empty(*shape, device=device, dtype=torch.float32 if wide else dtype)


def _rounded(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return out if out.dtype == dtype else out.to(dtype)


def _warn_torch_path_once() -> None:
    global _warned_torch_path
    if not _warned_torch_path:
        _warned_torch_path = True
        warnings.warn(
            "fused_tp: CPU tensors run a torch path, not the Triton kernels; set TRITON_INTERPRET=1 before "
            "importing fused_tp to run the kernels through Triton's interpreter",
            stacklevel=4,
        )
