"""What each gloo rank runs for tests/test_dist.py (imported by name in the rank processes).

Each case takes CPU tensors drawn by the parent, runs on the test device, and returns CPU tensors, so the
parent can check every rank's results against one float64 reference."""

import copy
import io

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fused_tp


def dense_linear(weight, bias, device):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device=device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def layer_norm(weight, bias):
    """An nn.LayerNorm (CPU) with these parameters."""
    norm = nn.LayerNorm(weight.shape[0])
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    return norm


def _cpu(t):
    return None if t is None else t.detach().cpu()


def layers_step(kind, device, dense, x, grad_y, activation="gelu", autocast=None):
    """Forward and backward of one stack of layers built with from_linear from the dense (weight, bias) pairs.

    kind: "mlp"            Column -> GELU -> Row (Megatron's MLP), three modules
          "parallel_mlp"   the same as one ParallelMLP (`activation` in the kernels)
          "column_gather"  Column with gather_output=True
          "row_scatter"    Row with input_is_parallel=False
    Returns y, grad_x and, per layer, the shard of weight and bias with their gradients; for "row_scatter" also
    the output for a zero input (the bias alone, if it is added exactly once). `autocast`: a dtype, the forward
    inside torch.autocast to it.
    """
    forward, layers = _stack(kind, [dense_linear(w, b, device) for w, b in dense], activation)
    x = x.to(device).requires_grad_()
    with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
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


def _stack(kind, linears, activation):
    """(forward, its fused_tp layers) for a kind of layers_step, from dense nn.Linear layers; the "sp_" kinds with
    sequence_parallel=True (input and output: this rank's share of the sequence, dim 0)."""
    seq = dict(sequence_parallel=True) if kind.startswith("sp_") else {}
    if kind in ("mlp", "sp_mlp"):
        layers = [
            fused_tp.ColumnParallelLinear.from_linear(linears[0], **seq),
            fused_tp.RowParallelLinear.from_linear(linears[1], **seq),
        ]
        return nn.Sequential(layers[0], fused_tp.kernels.ACTIVATIONS[activation].module(), layers[1]), layers
    if kind in ("parallel_mlp", "sp_parallel_mlp"):
        mlp = fused_tp.ParallelMLP.from_linears(*linears, activation=activation, **seq)
        return mlp, [mlp.fc1, mlp.fc2]
    if kind == "column_gather":
        layer = fused_tp.ColumnParallelLinear.from_linear(linears[0], gather_output=True)
    else:
        layer = fused_tp.RowParallelLinear.from_linear(linears[0], input_is_parallel=False)
    return layer, [layer]


def compiled_against_eager(kind, device, dense, inputs, activation="gelu"):
    """The stack of layers_step, compiled with torch.compile(fullgraph=True, dynamic=True, backend="aot_eager"),
    against itself eagerly, forward and backward, for each (x, grad_y) of `inputs` (token counts differ): per
    input, the names of the results (y, grad_x, every parameter's gradient) that are not bitwise equal, and how
    many times dynamo compiled."""
    import torch._dynamo.testing

    forward, layers = _stack(kind, [dense_linear(w, b, device) for w, b in dense], activation)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(forward, backend=counter, fullgraph=True, dynamic=True)
    params = [(f"{name} of layer {i}", p) for i, layer in enumerate(layers) for name, p in layer.named_parameters()]
    differ = []
    for x, grad_y in inputs:
        results = []
        for fn in (forward, compiled):
            leaf = x.to(device).requires_grad_()
            for _, p in params:
                p.grad = None
            y = fn(leaf)
            y.backward(grad_y.to(device))
            results.append([("y", y), ("grad_x", leaf.grad)] + [(n, p.grad) for n, p in params])
        differ.append([n for (n, a), (_, b) in zip(*results) if not torch.equal(a, b)])
    return {"differ": differ, "frames": counter.frame_count}


def exported_against_eager(kind, device, dense, inputs):
    """The stack of layers_step exported by torch.export (not strict: torch's own trace; the token count a dynamic
    dim), its program's forward against the stack's eager forward under no_grad, for each x of `inputs` (token
    counts differ): the token counts whose outputs are not bitwise equal."""
    forward, _ = _stack(kind, [dense_linear(w, b, device) for w, b in dense], "gelu")
    x = inputs[0][0].to(device)
    tokens = torch.export.Dim("tokens", min=2)
    exported = torch.export.export(forward, (x,), dynamic_shapes=({0: tokens},), strict=False).module()
    differ = []
    with torch.no_grad():
        for x, _ in inputs:
            if not torch.equal(exported(x.to(device)), forward(x.to(device))):
                differ.append(x.shape[0])
    return differ


# what the overlap cases call each product and collective, in eager code (the kernels module's functions,
# torch.distributed's calls) and in a traced graph (the operators) alike
_OVERLAP_NAMES = {
    "grad_weight_bias": "grad_params",
    "grad_weight": "grad_params",
    "bias_grad": "grad_params",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
}
_DIST_CALLS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor")


def _issued(pending: dict, product: str) -> None:
    """`product` issued while the `pending` collectives run: each one's list of products gets it, once in a row (one
    eager grad_params call can trace as two operators, the weight's and the bias's gradient)."""
    for _, products in pending.values():
        if products[-1:] != [product]:
            products.append(product)


def backward_overlaps(kind, device, dense, x, compiled):
    """The stack of layers_step, eagerly or compiled (fullgraph, aot_autograd with the default partitioner): for
    each collective of its backward, in the order they are waited for, (its name, the fused_tp products issued
    between it and its wait): the work a collective overlaps with. Eagerly read off the host's calls (the kernels'
    functions and torch.distributed's, wrapped; a blocking collective waits at once), compiled off the traced
    backward graph, which inductor's wrapper runs in its order."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from fused_tp.kernels import ops

    name_of = lambda name: _OVERLAP_NAMES.get(name, name)  # noqa: E731
    forward, _ = _stack(kind, [dense_linear(w, b, device) for w, b in dense], "gelu")
    pending, done = {}, []  # id -> (collective, products since), in issue order; what was waited for, in order
    if compiled:
        graphs = []

        def run(gm, _example_inputs):
            return make_boxed_func(gm.forward)

        def keep(gm, example_inputs):
            graphs.append(gm.graph)
            return run(gm, example_inputs)

        traced = torch.compile(forward, backend=aot_autograd(fw_compiler=run, bw_compiler=keep), fullgraph=True)
        traced(x.to(device).requires_grad_()).sum().backward()
        (backward,) = graphs
        for node in backward.nodes:
            target = str(node.target) if node.op == "call_function" else ""
            op = target.split(".")[1] if "." in target else ""
            if target.startswith("_c10d_functional.") and op != "wait_tensor":
                pending[id(node)] = (name_of(op), [])
            elif op == "wait_tensor":
                done.append(pending.pop(id(node.args[0])))
            elif target.startswith("fused_tp."):
                _issued(pending, name_of(op))
        return done

    def product(name, fn):
        def call(*args, **kwargs):
            _issued(pending, name)
            return fn(*args, **kwargs)

        return call

    def collective(name, fn):
        def call(*args, async_op=False, **kwargs):
            work = fn(*args, async_op=async_op, **kwargs)
            entry = (name, [])
            if not async_op:
                done.append(entry)
                return work

            class Recorded:  # the work, its wait recorded
                def wait(self):
                    done.append(pending.pop(id(entry)))
                    return work.wait()

            pending[id(entry)] = entry
            return Recorded()

        return call

    y = forward(x.to(device).requires_grad_())
    wrapped = {(ops, n): product(n, getattr(ops, n)) for n in ("grad_input", "grad_params")}
    wrapped |= {(dist, n): collective(name_of(n), getattr(dist, n)) for n in _DIST_CALLS}
    saved = {key: getattr(*key) for key in wrapped}
    try:
        for (module, attr), fn in wrapped.items():
            setattr(module, attr, fn)
        y.backward(torch.ones_like(y))
    finally:
        for (module, attr), fn in saved.items():
            setattr(module, attr, fn)
    return done


def compiled_uneven_sequence(kind, device, dense, width):
    """The sequence-parallel stack compiled (fullgraph, aot_eager) and called with shards of uneven lengths (rank 0
    one token longer): what it raised."""
    forward, _ = _stack(kind, [dense_linear(w, b, device) for w, b in dense], "gelu")
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True, dynamic=True)
    try:
        compiled(torch.randn(5 + (dist.get_rank() == 0), width, device=device))
    except RuntimeError as e:
        return str(e)
    return None


def compile_with_guard_or_autotuning(device):
    """torch.compile(fullgraph=True) of a Column layer with the rank guard on, then with autotuning on: the text of
    what each raised (both are eager-only)."""
    import os

    from fused_tp.kernels import configs

    layer = fused_tp.ColumnParallelLinear(6, 5, device=device)
    x = torch.randn(4, 6, device=device)
    out = {}
    for name in ("guard", "autotuning"):
        torch._dynamo.reset()
        os.environ["FUSED_TP_AUTOTUNE"] = "1" if name == "autotuning" else "0"
        configs.read_environment()
        try:
            with fused_tp.check_ranks(name == "guard"):
                torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
            out[name] = None
        except Exception as e:  # dynamo wraps what the traced code raised
            out[name] = str(e)
        finally:
            del os.environ["FUSED_TP_AUTOTUNE"]
            configs.read_environment()
    return out


def init_shards(seed, in_features, out_features, bias, dtype):
    """The parameters each constructor makes on this rank under `seed`; and under "<name> reset", those that
    reset_parameters draws under `seed` into the same module built on the meta device and then made empty on the
    CPU (their values must be the constructor's), for the two layers and both kinds of ParallelMLP."""
    builds = {
        "ColumnParallelLinear": lambda **kw: fused_tp.ColumnParallelLinear(in_features, out_features, bias, **kw),
        "RowParallelLinear": lambda **kw: fused_tp.RowParallelLinear(in_features, out_features, bias, **kw),
        "ParallelMLP": lambda **kw: fused_tp.ParallelMLP(in_features, out_features, bias=bias, **kw),
        "ParallelMLP swiglu": lambda **kw: fused_tp.ParallelMLP(
            in_features, out_features, bias=bias, activation="swiglu", **kw
        ),
    }
    out = {}
    for name, build in builds.items():
        torch.manual_seed(seed)
        layer = build(dtype=dtype)
        out[name] = ([_cpu(p) for p in layer.parameters()], repr(layer))
        empty = build(dtype=dtype, device="meta").to_empty(device="cpu")
        before = [id(p) for p in empty.parameters()]
        torch.manual_seed(seed)
        empty.reset_parameters()
        assert [id(p) for p in empty.parameters()] == before  # in place: an optimizer built before still holds them
        out[name + " reset"] = [_cpu(p) for p in empty.parameters()]
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
    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    results["all_reduce after the errors"] = t.item()
    return results


def guarded_calls(device, in_features, out_features):
    """Calls that are valid on each rank alone but not as one collective call, and bad arguments on some ranks,
    under the rank guard. {case: (error type, message) or None}, and whether the group still works after."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    col = fused_tp.ColumnParallelLinear(in_features, out_features, device=device)
    row = fused_tp.RowParallelLinear(out_features, in_features, device=device)
    row_full = fused_tp.RowParallelLinear(out_features, in_features, input_is_parallel=False, device=device)
    x = torch.randn(4, in_features, device=device)
    cases = {
        "agree": lambda: row(col(x)).sum().backward(),
        "tokens differ": lambda: row(col(x[: 2 + rank])),
        "input needs grad on rank 0 only": lambda: col(x.clone().requires_grad_(rank == 0)),
        "bad width on the last rank": lambda: col(x[:, : in_features - (rank == dist.get_world_size() - 1)]),
        "bad width on every rank": lambda: col(x[:, :-1]),
        "full input of the wrong width on rank 0": lambda: row_full(
            torch.randn(3, out_features + (rank == 0), device=device)
        ),
        "no grad on rank 1 only": lambda: _maybe_no_grad(rank == 1, lambda: col(x.requires_grad_())),
    }
    out = {}
    with fused_tp.check_ranks():
        for name, call in cases.items():
            try:
                call()
                out[name] = None
            except Exception as e:
                out[name] = (type(e).__name__, str(e))
    # Without the guard, the agreeing call gives the same result bitwise (the guard changes no math).
    with fused_tp.check_ranks():
        guarded = row(col(x))
    with fused_tp.check_ranks(False):
        plain = row(col(x))
    out["guard changes nothing"] = torch.equal(guarded, plain)
    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    out["all_reduce after"] = t.item()
    return out


def _maybe_no_grad(off, fn):
    with torch.set_grad_enabled(not off):
        return fn()


def faulty_step(rank, world_size, init_method, device, timeout_s, fault, backend, results):
    """A rank process of tests/test_faults.py: one Column -> Row step in which the last rank fails.

    fault "dies": the last rank exits (as a killed or crashed process does) between its forward's two layers;
          "stalls": it sleeps there instead, as a rank stuck in a long stall or a deadlock does;
          "bad argument": it calls the row layer with an input of the wrong width (guard off), which raises on that
          rank alone, before the all-reduce; the rank then stays alive, as a job that caught the error would.
    backend "gloo" (ranks share the device) or "nccl" (rank r on GPU r).
    Each other rank puts (rank, "entered", wall-clock time) as it enters the row layer, then (rank, error type,
    message, seconds from entering to the error), unless NCCL's watchdog ends the process first (torch's default
    TORCH_NCCL_ASYNC_ERROR_HANDLING aborts it after the timeout). With "bad argument", the last rank puts its own
    error too.
    """
    import os
    import time
    from datetime import timedelta

    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        # torch 2.11's watchdog catches the timeout, then gets stuck dumping debug info; its heartbeat monitor ends
        # the process after this many seconds (default 480). README's fault table says what a user sets.
        os.environ.setdefault("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", "5")
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    col = fused_tp.ColumnParallelLinear(8, 16, device=device)
    row = fused_tp.RowParallelLinear(16, 8, device=device)
    h = col(torch.randn(4, 8, device=device))
    dist.barrier()  # every rank is alive and in step up to here
    if backend == "nccl":
        torch.cuda.synchronize()
    if rank == world_size - 1:
        if fault == "dies":
            os._exit(3)
        if fault == "bad argument":
            try:
                row(h[:, :-1])
            except ValueError as e:
                results.put((rank, type(e).__name__, str(e), 0.0))
        time.sleep(10 * timeout_s)
    results.put((rank, "entered", time.time()))
    start = time.monotonic()
    try:
        row(h)  # the row layer's all-reduce waits for the last rank
        if backend == "nccl":
            torch.cuda.synchronize()  # NCCL's all-reduce returns once enqueued; the wait is on the device
        results.put((rank, None, "returned", time.monotonic() - start))
    except Exception as e:
        results.put((rank, type(e).__name__, str(e), time.monotonic() - start))


def forget_autotuning():
    """Clear both halves of what run-time autotuning remembers in a process, the configs it chose and the layer
    calls it has tuned: with only the first cleared, a layer call seen in an earlier test is no tuning call, and
    every rank would time and choose alone."""
    from fused_tp import autograd
    from fused_tp.kernels import autotune

    autotune.autotuned.clear()
    autograd._tuned_calls.clear()


def autotuned_steps(device, hidden, ffns, steps, dtype):
    """Steps of one Column -> GELU -> Row MLP per hidden width in `ffns` (the same input each), with
    FUSED_TP_AUTOTUNE=1 and a fake timer under which rank 0 prefers the first candidate of SPACE and every other
    rank the last, so that wherever a launch has two candidates or more the ranks would choose
    differently on their own. Returns, for each launch key, the config this rank ran, the one it would have chosen
    alone, and how many candidates it had; the timer's call count per step; and the steps' outputs (replicated
    ones must match bitwise)."""
    import os

    from fused_tp.kernels import autotune, configs, jit

    rank, calls = dist.get_rank(), []

    def score(cfg):
        index = configs.SPACE.index(cfg)
        return 1.0 + (index if rank == 0 else len(configs.SPACE) - index)  # >= 5% apart: past choose's 3% margin

    def timer(fn):
        calls[-1] += 1
        return score(configs.pinned_config())

    saved_timer, os.environ["FUSED_TP_AUTOTUNE"] = autotune.timer, "1"
    configs.read_environment()
    autotune.timer = timer
    forget_autotuning()
    try:
        torch.manual_seed(0)
        mlps = [
            (
                fused_tp.ColumnParallelLinear(hidden, ffn, device=device, dtype=dtype),
                fused_tp.RowParallelLinear(ffn, hidden, device=device, dtype=dtype),
            )
            for ffn in ffns
        ]
        x = torch.randn(5, hidden, device=device, dtype=dtype, requires_grad=True)
        outs = []
        for _ in range(steps):
            calls.append(0)
            for col, row in mlps:
                x.grad = None
                y = row(F.gelu(col(x)))
                y.backward(torch.ones_like(y))
                outs.append((_cpu(y), _cpu(x.grad)))
        chosen = {}
        for key, cfg in autotune.autotuned.items():
            _, _, product, key_dtype, _, tma, aux_tile, M, N, K = key
            cands = [
                c
                for c in configs.candidates(M, N, K, key_dtype, tma)
                if configs.fits(c, key_dtype.itemsize, tma, aux_tile)
            ]
            rule = configs.rule_config(M, key_dtype, jit.INTERPRETED, tma)
            alone = autotune.choose(cands, [score(c) for c in cands], rule) if M and N else None
            chosen[f"{product} {(M, N, K)}"] = {"ran": cfg, "alone": alone, "candidates": len(cands)}
    finally:
        autotune.timer = saved_timer
        del os.environ["FUSED_TP_AUTOTUNE"]
        configs.read_environment()
        forget_autotuning()
    return {"chosen": chosen, "timer_calls": calls, "outs": outs}


def subgroup_calls(device):
    """The guard and autotuning's broadcast on a process group of the last two ranks (not the default group):
    ranks that disagree raise, and an agreeing autotuned call runs; the other ranks are not in the group."""
    import os

    from fused_tp.kernels import autotune, configs

    world, rank = dist.get_world_size(), dist.get_rank()
    members = [world - 2, world - 1]
    group = dist.new_group(members)  # every rank of the world makes the group, as torch requires
    if rank not in members:
        return "not in the group"
    torch.manual_seed(0)
    col = fused_tp.ColumnParallelLinear(6, 5, process_group=group, device=device)
    x = torch.randn(4, 6, device=device)
    out = {}
    with fused_tp.check_ranks():
        try:
            col(x[: 2 + members.index(rank)])
            out["tokens differ"] = None
        except fused_tp.RankMismatchError as e:
            out["tokens differ"] = str(e).splitlines()[0]
    os.environ["FUSED_TP_AUTOTUNE"] = "1"
    configs.read_environment()
    forget_autotuning()
    try:
        y = col(x.requires_grad_())
        y.sum().backward()
        out["autotuned"] = (_cpu(y), _cpu(x.grad), sorted(str(c) for c in autotune.autotuned.values()))
    finally:
        del os.environ["FUSED_TP_AUTOTUNE"]
        configs.read_environment()
        forget_autotuning()
    return out


def parallel_model_step(family, device, bound, sequence_parallel=False):
    """A tiny random-weight Hugging Face causal LM of `family` ("llama", "mistral", "qwen2", "qwen3"), dense and through
    fused_tp.parallelize on this rank (with `sequence_parallel`, its regions between the parallel ones on each
    rank's share of the sequence), on the same ids: the largest ratio of each compared quantity's norm-wise error
    to `bound` (logits, and every parameter's gradient against its slice of the dense gradient, sliced here by
    whole heads and gate/up pairs, not by fused_tp's code), and whether greedy generate() gave the same tokens."""
    _, _, dense = _tiny_model(family, device)
    model = fused_tp.parallelize(copy.deepcopy(dense), sequence_parallel=sequence_parallel)
    world, rank = dist.get_world_size(), dist.get_rank()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1)).to(device)
    seen = []  # the sequence lengths the first MLP and the first attention module take in
    model.model.layers[0].mlp.register_forward_pre_hook(lambda m, args: seen.append(("mlp", args[0].shape[1])))
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(("attention", kwargs["hidden_states"].shape[1])), with_kwargs=True
    )
    logits = {}
    for m in (dense, model):
        out = m(ids).logits
        weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
        (out * weights).sum().backward()
        logits[m is model] = out.detach()

    heads, kv_heads, d = 4, 2, 32 // 4
    a, b = [(int(t[0]), int(t[-1]) + 1) for t in torch.tensor_split(torch.arange(heads), world)][rank]
    kv = sorted({h // (heads // kv_heads) for h in range(a, b)})
    dense_grads = {n: p.grad for n, p in dense.named_parameters()}

    def rows(g, start, stop, unit):  # rows [start, stop) of units
        return g[start * unit : stop * unit]

    def expected(name):
        stem, _, leaf = name.rpartition(".")
        prefix = stem.rpartition(".")[0]
        if stem.endswith("q_proj"):
            return rows(dense_grads[name], a, b, d)
        if stem.endswith(("k_proj", "v_proj")):
            return rows(dense_grads[name], kv[0], kv[-1] + 1, d)
        if stem.endswith("o_proj"):
            return dense_grads[name][:, a * d : b * d] if leaf == "weight" else dense_grads[name]
        if stem.endswith("mlp.fc1"):
            gate, up = dense_grads[f"{prefix}.gate_proj.{leaf}"], dense_grads[f"{prefix}.up_proj.{leaf}"]
            g = torch.stack((gate, up), 1).flatten(0, 1)  # interleaved (gate, up) rows
            f_a, f_b = [(int(t[0]), int(t[-1]) + 1) for t in torch.tensor_split(torch.arange(40), world)][rank]
            return rows(g, f_a, f_b, 2)
        if stem.endswith("mlp.fc2"):
            g = dense_grads[f"{prefix}.down_proj.{leaf}"]
            f_a, f_b = [(int(t[0]), int(t[-1]) + 1) for t in torch.tensor_split(torch.arange(40), world)][rank]
            return g[:, f_a:f_b] if leaf == "weight" else g
        return dense_grads[name]

    def ratio(got, want):
        return ((got.double() - want.double()).norm() / (bound * want.double().norm())).item()

    out = {"logits": ratio(logits[True], logits[False]), "lengths": seen[:2]}
    for name, p in model.named_parameters():
        out[name] = ratio(p.grad, expected(name))
    with torch.no_grad():
        prompt = ids[:1, :4]
        out["generate"] = torch.equal(
            model.generate(prompt, max_new_tokens=3, do_sample=False),
            dense.generate(prompt, max_new_tokens=3, do_sample=False),
        )
    return out


def deepcopied_model_step():
    """A tiny Llama through parallelize(sequence_parallel=True) on a process group of its own, and copy.deepcopy of it
    (an EMA or reference model's way): whether the copy holds the same group, which names' gradients of the copy
    differ from the original's on the same ids (the norms' and shared key/value heads' sums run in hooks that the
    copy must re-register on its own parameters), which of the original's changed during the copy's step, and the
    error torch.save of the whole model raises."""
    _, _, dense = _tiny_model()
    group = dist.new_group(list(range(dist.get_world_size())))
    model = fused_tp.parallelize(dense, process_group=group, sequence_parallel=True)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    model(ids).logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    twin(ids).logits.square().mean().backward()
    try:
        torch.save(model, io.BytesIO())
        saved = "saved"
    except TypeError as e:
        saved = str(e)
    return (
        twin.model.layers[0].mlp.fc1.process_group is group,
        [n for n, p in twin.named_parameters() if not torch.equal(p.grad, grads[n])],
        [n for n, p in model.named_parameters() if not torch.equal(p.grad, grads[n])],
        saved,
    )


def checkpointed_model_step():
    """A tiny Llama through parallelize(sequence_parallel=True), once as is and once with Hugging Face's activation
    checkpointing (both of torch.utils.checkpoint's forms), in training mode on the same ids: per form, whether the
    logits are the same bits, and the names whose gradients are not (the recomputed forward runs the layers' and the
    hooks' collectives again, in the same order on every rank)."""
    _, _, dense = _tiny_model()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    plain = fused_tp.parallelize(copy.deepcopy(dense), sequence_parallel=True).train()
    want = plain(ids).logits
    want.square().mean().backward()
    out = {}
    for reentrant in (False, True):
        model = fused_tp.parallelize(copy.deepcopy(dense), sequence_parallel=True).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        logits = model(ids).logits
        logits.square().mean().backward()
        out[reentrant] = (
            torch.equal(logits, want),
            [
                n
                for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters())
                if not torch.equal(p.grad, q.grad)
            ],
        )
    return out


def compiled_sequence_parallel_model():
    """The tiny Llama through parallelize(sequence_parallel=True), compiled whole (fullgraph, aot_eager) on 8 tokens
    (even shares): whether its logits and every parameter's gradient are eager's, bit for bit."""
    _, _, dense = _tiny_model()
    model = fused_tp.parallelize(copy.deepcopy(dense), sequence_parallel=True)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    results = []
    for run in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        logits = run(ids).logits
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (eager, eager_grads), (compiled, compiled_grads) = results
    return torch.equal(eager, compiled), [n for n, g in eager_grads.items() if not torch.equal(g, compiled_grads[n])]


def sequence_parallel_2d():
    """A tiny Qwen3 through parallelize(sequence_parallel=True) over mesh["tp"] of a 2 x 2 mesh, each decoder layer and
    the model then sharded by FSDP2 over mesh["dp"], one batch row a data-parallel rank: the logits' norm-wise error
    against the dense model's on that row, and, of every parameter that every TP rank holds whole (norms, per-head
    query and key norms, embeddings, the LM head), the largest norm-wise error of its gradient (FSDP2's mean over
    the batch rows, gathered) against the dense model's on the whole batch. Those gradients are summed over the TP
    ranks by hooks that FSDP2's parameter swap would leave behind."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    _, _, dense = _tiny_model("qwen3")
    model = fused_tp.parallelize(copy.deepcopy(dense), process_group=mesh["tp"], sequence_parallel=True)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    row = mesh["dp"].get_local_rank()
    logits = model(ids[row : row + 1]).logits
    logits.square().mean().backward()
    dense(ids).logits.square().mean().backward()
    want = dense(ids).logits[row : row + 1].detach()
    dense_grads = dict(dense.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        if "_proj." in name or ".mlp." in name:  # the sharded projections
            continue
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        ref = dense_grads[name].grad
        worst = max(worst, ((grad - ref).norm() / ref.norm()).item())
    return ((logits.detach() - want).norm() / want.norm()).item(), worst


def _tiny_model(family="llama", device=None):
    """(config, model class, a tiny random-weight causal LM of `family` ("llama", "mistral", "qwen2", "qwen3")
    built under seed 0): 4 query heads in 2 groups of width 8, an intermediate width of 40."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[family]
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        head_dim=8,  # (Qwen3's config does not derive it)
    )
    return config, model_cls, model_cls(config).to(device)


def checkpoint_save(path):
    """parallelize the tiny Llama, gather its dense state dict (every rank), rank 0 writes it to `path`
    (safetensors). Returns whether the gathered dict is the dense model's, bit for bit, name for name."""
    from safetensors.torch import save_file

    _, _, dense = _tiny_model()
    model = fused_tp.parallelize(copy.deepcopy(dense))
    gathered = fused_tp.checkpoint.dense_state_dict(model)
    want = dense.state_dict()
    same = set(gathered) == set(want) and all(torch.equal(gathered[k], want[k]) for k in want)
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in gathered.items()}, path)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    # DCP's default planner, from the layers' state dicts (PlacedShard) alone; async_save's staged copies; DCP's
    # own state dict API; and SavePlanner, for state dicts of plain tensors
    dcp.save(model.state_dict(), checkpoint_id=path + ".dcp")
    dcp.async_save(model.state_dict(), checkpoint_id=path + ".async.dcp").result()
    dcp.save(get_model_state_dict(model), checkpoint_id=path + ".dsd.dcp")
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    dcp.save(plain, checkpoint_id=path + ".planner.dcp", planner=fused_tp.checkpoint.SavePlanner(model))
    dist.barrier()
    return same


def checkpoint_load(path):
    """A tiny Llama built on the meta device, parallelized, loaded from the dense safetensors file at `path` (each
    rank reading its slices): whether gathered back it is the file bit for bit, whether no parameter was left on
    the meta device, and its logits' norm-wise error against the dense model's; and whether a parallelized model
    of other weights, loaded through DCP from each checkpoint checkpoint_save wrote beside `path` (at another TP
    size), gathers back to the file bit for bit, and DCP's default load planner refuses the shards."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.api import CheckpointException

    config, model_cls, dense = _tiny_model()
    with torch.device("meta"):
        model = model_cls(config)
    fused_tp.parallelize(model)
    fused_tp.checkpoint.load_dense_state_dict(model, path)
    # a buffer no checkpoint holds (the rotary frequencies): rebuilt, as after any meta-device build
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    want = load_file(path)
    gathered = fused_tp.checkpoint.dense_state_dict(model)
    same = set(gathered) == set(want) and all(torch.equal(gathered[k], want[k]) for k in want)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, ref = model(ids).logits, dense(ids).logits
    dcp_same = []
    for saved in (".dcp", ".async.dcp", ".dsd.dcp", ".planner.dcp"):
        torch.manual_seed(5)  # other weights, replaced by the load
        other = fused_tp.parallelize(model_cls(config))
        sd = other.state_dict()
        dcp.load(sd, checkpoint_id=path + saved, planner=fused_tp.checkpoint.LoadPlanner(other))
        other.load_state_dict(sd)
        loaded = fused_tp.checkpoint.dense_state_dict(other)
        dcp_same.append(set(loaded) == set(want) and all(torch.equal(loaded[k], want[k]) for k in want))
    # without LoadPlanner, DCP's default planner refuses a shard: its size is not the dense tensor's
    try:
        dcp.load(other.state_dict(), checkpoint_id=path + ".dcp")
        refused = dist.get_world_size() == 1  # at TP = 1 every shard is its whole dense tensor
    except CheckpointException as e:  # the ranks' errors gathered (not an Exception: a BaseException)
        refused = "Size mismatch" in str(e)
    return same and all(dcp_same) and refused, on_meta, ((got - ref).norm() / ref.norm()).item()


def checkpoint_2d(path, activation):
    """A ParallelMLP tensor-parallel over mesh["tp"] of a 2 x 2 mesh and sharded again by FSDP2 over mesh["dp"],
    saved through DCP three ways (dcp.save and dcp.async_save of its state dict, whose DTensors hold PlacedShards;
    a copy of plain DTensors with SavePlanner), each loaded with LoadPlanner into the MLP at TP 4 and into the 2-D
    MLP of other weights. Returns, per way, whether the TP 4 model gathers to the dense MLP bit for bit and whether
    the 2-D one holds the saved one's tensors bit for bit; whether DCP's default load planner refused; and whether
    an Adam's states (place_optimizer_state), saved with the model through DCP's get_state_dict, load into the
    other 2-D MLP's Adam bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    hidden = 12 if activation == "swiglu" else 6  # fc1's rows: (gate, up) pairs for SwiGLU

    def mlp(seed, group=None):
        torch.manual_seed(seed)
        fc1, fc2 = nn.Linear(8, 2 * hidden if activation == "swiglu" else hidden), nn.Linear(hidden, 8)
        model = fused_tp.ParallelMLP.from_linears(fc1, fc2, activation=activation, process_group=group)
        if group is not None:
            fully_shard(model, mesh=mesh["dp"])
        return model

    model = mlp(0, mesh["tp"])
    want = fused_tp.checkpoint.dense_state_dict(mlp(0))  # TP 4 over the world, gathered: the dense MLP
    sd = model.state_dict()
    dcp.save(sd, checkpoint_id=path + ".dcp")
    dcp.async_save(sd, checkpoint_id=path + ".async.dcp").result()
    plain = {k: v.detach().clone() for k, v in sd.items()}  # DTensors around plain tensors: no place
    dcp.save(plain, checkpoint_id=path + ".planner.dcp", planner=fused_tp.checkpoint.SavePlanner(model))
    dist.barrier()
    out = {}
    for saved in (".dcp", ".async.dcp", ".planner.dcp"):
        tp4 = mlp(dist.get_rank() + 9)
        sd4 = tp4.state_dict()
        dcp.load(sd4, checkpoint_id=path + saved, planner=fused_tp.checkpoint.LoadPlanner(tp4))
        tp4.load_state_dict(sd4)
        got = fused_tp.checkpoint.dense_state_dict(tp4)
        other = mlp(dist.get_rank() + 19, mesh["tp"])
        sd2 = other.state_dict()
        dcp.load(sd2, checkpoint_id=path + saved, planner=fused_tp.checkpoint.LoadPlanner(other))
        other.load_state_dict(sd2)
        same_2d = all(
            torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(other.state_dict().values(), sd.values())
        )
        out[saved] = (set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), same_2d)
    try:
        dcp.load(other.state_dict(), checkpoint_id=path + ".dcp")
        out["refused"] = False
    except CheckpointException as e:
        out["refused"] = "Size mismatch" in str(e)
    # an Adam over each 2-D MLP, its states (FSDP2's DTensors) placed: a step, saved, loaded into the other's
    adams = []
    for m in (model, other):
        adams.append(torch.optim.Adam(m.parameters(), lr=0.01))
        fused_tp.checkpoint.place_optimizer_state(adams[-1], m)
    model(torch.randn(4, 8, generator=torch.Generator().manual_seed(3))).square().sum().backward()
    adams[0].step()
    dcp.save(dict(zip(("model", "optim"), get_state_dict(model, adams[0]))), checkpoint_id=path + ".optim.dcp")
    sd = dict(zip(("model", "optim"), get_state_dict(other, adams[1])))
    dcp.load(sd, checkpoint_id=path + ".optim.dcp", planner=fused_tp.checkpoint.LoadPlanner())
    set_state_dict(other, adams[1], model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    out["optimizer"] = all(
        torch.equal(adams[0].state[p][k].full_tensor(), adams[1].state[q][k].full_tensor())
        for p, q in zip(model.parameters(), other.parameters(), strict=True)
        for k in ("exp_avg", "exp_avg_sq")
    )
    return out


def _mlp_and_adam(seed):
    """A GELU ParallelMLP (8 -> 10 -> 8: hidden shards 5/5 at 2 ranks, 4/3/3 at 3) sharded from dense layers drawn
    under `seed`, and an Adam over it whose states of shards are placed (checkpoint.place_optimizer_state)."""
    torch.manual_seed(seed)
    model = fused_tp.ParallelMLP.from_linears(nn.Linear(8, 10), nn.Linear(10, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    fused_tp.checkpoint.place_optimizer_state(optimizer, model)
    return model, optimizer


def _dense_adam_states(model, optimizer):
    """{Adam state: the dense MLP's state dict of it}: each shard's state gathered as the shard itself is (a twin
    of the model holding the states as its parameters), and the step count."""
    out = {}
    for stat in ("exp_avg", "exp_avg_sq"):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                q.copy_(optimizer.state[p][stat])
        out[stat] = fused_tp.checkpoint.dense_state_dict(twin)
    out["step"] = {str(i): optimizer.state[p]["step"] for i, p in enumerate(model.parameters())}
    return out


def optimizer_checkpoint_save(path):
    """Two Adam steps of the MLP, then dcp.save of DCP's own state dicts of it and its Adam (get_state_dict); rank 0
    writes the dense states (gathered) to `path`.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = _mlp_and_adam(0)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        model(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    dense = _dense_adam_states(model, optimizer)
    if dist.get_rank() == 0:
        torch.save(dense, path + ".pt")
    dist.barrier()


def optimizer_checkpoint_load(path):
    """An MLP of other weights and its fresh Adam, loaded from the DCP checkpoint at `path` (LoadPlanner, then DCP's
    set_state_dict). Returns whether its dense states are the saved ones bit for bit, whether the optimizer holds
    plain tensors, and whether DCP's default load planner refused the states of shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict, set_state_dict

    model, optimizer = _mlp_and_adam(dist.get_rank() + 7)
    model_sd, optim_sd = get_state_dict(model, optimizer)  # creates Adam's states
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=path, planner=fused_tp.checkpoint.LoadPlanner())
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    got, want = _dense_adam_states(model, optimizer), torch.load(path + ".pt")
    same = all(torch.equal(got[s][k], v) for s in want for k, v in want[s].items())
    plain = all(type(v) is torch.Tensor for state in optimizer.state.values() for v in state.values())
    try:
        dcp.load({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=path)
        refused = False
    except CheckpointException as e:
        refused = "Size mismatch" in str(e)
    return same, plain, refused


def pretrained_round_trip(directory):
    """parallelize the tiny Llama; its own save_pretrained refuses; fused_tp.checkpoint.save_pretrained writes the
    dense checkpoint, sharded over several files (a small max_shard_size), which from_pretrained loads as the dense
    model, and load_dense_state_dict loads into a parallelized meta-device model from the directory and from its
    index file, each bit for bit. Returns (refusal message, the checkpoint's .safetensors files, whether each load
    is the dense model: from_pretrained's, the directory's, the index file's)."""
    import os

    config, model_cls, dense = _tiny_model()
    model = fused_tp.parallelize(copy.deepcopy(dense))
    try:
        model.save_pretrained(directory)
        refusal = None
    except RuntimeError as e:
        refusal = str(e)
    fused_tp.checkpoint.save_pretrained(model, directory, max_shard_size="20KB")
    want = dense.state_dict()
    loaded = [model_cls.from_pretrained(directory).state_dict()]
    for source in (directory, os.path.join(directory, fused_tp.checkpoint.INDEX)):
        with torch.device("meta"):
            meta = fused_tp.parallelize(model_cls(config))
        fused_tp.checkpoint.load_dense_state_dict(meta, source)
        loaded.append(fused_tp.checkpoint.dense_state_dict(meta))
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    return refusal, files, [set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want) for got in loaded]


def mesh_calls(device):
    """The layers on a 1-D DeviceMesh give the bits they give on its process group; a 2-D mesh is refused, naming
    process_group, and its named dim mesh["tp"] works. Returns (bitwise equal, the refusal, (R, r) on mesh["tp"],
    whether gather_output over mesh["tp"] is the dense output)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    dense = nn.Linear(12, 10).to(device)
    x = torch.randn(3, 12, device=device)
    outs = [
        fused_tp.ColumnParallelLinear.from_linear(dense, process_group=g, gather_output=True)(x)
        for g in (mesh, mesh.get_group())
    ]
    equal = torch.equal(*outs)
    refusal = sub = matches = None
    if world % 2 == 0:
        mesh2 = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        try:
            fused_tp.ColumnParallelLinear.from_linear(dense, process_group=mesh2)
        except ValueError as e:
            refusal = str(e)
        layer = fused_tp.ColumnParallelLinear.from_linear(dense, process_group=mesh2["tp"], gather_output=True)
        sub = (layer.world_size, layer.rank)
        y = layer(x)
        matches = ((y - dense(x)).norm() / dense(x).norm()).item() < 1e-5
    return equal, refusal, sub, matches


def clipped_step(kind, dense, norm, x, grad_y, activation, norm_type, max_norm):
    """A LayerNorm (replicated: `norm`'s (weight, bias)) before the layers of layers_step's `kind`, one step, then
    fused_tp.clip_grad_norm_: the total it returns, the norm's clipped gradients, and each layer's clipped shard
    gradients."""
    forward, layers = _stack(kind, [dense_linear(w, b, "cpu") for w, b in dense], activation)
    norm_layer = layer_norm(*norm)
    model = nn.Sequential(norm_layer, forward)
    model(x).backward(grad_y)
    total = fused_tp.clip_grad_norm_(model, max_norm, norm_type)
    out = {"total": total, "norm_w": norm_layer.weight.grad, "norm_b": norm_layer.bias.grad}
    for i, layer in enumerate(layers):
        out[f"grad_w{i}"], out[f"grad_b{i}"] = layer.weight.grad, layer.bias.grad
    return out


def sequence_parallel_norm_step(dense, norm, x, grad_y):
    """A LayerNorm (`norm`'s (weight, bias)) before a sequence-parallel ParallelMLP of the dense (weight, bias)
    pairs, the norm's parameters given to fused_tp.sequence_parallel_grads (twice: the second call must add
    nothing); this rank's share of x's sequence (dim 0), one step: the norm's gradients."""
    norm_layer = layer_norm(*norm)
    for _ in range(2):
        fused_tp.sequence_parallel_grads(norm_layer)
    linears = [dense_linear(w, b, "cpu") for w, b in dense]
    model = nn.Sequential(norm_layer, fused_tp.ParallelMLP.from_linears(*linears, sequence_parallel=True))
    rows = torch.tensor_split(torch.arange(x.shape[0]), dist.get_world_size())[dist.get_rank()]
    model(x[rows]).backward(grad_y[rows])
    return norm_layer.weight.grad, norm_layer.bias.grad


def clipped_llama_total(norm_type):
    """The tiny Llama through parallelize on this rank (shared key/value heads at 3 and 4 ranks), one step: the
    total fused_tp.clip_grad_norm_ returns, and torch's clip_grad_norm_ total of the dense model on the same step."""
    _, _, dense = _tiny_model("llama")
    model = fused_tp.parallelize(copy.deepcopy(dense))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    for m in (dense, model):
        out = m(ids).logits
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return fused_tp.clip_grad_norm_(model, 1e-3, norm_type), torch.nn.utils.clip_grad_norm_(
        dense.parameters(), 1e-3, norm_type
    )


def dp_tp_step(kind, dense, x, grad_y, activation, data_parallel):
    """2-D parallelism on the CPU: the layers of layers_step's `kind` tensor-parallel over mesh["tp"] of a
    (world / 2) x 2 mesh and data-parallel over mesh["dp"], which splits the batch (dim 0 of x and grad_y):
    data_parallel "fsdp2" shards each layer again with FSDP2's fully_shard, "ddp" wraps the model in
    DistributedDataParallel. Returns this rank's y rows and, per layer, its tensor-parallel shards' gradients whole
    over dp (the dp-mean of the ranks' gradients; FSDP's shards of it gathered)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    linears = [dense_linear(w, b, "cpu") for w, b in dense]
    tp = mesh["tp"]
    if kind == "mlp":
        layers = [fused_tp.ColumnParallelLinear.from_linear(linears[0], process_group=tp)]
        layers.append(fused_tp.RowParallelLinear.from_linear(linears[1], process_group=tp))
        model = nn.Sequential(layers[0], fused_tp.kernels.ACTIVATIONS[activation].module(), layers[1])
        units = layers
    else:
        model = nn.Sequential(fused_tp.ParallelMLP.from_linears(*linears, activation=activation, process_group=tp))
        layers = [model[0].fc1, model[0].fc2]
        units = [model[0]]  # whole: its forward reads fc1's and fc2's parameters without calling them
    if data_parallel == "fsdp2":
        for unit in (*units, model):
            fully_shard(unit, mesh=mesh["dp"])
    else:
        model = DistributedDataParallel(model, process_group=mesh["dp"].get_group())
    rows = torch.tensor_split(torch.arange(x.shape[0]), world // 2)[mesh["dp"].get_local_rank()]
    y = model(x[rows])
    y.backward(grad_y[rows])
    out = {"rows": rows, "y": _cpu(y)}
    out["clip"] = None
    if data_parallel == "fsdp2":  # fused_tp's clip takes plain gradients only: FSDP2's DTensor ones are refused
        try:
            fused_tp.clip_grad_norm_(model, 1e9)
        except ValueError as e:
            out["clip"] = str(e)
    whole = (lambda g: g.full_tensor()) if data_parallel == "fsdp2" else (lambda g: g)  # noqa: E731
    for i, layer in enumerate(layers):
        out[f"grad_w{i}"] = _cpu(whole(layer.weight.grad))
        if layer.bias is not None:
            out[f"grad_b{i}"] = _cpu(whole(layer.bias.grad))
    return out


def sequence_parallel_step(kind, device, dense, x, grad_y, activation, seq_dim):
    """Column -> activation -> Row with sequence parallelism ("mlp": three modules; "parallel_mlp": ParallelMLP),
    on this rank's share of the sequence of x and grad_y (torch.tensor_split along seq_dim). Returns this rank's
    output and input gradient, and each layer's shards and their gradients, as layers_step does, and whether
    forward saved the gathered input (it should save this rank's share and gather again in backward), and how many
    elements of activations (saved tensors other than the layers' parameters, each storage once) it saved."""
    world, rank = dist.get_world_size(), dist.get_rank()
    linears = [dense_linear(w, b, device) for w, b in dense]
    options = dict(sequence_parallel=True, sequence_dim=seq_dim)
    if kind == "mlp":
        layers = [
            fused_tp.ColumnParallelLinear.from_linear(linears[0], **options),
            fused_tp.RowParallelLinear.from_linear(linears[1], **options),
        ]
        forward = nn.Sequential(layers[0], fused_tp.kernels.ACTIVATIONS[activation].module(), layers[1])
    else:
        forward = fused_tp.ParallelMLP.from_linears(*linears, activation=activation, **options)
        layers = [forward.fc1, forward.fc2]
    x_r = torch.tensor_split(x, world, seq_dim)[rank].to(device).requires_grad_()
    params = {p.data_ptr() for p in forward.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = forward(x_r)
    y.backward(torch.tensor_split(grad_y, world, seq_dim)[rank].to(device))
    full = x.to(device)
    out = {
        "y": _cpu(y),
        "grad_x": _cpu(x_r.grad),
        # (where this rank's share is the whole sequence, saving it is saving the share)
        "saved_the_sequence": x_r.shape != full.shape
        and any(t.shape == full.shape and torch.equal(t, full) for t in saved),
        "saved_activations": sum({t.data_ptr(): t.numel() for t in saved if t.data_ptr() not in params}.values()),
    }
    for i, layer in enumerate(layers):
        out[f"w{i}"], out[f"grad_w{i}"] = _cpu(layer.weight), _cpu(layer.weight.grad)
        if layer.bias is not None:
            out[f"b{i}"], out[f"grad_b{i}"] = _cpu(layer.bias), _cpu(layer.bias.grad)
    return out


def row_bias_launches(device):
    """path_counts["row_sum"] (bias gradients written by a weight gradient's launch) over the backward of a
    few-token step on this rank of the group, for a RowParallelLinear, its sequence-parallel form and a
    sequence-parallel ParallelMLP, whose row parts get world size 1 from their callers: on every rank a row layer's
    replicated bias takes its gradient from the column-sum kernel, so only ParallelMLP's fc1 (a column layer) may
    count one. Uneven shards: each rank's weight gradient is of its own width."""
    world = dist.get_world_size()
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(16, 3 * world + 1).to(device), nn.Linear(3 * world + 1, 16).to(device)
    seq = dict(sequence_parallel=True)
    tokens = 4 * world
    row, seq_row = fused_tp.RowParallelLinear.from_linear(fc2), fused_tp.RowParallelLinear.from_linear(fc2, **seq)
    cases = {
        "row": (row, (tokens, row.weight.shape[1])),
        "sequence-parallel row": (seq_row, (tokens, seq_row.weight.shape[1])),
        "sequence-parallel ParallelMLP": (fused_tp.ParallelMLP.from_linears(fc1, fc2, **seq), (4, 16)),
    }
    counts = {}
    for name, (layer, shape) in cases.items():
        y = layer(torch.randn(shape, device=device, requires_grad=True))
        before = fused_tp.path_counts.copy()
        y.backward(torch.randn_like(y))
        counts[name] = (fused_tp.path_counts - before)["row_sum"]
    return counts


def sequence_parallel_bad_calls(device):
    """(the error each rank raised) for a sequence shard of the wrong length on rank 0, then a sequence dim the
    input does not have; the group still works after both."""
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    layer = fused_tp.ColumnParallelLinear(8, 6, sequence_parallel=True).to(device)
    errors = []
    for x in (torch.randn(3 + (rank == 0) * 2, 8, device=device), torch.randn(8, device=device)):
        try:
            layer(x)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    ok = torch.ones(1)
    dist.all_reduce(ok)
    return errors, ok.item() == world


def sequence_parallel_against_dtensor(device, seed):
    """The same dense MLP (Linear -> GELU -> Linear) sharded by fused_tp with sequence_parallel=True and by DTensor's
    ColwiseParallel(input_layouts=Shard(0)) / RowwiseParallel(output_layouts=Shard(0)), on this rank's share of an
    evenly split sequence: (output, input gradient) of each. DTensor runs on the CPU: on one GPU shared by gloo
    ranks, a "cuda" mesh's collectives killed every rank (H200, torch 2.11), and the reference needs no GPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12)).to(device)  # 24: even over 2, 3, 4
    x = torch.randn(4 * world, 3, 12, device=device)
    grad_y = torch.randn(4 * world, 3, 12, device=device)
    mesh = init_device_mesh("cpu", (world,))
    plan = {"0": ColwiseParallel(input_layouts=Shard(0)), "2": RowwiseParallel(output_layouts=Shard(0))}
    reference = parallelize_module(copy.deepcopy(dense).cpu(), mesh, plan)
    ours = fused_tp.ParallelMLP.from_linears(dense[0], dense[2], sequence_parallel=True, process_group=mesh)
    out = {}
    for name, model, on in (("dtensor", reference, "cpu"), ("fused_tp", ours, device)):
        x_r = x.chunk(world, 0)[rank].to(on, copy=True).requires_grad_()
        y = model(x_r)
        y.backward(grad_y.chunk(world, 0)[rank].to(on))
        # DTensor's outputs are AsyncCollectiveTensors: an op (clone) waits for their collective before they leave
        out[name] = (_cpu(y.clone()), _cpu(x_r.grad.clone()))
    return out
