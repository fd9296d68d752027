"""Autograd Functions of the tensor-parallel layers: with guard.py, the only code in fused_tp that calls
torch.distributed. Each layer call checks its arguments first; with the rank guard or run-time autotuning on a
group, or under torch.compile, through `_preflight`, which also runs the guard and opens autotuning's scope.

Under torch.compile the same Functions trace whole: the kernels run as registered operators (kernels/ops.py) and
the collectives as functional collectives (torch.ops._c10d_functional), which return new tensors where the eager
ones work in place, each waited for where the eager path waits (_traced_collective); the rank guard and run-time
autotuning stay eager-only (_preflight).

R is the size of the process group, r this rank's index in it. Shards follow torch.tensor_split(t, R, dim)[r]:
sizes need not divide evenly, the first ranks get one more. One code path serves every R; at R = 1 the
collectives are skipped, nothing else. A missing process group with torch.distributed not initialised is R = 1.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd import Function

from . import guard, kernels
from .kernels import autotune, configs, ops
from .kernels.matmul import autocast_args, linear_args_pass

SECOND_DERIVATIVE = (
    "fused_tp: a layer's backward ran with create_graph=True (a second derivative: a gradient penalty, a "
    "Hessian-vector product, MAML); it runs Triton kernels and collectives, which build no graph, so a second "
    "derivative through the layer is not supported"
)


def _first_order(backward):
    """backward, refusing create_graph (grad mode on in a backward) with SECOND_DERIVATIVE. torch's
    once_differentiable does not do here: it defers its error to a node whose inputs are detached copies, which
    torch.autograd.grad(..., inputs) prunes, so that a second derivative reaching the inputs by another path (a
    residual) silently left out the layer's terms. No check but this flag's on the first-order path (host time:
    bench/NOTES.md, attempt 58)."""

    @functools.wraps(backward)
    def run(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_DERIVATIVE)
        return backward(ctx, *grads)

    return run


_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_functorch_active = torch._C._are_functorch_transforms_active


class _LayerFunction(Function):
    """An autograd Function the layers call through _apply. `tensors`: how many of its leading arguments are
    tensors (or None), the rest not."""

    tensors = 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.c_apply = super(Function, cls).apply  # the C apply that Function.apply ends in, bound to cls


def _apply(function: type[_LayerFunction], *args):
    """function.apply(*args). Eagerly, the C apply that Function.apply's Python ends in, after what that Python does
    first for a Function without setup_context: functorch's dead wrappers (tensors that outlived the transform that
    made them) unwrapped. That Python costs each layer call host time for nothing else (bench/NOTES.md, attempt
    59). While torch.compile traces, and under functorch's transforms, Function.apply itself: dynamo traces that
    one, and functorch takes its own path there (and refuses a Function without setup_context)."""
    if torch.compiler.is_compiling() or _functorch_active():
        return function.apply(*args)
    n = function.tensors
    return function.c_apply(*[t if t is None else _unwrap_if_dead(t) for t in args[:n]], *args[n:])


def resolve_group(group):
    """The process group a layer runs on, from what it takes: None (the default group), a ProcessGroup, or a 1-D
    DeviceMesh (of a larger mesh, the named dim: mesh["tp"]). TypeError or ValueError naming process_group else."""
    if group is None or isinstance(group, dist.ProcessGroup):
        return group
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"process_group: expected a 1-D DeviceMesh (of a larger one, its dim: mesh['tp']), got "
                f"{group.ndim} dims {group.mesh_dim_names}"
            )
        return group.get_group()
    raise TypeError(f"process_group: expected None, a ProcessGroup or a 1-D DeviceMesh, got {type(group).__name__}")


def group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(R, r) of `group` (None: the default group); (1, 0) when no group is given and torch.distributed is not
    initialised. Asked of the group itself, which dist.get_world_size and dist.get_rank end up doing too, after
    checks that cost host time on every layer call (modules._check_group; bench/NOTES.md, session 19)."""
    if group is None:
        # is_initialized first: torch.compile in torch 2.11 reads dist.group.WORLD as a group where it is None
        if not dist.is_initialized():
            return 1, 0
        group = dist.group.WORLD
    return group.size(), group.rank()


class SharesGroup:
    """Under copy.deepcopy, the object's process group (the attribute `_group_attr` names) is shared, not copied,
    and everything else is copied as deepcopy would: a group is a communicator, which cannot be pickled or copied,
    and a copied model (an EMA or reference model) talks over the same ranks as one built anew would. Every
    fused_tp object that holds a group mixes it in, since deepcopy may reach any of them first. Pickling one that
    holds a group (None is the default group, which pickles as None) raises a TypeError naming process_group."""

    _group_attr = "group"

    def __deepcopy__(self, memo: dict):
        group = getattr(self, self._group_attr)
        if group is not None:
            memo.setdefault(id(group), group)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        state = copy.deepcopy(self._state(), memo)
        if hasattr(new, "__setstate__"):
            new.__setstate__(state)  # nn.Module's
        else:
            new.__dict__.update(state)
        return new

    def __getstate__(self):
        if getattr(self, self._group_attr) is not None:  # pickle's own error names neither the object nor a way out
            raise TypeError(
                "process_group: a model with fused_tp layers on a process group of their own cannot be pickled "
                "(torch.save of the whole model, multiprocessing); save its state_dict instead (docs/models.md)"
            )
        return self._state()

    def _state(self) -> dict:
        """What deepcopy and pickle take of the object: nn.Module's state (without a compiled call), else __dict__."""
        parent = getattr(super(), "__getstate__", None)  # object has none before Python 3.11
        return parent() if parent is not None else self.__dict__


def shard_range(size: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the slice that torch.tensor_split(range(size), world_size)[rank] takes."""
    base, extra = size // world_size, size % world_size  # not divmod: torch.compile traces sizes as SymInts
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shares(size: int, world_size: int) -> list[int]:
    """Every rank's length of torch.tensor_split(range(size), world_size), in rank order."""
    return [stop - start for start, stop in (shard_range(size, world_size, r) for r in range(world_size))]


def _all_reduce(t: torch.Tensor, group, world: int, async_op: bool = False):
    """The sum of t over the group: eagerly t itself, summed in place; under torch.compile a new tensor. With
    async_op, a function that waits for the sum and returns it."""
    # Shapes are replicated across ranks, so every rank skips an empty or single-rank reduce alike.
    if world == 1 or t.numel() == 0:
        return (lambda: t) if async_op else t
    if torch.compiler.is_compiling():
        wait = _traced_collective("all_reduce", t, "sum", group=group)
        return wait if async_op else wait()
    work = dist.all_reduce(t, group=group, async_op=async_op)  # the row layer's forward: blocking, no closure
    return _waiter(work, t) if async_op else t


def _waiter(work, out):
    """A function that waits for an eager collective's `work` (None: done already) and returns `out`, its result (a
    tensor, or all_gather's list)."""
    if work is None:
        return lambda: out

    def wait():
        work.wait()
        return out

    return wait


def _traced_collective(op: str, t: torch.Tensor, *args, group):
    """A collective as torch.compile traces it: the functional op torch.ops._c10d_functional.<op>(t, *args, group
    name), and a function that waits for it and returns its result. Not torch.distributed._functional_collectives'
    functions: while tracing they wait on the spot, which put each wait straight after its collective in the graph
    and so serialised grad_x's all-reduce with the weight gradient that runs beside it eagerly; the callers here
    wait where the eager path waits, and the graph keeps that order (tests/test_compile.py reads it off the eager
    backward's calls and the traced graph alike)."""
    group = dist.group.WORLD if group is None else group  # None is the default group, as in torch.distributed
    pending = getattr(torch.ops._c10d_functional, op)(t, *args, group.group_name)
    return lambda: torch.ops._c10d_functional.wait_tensor(pending)


def _all_gather_last_dim(t: torch.Tensor, group, world: int, size: int, async_op: bool = False):
    """Concatenate every rank's t [..., n_i] along the last dim, where n_i are the shard sizes of `size`. With
    async_op, a function that waits for the gather and returns it."""
    if world == 1:
        return (lambda: t) if async_op else t
    sizes = shares(size, world)
    # math.prod, not torch.Size.numel: a non-strict torch.export trace turns numel's sizes into integers, making
    # the token count a constant
    if sizes[0] == 0 or math.prod(t.shape[:-1]) == 0:  # nothing to send on any rank
        empty = t.new_empty((*t.shape[:-1], size))
        return (lambda: empty) if async_op else empty
    # all_gather wants equal, contiguous pieces: pad the short shards to the first (longest) one, trim after.
    piece = F.pad(t, (0, sizes[0] - t.shape[-1])) if t.shape[-1] < sizes[0] else t.contiguous()
    if torch.compiler.is_compiling():
        wait_stacked = _traced_collective("all_gather_into_tensor", piece.unsqueeze(0), world, group=group)
        wait = lambda: wait_stacked().unbind(0)  # noqa: E731
    else:
        pieces = [torch.empty_like(piece) for _ in range(world)]
        wait = _waiter(dist.all_gather(pieces, piece, group=group, async_op=async_op), pieces)

    def finish() -> torch.Tensor:
        return torch.cat([p[..., :n] for p, n in zip(wait(), sizes)], dim=-1)

    return finish if async_op else finish()


def sequence_sizes(length: int, dim: int, group, world: int, rank: int, device=None) -> list[int]:
    """Every rank's sequence length, from this rank's `length` (one all-gather of an integer): ValueError, the same
    on every rank, unless they are torch.tensor_split's shares of their sum, rank r the r-th. It doubles as the
    check that the ranks' sequence shards fit together, before any collective of the data.

    Under torch.compile the shards must be even: a list of lengths read back to the host would make the graph's
    shapes depend on data, so every rank's length is taken as this rank's, and the ranks' lengths, gathered inside
    the graph, are checked against it there (_assert_async: a RuntimeError on the CPU, a device-side assert on a
    GPU) before any collective of the data; `device` is where those lengths live (the data's: where the group's
    collectives of the data run, they run too)."""
    if world == 1:
        return [length]
    if torch.compiler.is_compiling():
        mine = torch.full((1,), length, dtype=torch.int64, device=device)
        got = _traced_collective("all_gather_into_tensor", mine, world, group=group)()
        torch._assert_async(
            torch.all(got == mine),
            "input: compiled, sequence parallelism needs every rank's sequence shard of one length (even shards); "
            "the ranks' lengths differ: run uneven shards eagerly",
        )
        return [length] * world
    mine = torch.tensor([length], dtype=torch.int64, device=guard.collective_device(group))
    got = mine.new_empty(world)
    dist.all_gather_into_tensor(got, mine, group=group)
    sizes = got.tolist()  # one host sync (on a GPU), the price of uneven shards any rank may hold
    want = shares(sum(sizes), world)
    if sizes != want:
        raise ValueError(
            f"input: expected the sequence (dim {dim}) split as torch.tensor_split splits {sum(sizes)} "
            f"over {world} ranks, lengths {want}; the ranks hold {sizes}"
        )
    return sizes


def _seq_gather(t: torch.Tensor, dim: int, sizes: list[int], group, async_op: bool = False):
    """Every rank's t (of sizes[r] along `dim`) concatenated along `dim`, in rank order; with async_op, a function
    that waits for the gather and returns it."""
    first = t.movedim(dim, 0)
    longest = sizes[0]  # torch.tensor_split's shares: the first is the longest, the last the shortest
    if first.shape[0] == longest:
        piece = first.contiguous()
    else:  # all_gather_into_tensor wants equal pieces: a short shard is padded, and trimmed after
        piece = first.new_zeros((longest, *first.shape[1:]))
        piece[: first.shape[0]] = first
    if torch.compiler.is_compiling():
        wait = _traced_collective("all_gather_into_tensor", piece, len(sizes), group=group)
    else:
        out = piece.new_empty((len(sizes) * longest, *first.shape[1:]))
        wait = _waiter(dist.all_gather_into_tensor(out, piece, group=group, async_op=async_op), out)

    def finish() -> torch.Tensor:
        gathered = wait()
        if sizes[-1] == longest:  # even shards: the gathered rows are the sequence
            return gathered.movedim(0, dim)
        return torch.cat([gathered[r * longest : r * longest + n] for r, n in enumerate(sizes)], 0).movedim(0, dim)

    return finish if async_op else finish()


def _seq_reduce_scatter(t: torch.Tensor, dim: int, sizes: list[int], rank: int, group, async_op: bool = False):
    """This rank's slice along `dim` (sizes[r] each, in rank order) of t summed over the ranks; with async_op, a
    function that waits for the reduce-scatter and returns it."""
    full = t.movedim(dim, 0)
    longest = sizes[0]  # torch.tensor_split's shares: the first is the longest, the last the shortest
    if sizes[-1] == longest:  # even shards: the rows are already in the collective's layout
        padded = full.contiguous()
    else:
        padded = full.new_zeros((len(sizes) * longest, *full.shape[1:]))
        start = 0
        for r, n in enumerate(sizes):
            padded[r * longest : r * longest + n] = full[start : start + n]
            start += n
    if torch.compiler.is_compiling():
        wait = _traced_collective("reduce_scatter_tensor", padded, "sum", len(sizes), group=group)
    else:
        out = padded.new_empty((longest, *full.shape[1:]))
        wait = _waiter(dist.reduce_scatter_tensor(out, padded, group=group, async_op=async_op), out)

    def finish() -> torch.Tensor:
        return wait()[: sizes[rank]].movedim(0, dim)

    return finish if async_op else finish()


class _ReduceScatterSequence(_LayerFunction):
    """Sequence parallelism's exit: partial sums y [S along dim] -> this rank's slice of their sum, [S_r]; backward
    all-gathers the gradient along the sequence."""

    @staticmethod
    def forward(ctx, y, dim, sizes, rank, group):
        ctx.dim, ctx.sizes, ctx.group = dim, sizes, group
        return _seq_reduce_scatter(y, dim, sizes, rank, group)

    @staticmethod
    @_first_order
    def backward(ctx, grad):
        return _seq_gather(grad.contiguous(), ctx.dim, ctx.sizes, ctx.group), None, None, None, None


class _ColumnParallelLinear(_LayerFunction):
    """Column-parallel linear: W is split by output features.

    x        [..., K]      replicated input
    w_shard  [N_r, K]      this rank's rows of W
    b_shard  [N_r]         this rank's slice of b
    y_shard  [..., N_r]    forward:  y_shard = x @ w_shard.T + b_shard                  (no collective)
                           dgrad:    grad_x = all_reduce(grad_y_shard @ w_shard)
                           wgrad:    grad_w_shard = grad_y_shard.T @ x ;  grad_b_shard = grad_y_shard.sum(rows)
    The all-reduce of grad_x runs while wgrad computes. Alone (world size 1, no all-reduce) a small layer's dgrad
    and wgrad run as one launch (ops.grads).

    With `seq` = (dim, sizes, rank), sequence parallelism: x is this rank's share of the sequence, all-gathered
    along `dim` before the product; backward gathers it again (what forward saved is the share, not the
    sequence) while dgrad computes, and reduce-scatters grad_x, in place of the all-reduce, while wgrad computes.
    """

    tensors = 3

    @staticmethod
    def forward(ctx, x, w_shard, b_shard, group, world, seq):
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if need_w else None, w_shard if need_x else None)
        ctx.group, ctx.world, ctx.seq, ctx.tuning = group, world, seq, _current_tuning()
        x_full = x if seq is None else _seq_gather(x, seq[0], seq[1], group)
        return ops.linear(x_full, w_shard, b_shard)[0]

    @staticmethod
    @_first_order
    def backward(ctx, grad_y_shard):
        x, w_shard = ctx.saved_tensors
        with _tuning(ctx.tuning):  # autograd's thread does not inherit the forward's context
            grads = _column_grads(grad_y_shard, x, w_shard, ctx.needs_input_grad[:3], ctx.group, ctx.world, ctx.seq)
        return *grads, None, None, None


def _column_grads(grad_y_shard, x, w_shard, need, group, world, seq=None) -> tuple:
    """(grad_x, grad_w_shard, grad_b_shard) of a column-parallel layer, None where `need` says no: grad_x
    all-reduced over the group while the weight and bias gradients compute; with `seq` (sequence parallelism), x
    this rank's share of the sequence, gathered again while grad_x computes, and grad_x reduce-scattered while the
    weight and bias gradients compute."""
    if seq is not None:
        dim, sizes, rank = seq
        gathering = _seq_gather(x, dim, sizes, group, async_op=True) if need[1] else None
        scattering = None
        if need[0]:
            grad_x_full = ops.grad_input(grad_y_shard, w_shard)
            scattering = _seq_reduce_scatter(grad_x_full, dim, sizes, rank, group, async_op=True)
        x_full = gathering() if gathering is not None else None
        grad_w, grad_b = ops.grad_params(
            grad_y_shard, x_full if x_full is not None else grad_y_shard, weight=need[1], bias=need[2]
        )
        return (scattering() if scattering is not None else None), grad_w, grad_b
    if world == 1 and need[0] and need[1]:  # no all-reduce waits on grad_x alone: one launch where they pair
        return ops.grads(grad_y_shard, w_shard, x, bias=need[2])
    summing = _all_reduce(ops.grad_input(grad_y_shard, w_shard), group, world, async_op=True) if need[0] else None
    grad_w, grad_b = ops.grad_params(grad_y_shard, x, weight=need[1], bias=need[2])
    return (summing() if summing is not None else None), grad_w, grad_b


class _RowParallelLinear(_LayerFunction):
    """Row-parallel linear: W is split by input features; the bias is replicated and added once.

    x_shard  [..., K_r]    this rank's slice of the input features
    w_shard  [N, K_r]      this rank's columns of W
    b        [N]           full bias, the same on every rank
    y        [..., N]      forward:  y = all_reduce(x_shard @ w_shard.T + (b if r == 0 else 0))
                           dgrad:    grad_x_shard = grad_y @ w_shard                     (no collective)
                           wgrad:    grad_w_shard = grad_y.T @ x_shard ;  grad_b = grad_y.sum(rows) on every rank
    The bias is added inside the kernel on rank 0 only, so the sum carries it once. Its gradient is computed on
    every rank from the replicated grad_y, so the replicated bias stays identical under any optimizer: by the
    column-sum kernel (fuse_bias=False), never by the weight gradient's launch, whose config, and with it the order
    of the sums, follows the rank's shard width (a rank with an empty shard makes none; tests/test_dist.py). Alone
    on its group (_alone) the rank has no replica to match, and the weight gradient's launch may write it, as the
    column layer's does: over a few tokens one launch fewer a step (kernels/configs.py, ROW_SUM_MAX_K). No
    collective waits on grad_x_shard, so a small layer's dgrad and wgrad run as one launch (ops.grads).

    With `scatter` (input_is_parallel=False), x is the replicated full input [..., K], of which forward takes its
    slice (a view); backward all-gathers grad_x [..., K] while wgrad computes, so every rank gets the full gradient.
    """

    tensors = 3

    @staticmethod
    def forward(ctx, x_shard, w_shard, b, group, world, rank, scatter):
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.size = x_shard.shape[-1] if scatter else None
        if scatter:  # the replicated full input: this rank's slice, a view
            x_shard = x_shard[..., slice(*shard_range(ctx.size, world, rank))]
        ctx.save_for_backward(x_shard if need_w else None, w_shard if need_x else None)
        ctx.group, ctx.world, ctx.tuning, ctx.alone = group, world, _current_tuning(), _alone(group, world)
        return _row_forward(x_shard, w_shard, b, group, world, rank)

    @staticmethod
    @_first_order
    def backward(ctx, grad_y):
        x_shard, w_shard = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        with _tuning(ctx.tuning):
            if need_x and need_w and ctx.size is None:  # no all-gather waits on grad_x alone
                grad_x, grad_w, grad_b = ops.grads(grad_y, w_shard, x_shard, bias=need_b, fuse_bias=ctx.alone)
                return grad_x, grad_w, grad_b, None, None, None, None
            grad_x = ops.grad_input(grad_y, w_shard) if need_x else None
            gathering = None
            if grad_x is not None and ctx.size is not None:
                gathering = _all_gather_last_dim(grad_x, ctx.group, ctx.world, ctx.size, async_op=True)
            grad_w, grad_b = ops.grad_params(grad_y, x_shard, weight=need_w, bias=need_b, fuse_bias=ctx.alone)
        if gathering is not None:
            grad_x = gathering()
        return grad_x, grad_w, grad_b, None, None, None, None


class _Mlp(_LayerFunction):
    """ParallelMLP, Column -> activation -> Row, as one node:

    x        [..., K]            replicated input (with `seq`: this rank's share of the sequence, gathered first)
    w1, b1   [F_r, K], [F_r]     this rank's Column shard (a gated activation: [2 F_r, K] and [2 F_r] hold (gate,
                                 up) row pairs, pre is [..., 2 F_r])
    w2, b2   [N, F_r], [N]       its Row shard
    forward:   pre = x @ w1.T + b1 ;  a = act(pre)                      (one launch, both kept)
               y = all_reduce(a @ w2.T + (b2 if r == 0 else 0))        [..., N]   (with `seq`: world 1 here, the
               caller reduce-scatters the ranks' partial sums)
    backward, each tensor dropped after its last use, fc2's gradients last or first (_fc2_grads_first):
               grad_pre = (grad_y @ w2) * act'(pre)                    (one launch; then pre is dropped)
               grad_x = all_reduce(grad_pre @ w1), running while grad_w1 = grad_pre.T @ x and grad_b1 compute
               (with `seq`: x gathered again, grad_x reduce-scattered, as _ColumnParallelLinear does; then
               grad_pre is dropped)
               grad_w2 = grad_y.T @ a ;  grad_b2 = grad_y.sum(rows)    (then a is dropped)
    Against Column, F.gelu and Row as three modules: two elementwise launches fewer a step, and no pass of its own
    over pre and a in either direction.

    Why one node and a chosen order: a step's peak memory is where it allocates a weight gradient, the last above
    all. fc2's last comes beside a [..., F_r] and grad_y; fc1's last (a graph of two nodes, whose Row node runs
    first, has no other order) came beside the whole grad_pre, which for SwiGLU is [..., 2 F_r] (gate and up are
    one parameter, and both its products read both halves), where LlamaMLP allocates its last, gate's, beside
    grad_gate [..., F] alone. Over many tokens the activations outweigh the weight gradients, and fc2's gradients
    first, a dropped before grad_pre is made, peak lower (bench/NOTES.md, attempts 44, 98 and 99). Saved tensors
    live to a node's end, unless its backward releases them (ctx.maybe_clear_saved_tensors, AOTAutograd's way, a
    no-op for a graph kept by retain_graph): so they are unpacked, released, and each dropped after its last use;
    saving them (not holding them on ctx) keeps saved_tensors_hooks, and with them activation checkpointing and
    offloading, working on pre and a.
    """

    tensors = 5

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, group, world, rank, activation, seq):
        need = ctx.needs_input_grad
        ctx.group, ctx.world, ctx.activation, ctx.seq = group, world, activation, seq
        ctx.tuning, ctx.alone = _current_tuning(), _alone(group, world)
        x_full = x if seq is None else _seq_gather(x, seq[0], seq[1], group)
        a, pre = ops.linear(x_full, w1, b1, activation, save_pre=True)
        ctx.save_for_backward(x if need[1] else None, w1 if need[0] else None, w2, a if need[3] else None, pre)
        return _row_forward(a, w2, b2, group, world, rank)

    @staticmethod
    @_first_order
    def backward(ctx, grad_y):
        x, w1, w2, a, pre = ctx.saved_tensors
        compiling = torch.compiler.is_compiling()
        if not compiling:  # (a trace's graph frees what it no longer reads)
            ctx.maybe_clear_saved_tensors()
        need = ctx.needs_input_grad
        # (a trace keeps fc2's last: the compiled graph's schedule, not this order, decides its memory)
        fc2_first = not compiling and _fc2_grads_first(
            math.prod(pre.shape[:-1]), pre.shape[-1], w2.shape[-1], w2.shape[0], x, w1, need[3], ctx.seq is not None
        )
        with _tuning(ctx.tuning):
            if fc2_first:
                grad_w2, grad_b2 = ops.grad_params(grad_y, a, weight=need[3], bias=need[4], fuse_bias=ctx.alone)
                del a
            grad_pre = ops.grad_input(grad_y, w2, ctx.activation, pre)
            del pre
            grads = _column_grads(grad_pre, x, w1, need[:3], ctx.group, ctx.world, ctx.seq)
            del grad_pre
            if not fc2_first:
                grad_w2, grad_b2 = ops.grad_params(grad_y, a, weight=need[3], bias=need[4], fuse_bias=ctx.alone)
        return *grads, grad_w2, grad_b2, None, None, None, None, None


def _fc2_grads_first(rows: int, p: int, f: int, n: int, x, w1, w2_grad: bool, seq: bool) -> bool:
    """Whether _Mlp's backward peaks lower with fc2's gradients first than last: the largest sum, in elements, of
    what is alive as each tensor is allocated, in either order. rows: pre's rows (the gathered sequence's, with
    sequence parallelism, `seq`); p: pre's width (F_r, or 2 F_r gated); f: a's (F_r); n: y's; x, w1: what backward
    saved (x where w1 takes a gradient, w1 where x does); w2_grad: whether fc2's weight takes one. Ties keep fc2's
    last."""
    g_w1 = p * x.shape[-1] if x is not None else 0
    # grad_x [rows, K]; with `seq`, x gathered again beside fc1's weight gradient, as large
    g_x = (rows * w1.shape[-1] if w1 is not None else 0) + (rows * x.shape[-1] if seq and x is not None else 0)
    g_w2 = n * f if w2_grad else 0
    a, pre, g_y = rows * f if w2_grad else 0, rows * p, rows * n  # grad_pre: pre's size; a saved only for g_w2
    last = max(a + 2 * pre + g_y, g_w1 + a + pre + g_y + g_x, g_w1 + g_w2 + a + g_y + g_x)
    first = max(g_w2 + a + pre + g_y, g_w2 + 2 * pre + g_y, g_w2 + g_w1 + pre + g_y + g_x)
    return first < last


def _mlp_graph(x, w1, b1, w2, b2, group, world: int, rank: int, activation: str, seq):
    """ParallelMLP's output where autograd records it: _Mlp where fc1 takes a gradient (x, w1 or b1 requires
    one), else fc1's output computed unrecorded and the Row layer's Function on it (no pre-activation
    written: it serves only fc1's gradients)."""
    if _records_grad(x, w1, b1):
        return _apply(_Mlp, x, w1, b1, w2, b2, group, world, rank, activation, seq)
    x_full = x if seq is None else _seq_gather(x, seq[0], seq[1], group)
    return _apply(_RowParallelLinear, ops.linear(x_full, w1, b1, activation)[0], w2, b2, group, world, rank, False)


def _alone(group, world: int) -> bool:
    """Whether a row layer's rank is the only one of its group, so that no replica of its bias must match its bias
    gradient's bits. Not `world` alone: with sequence parallelism the row Functions get world 1 (no all-reduce:
    their caller reduce-scatters) on a larger group."""
    return world == 1 and group_size_rank(group)[0] == 1


def _row_forward(x_shard, w_shard, b, group, world: int, rank: int):
    """all_reduce(x_shard @ w_shard.T + (b on rank 0 only))."""
    return _all_reduce(ops.linear(x_shard, w_shard, b if rank == 0 else None)[0], group, world)


def _mlp_forward(x, w1, b1, w2, b2, group, world: int, rank: int, activation: str):
    """The MLP's output, unrecorded: all_reduce(act(x @ w1.T + b1) @ w2.T + (b2 on rank 0 only))."""
    return _row_forward(ops.linear(x, w1, b1, activation)[0], w2, b2, group, world, rank)


class _GatherLastDim(_LayerFunction):
    """y_shard [..., N_r] -> y [..., N] on every rank; backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, y_shard, group, world, rank, size):
        ctx.slice = shard_range(size, world, rank)
        return _all_gather_last_dim(y_shard, group, world, size)

    @staticmethod
    def backward(ctx, grad_y):
        start, stop = ctx.slice
        return grad_y[..., start:stop], None, None, None, None


class _ScatterSequence(_ReduceScatterSequence):
    """Sequence parallelism's entry from a replicated producer: x [S along dim], the same on every rank -> this
    rank's share [S_r] (a view); backward, _ReduceScatterSequence's, all-gathers the gradient, so that every rank
    gets the sequence's."""

    @staticmethod
    def forward(ctx, x, dim, sizes, rank, group):
        ctx.dim, ctx.sizes, ctx.group = dim, sizes, group
        return x.narrow(dim, sum(sizes[:rank]), sizes[rank])


class _GatherSequence(_LayerFunction):
    """Sequence parallelism's exit to a replicated consumer: this rank's share [S_r along dim] -> the sequence [S]
    on every rank; backward keeps this rank's slice of the gradient, which such a consumer gives alike on every
    rank (Column layers' all-reduced grad_input, a replicated head's)."""

    @staticmethod
    def forward(ctx, x, dim, sizes, rank, group):
        ctx.dim, ctx.start, ctx.length = dim, sum(sizes[:rank]), sizes[rank]
        return _seq_gather(x, dim, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.start, ctx.length), None, None, None, None


def scatter_sequence(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's share (torch.tensor_split's) along `dim` of x, which every rank holds alike; its gradient is
    gathered over `group` in backward."""
    world, rank = group_size_rank(group)
    if world == 1:
        return x
    dim %= x.dim()
    sizes = shares(x.shape[dim], world)
    if not _records_grad(x):
        return x.narrow(dim, sum(sizes[:rank]), sizes[rank])
    return _apply(_ScatterSequence, x, dim, sizes, rank, group)


def gather_sequence(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """The whole sequence along `dim` from every rank's share x (torch.tensor_split's shares, checked as the layers'
    are: ValueError on every rank), for a consumer that every rank runs alike; backward keeps this rank's slice of
    its gradient."""
    world, rank = group_size_rank(group)
    if world == 1:
        return x
    dim %= x.dim()
    sizes = sequence_sizes(x.shape[dim], dim, group, world, rank, x.device)
    if not _records_grad(x):
        return _seq_gather(x, dim, sizes, group)
    return _apply(_GatherSequence, x, dim, sizes, rank, group)


def _current_tuning() -> autotune.Tuning | None:
    # run-time autotuning is eager-only (_preflight refuses it under torch.compile): no scope to carry into backward
    return None if torch.compiler.is_compiling() else autotune.current_tuning()


def _tuning(scope: autotune.Tuning | None):
    """`with _tuning(scope):` runs the block in `scope` (a backward in its forward's); nothing to set where neither
    it nor the current scope is one (the common case: no object made) or under torch.compile."""
    if scope is None and autotune.current_tuning() is None or torch.compiler.is_compiling():
        return _NO_SCOPE
    return autotune.tuning(scope)


_NO_SCOPE = contextlib.nullcontext()  # stateless: one serves every block


def _plain(world: int) -> bool:
    """Whether a layer call runs its argument checks and nothing else before its work: eager, with neither the rank
    guard nor run-time autotuning on a group. Callers test this first and call _preflight only where it is not so,
    so that the common call builds none of _preflight's closures (host time: bench/NOTES.md, attempt 56)."""
    return (world == 1 or not (guard.enabled() or configs.autotune_enabled())) and not torch.compiler.is_compiling()


def _preflight(where: str, group, world: int, check, facts, launch_facts) -> autotune.Tuning | None:
    """For a call that is not _plain: run its argument checks; with the rank guard on, also agree with the other
    ranks (fused_tp/guard.py). Returns the call's tuning scope (run-time autotuning on a group), else None.
    `launch_facts() -> str | None`: what, beside `facts`, fixes every rank's launches (input strides, the layer's
    dense size along its split dim), for autotuning only; None where that cannot be said (the functional forms get
    shards alone), which makes every call a tuning call.

    Without the guard a bad argument raises on the rank that has it, before any collective; the other ranks then
    wait in the call's first collective until the group's timeout. With it, every rank raises at once.

    Under torch.compile the checks run while tracing, on the traced shapes; the guard's gather and autotuning's
    broadcasts are host decisions that a graph cannot hold, so on a group they raise instead of being left out."""
    if torch.compiler.is_compiling():
        if world > 1 and (guard.enabled() or configs.autotune_enabled()):
            raise RuntimeError(
                f"{where}: the rank guard (FUSED_TP_CHECK_RANKS, check_ranks()) and run-time "
                "autotuning (FUSED_TP_AUTOTUNE) run eagerly only; turn them off to compile"
            )
        check()
        return None
    facts_text = f"{facts()}; grad mode {torch.is_grad_enabled()}; group of {world}"
    if guard.enabled():
        try:
            check()
            error = None
        except (TypeError, ValueError) as e:
            error = e
        guard.agree(where, group, facts_text, error)
    else:
        check()
    if not configs.autotune_enabled():
        return None
    extra = launch_facts()
    return _tuning_scope(group, f"{where}; {facts_text}; {extra}", always=extra is None)


_tuned_calls: set = set()  # the facts of every layer call run-time autotuning has seen in this process


def _tuning_scope(group, facts: str, always: bool) -> autotune.Tuning | None:
    """FUSED_TP_AUTOTUNE=1 on a group: the first call with these facts (replicated, so new on every rank alike) is a
    tuning call; its launches, forward and backward, take rank 0's configs (autotune.autotuned_config). The facts
    must fix every rank's launches (sizes, strides, the dense split size): a call whose facts were seen, but whose
    launches are new on some rank, would let that rank choose alone. `always`: every call is a tuning call (one
    broadcast per launch), where the facts cannot say what the other ranks' shards are."""
    if facts in _tuned_calls and not always:
        return None
    _tuned_calls.add(facts)
    return autotune.Tuning(consensus=lambda cfg: _broadcast_config(cfg, group))


def _broadcast_config(cfg, group):
    """Rank 0's config (or None) on every rank of `group`."""
    values = torch.tensor(autotune.to_ints(cfg), dtype=torch.int64, device=guard.collective_device(group))
    dist.broadcast(values, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
    return autotune.from_ints(values.tolist())


def _param_facts(weight, bias, replicated_dim: int) -> str:
    """The weight's replicated size and which parameters take gradients (a shard's own size may differ)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return guard.describe("weight", weight)
    bias_grad = "none" if bias is None else f"grad={getattr(bias, 'requires_grad', None)}"
    return f"weight [.., {weight.shape[replicated_dim]}] grad={weight.requires_grad}; bias {bias_grad}"


def _launch_facts(x, dense_size: int | None, shard: bool = False):
    """launch_facts for _preflight: x's strides (a shard's follow its own width: there, whether it is contiguous) and
    the dense size, or None where the caller does not know the dense size."""

    def text():
        if dense_size is None or not isinstance(x, torch.Tensor):
            return None
        layout = f"contiguous {x.is_contiguous()}" if shard else f"strides {x.stride()}"
        return f"input {layout}; split dim {dense_size}"

    return text


def column_call(
    x,
    weight,
    bias,
    group,
    gather_size: int | None,
    out_features: int | None = None,
    world_rank: tuple[int, int] | None = None,
    seq_dim: int | None = None,
):
    """Column-parallel linear; with `gather_size` (the layer's out_features) the output gathered on every rank.
    `out_features`: the dense layer's (None from the functional form); `world_rank`: the group's (R, r) where the
    caller has them; `seq_dim`: sequence parallelism, x holds this rank's share of the sequence along that dim,
    gathered first (its gradient reduce-scattered, in place of grad_x's all-reduce)."""
    if torch._C._is_any_autocast_enabled():  # one flag for all device types: outside autocast, the only cost
        x, weight, bias = autocast_args(x, weight, bias)
    world, rank = world_rank or group_size_rank(group)
    scope = None
    if _plain(world):
        _check_column(x, weight, bias, seq_dim)
    else:
        scope = _preflight(
            "column-parallel linear",
            group,
            world,
            lambda: _check_column(x, weight, bias, seq_dim),
            lambda: f"{_describe_input(x, seq_dim)}; {_param_facts(weight, bias, 1)}; gather {gather_size}",
            _launch_facts(x, out_features),
        )
    graph = _records_grad(x, weight, bias)
    seq = _sequence(x, seq_dim, group, world, rank)
    if graph:
        y = _in_scope(scope, _apply, _ColumnParallelLinear, x, weight, bias, group, world, seq)
    else:
        x = x if seq is None else _seq_gather(x, seq[0], seq[1], group)
        y = _in_scope(scope, ops.linear, x, weight, bias)[0]
    if gather_size is None:
        return y
    if graph:
        return _apply(_GatherLastDim, y, group, world, rank, gather_size)
    return _all_gather_last_dim(y, group, world, gather_size)


def _check_column(x, weight, bias, seq_dim: int | None) -> None:
    kernels.check_linear_args(x, weight, bias)
    _check_seq_dim(x, seq_dim)


def row_call(
    x,
    weight,
    bias,
    group,
    scatter_size: int | None,
    in_features: int | None = None,
    world_rank: tuple[int, int] | None = None,
    seq_dim: int | None = None,
):
    """Row-parallel linear on this rank's input features, or with `scatter_size` (the layer's in_features) on the
    replicated full input, of which it takes its slice. `in_features`: the dense layer's (None from the functional
    form); `world_rank` as for column_call; `seq_dim`: sequence parallelism, the output reduce-scattered along that
    dim (this rank's share of the sequence) in place of the all-reduce."""
    if torch._C._is_any_autocast_enabled():
        x, weight, bias = autocast_args(x, weight, bias)
    world, rank = world_rank or group_size_rank(group)
    scope = None
    if _plain(world):
        _check_row(x, weight, bias, scatter_size, world, rank, seq_dim)
    else:

        def facts():
            # The shard's last dim is this rank's own; the full input and every leading dim are replicated.
            leading = scatter_size is None and isinstance(x, torch.Tensor) and x.dim() > 0
            input_facts = guard.describe("input", x, leading_only=leading)
            return f"{input_facts}; {_param_facts(weight, bias, 0)}; scatter {scatter_size}"

        scope = _preflight(
            "row-parallel linear",
            group,
            world,
            lambda: _check_row(x, weight, bias, scatter_size, world, rank, seq_dim),
            facts,
            _launch_facts(x, in_features, shard=scatter_size is None),
        )
    if seq_dim is not None and world > 1:
        graph = _records_grad(x, weight, bias)
        # the partial sums, the bias in rank 0's only, then reduce-scattered: world 1 to the Function, no all-reduce
        args = (x, weight, bias, group, 1, rank)
        y = (
            _in_scope(scope, _apply, _RowParallelLinear, *args, False)
            if graph
            else _in_scope(scope, _row_forward, *args)
        )
        return _leave_sequence(y, seq_dim, group, world, rank, graph)
    if _records_grad(x, weight, bias):
        scatter = scatter_size is not None and world > 1
        return _in_scope(scope, _apply, _RowParallelLinear, x, weight, bias, group, world, rank, scatter)
    if scatter_size is not None:
        start, stop = shard_range(scatter_size, world, rank)
        x = x[..., start:stop]
    return _in_scope(scope, _row_forward, x, weight, bias, group, world, rank)


def _check_row(x, weight, bias, scatter_size: int | None, world: int, rank: int, seq_dim: int | None) -> None:
    if scatter_size is not None and (not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != scatter_size):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"input: expected last dim {scatter_size} (in_features), got {got}")
    start, stop = shard_range(scatter_size, world, rank) if scatter_size is not None else (0, None)
    kernels.check_linear_args(x if scatter_size is None else x[..., start:stop], weight, bias)
    _check_seq_dim(x, seq_dim)


def mlp_call(
    x,
    w1,
    b1,
    w2,
    b2,
    group,
    activation: str,
    hidden_features: int,
    world_rank: tuple[int, int] | None = None,
    seq_dim: int | None = None,
):
    """Column (w1, b1) -> activation -> Row (w2, b2) on this rank's shards; the full output on every rank.
    `hidden_features`: the dense hidden width; `world_rank` as for column_call; `seq_dim`: sequence parallelism,
    input and output this rank's share of the sequence along that dim (an all-gather in, a reduce-scatter out)."""
    if torch._C._is_any_autocast_enabled():
        x, w1, b1, w2, b2 = autocast_args(x, w1, b1, w2, b2)
    world, rank = world_rank or group_size_rank(group)
    scope = None
    if _plain(world):
        _check_mlp(x, w1, b1, w2, b2, activation, seq_dim)
    else:

        def facts():
            return (
                f"{_describe_input(x, seq_dim)}; fc1 {_param_facts(w1, b1, 1)}; fc2 {_param_facts(w2, b2, 0)}; "
                f"activation {activation}"
            )

        scope = _preflight(
            "parallel MLP",
            group,
            world,
            lambda: _check_mlp(x, w1, b1, w2, b2, activation, seq_dim),
            facts,
            _launch_facts(x, hidden_features),
        )
    seq = _sequence(x, seq_dim, group, world, rank)
    if seq is not None:
        graph = _records_grad(x, w1, b1, w2, b2)
        if graph:  # world 1 to the Function: the gather and the reduce-scatter replace its all-reduces
            y = _in_scope(scope, _mlp_graph, x, w1, b1, w2, b2, group, 1, rank, activation, seq)
        else:
            x = _seq_gather(x, seq[0], seq[1], group)
            y = _in_scope(scope, _mlp_forward, x, w1, b1, w2, b2, group, 1, rank, activation)
        return _leave_sequence(y, seq_dim, group, world, rank, graph)
    if _records_grad(x, w1, b1, w2, b2):
        return _in_scope(scope, _mlp_graph, x, w1, b1, w2, b2, group, world, rank, activation, None)
    return _in_scope(scope, _mlp_forward, x, w1, b1, w2, b2, group, world, rank, activation)


def _check_mlp(x, w1, b1, w2, b2, activation: str, seq_dim: int | None) -> None:
    kernels.check_activation(activation, allow_none=False)
    kernels.check_linear_args(x, w1, b1, ("input", "fc1.weight", "fc1.bias"))
    _check_seq_dim(x, seq_dim)
    kernels.check_gated_width(activation, w1.shape[0], "fc1.weight", "rows")
    # fc2 reads what fc1 writes: [..., F_r] (a gated activation's: half fc1's rows) in fc1.weight's dtype, on its
    # device; for the error that names the argument, an empty view of fc1's weight stands for it.
    width = kernels.ACTIVATIONS[activation].width(w1.shape[0])
    if not linear_args_pass(w1.dtype, w1.device, width, w2, b2):
        fc1_out = w1.as_strided((0, width), (width, 1))
        kernels.check_linear_args(fc1_out, w2, b2, ("fc1's output", "fc2.weight", "fc2.bias"))


def _check_seq_dim(x, seq_dim: int | None) -> None:
    """ValueError naming sequence_dim unless it is a dim of x other than its last (the features)."""
    if seq_dim is not None and not (-x.dim() <= seq_dim < x.dim() and seq_dim % x.dim() != x.dim() - 1):
        raise ValueError(
            f"sequence_dim: expected a dim of the input other than its last (the features), got "
            f"{seq_dim} for an input of {x.dim()} dims"
        )


def _describe_input(x, seq_dim: int | None) -> str:
    """The input's facts for the rank guard; under sequence parallelism, without its own share of the sequence."""
    if seq_dim is None or not isinstance(x, torch.Tensor) or not -x.dim() <= seq_dim < x.dim():
        return guard.describe("input", x)  # (a bad sequence_dim raises in the checks, on every rank alike)
    return guard.describe("input", x.narrow(seq_dim, 0, 0)) + f" (sequence dim {seq_dim % x.dim()})"


def _sequence(x, seq_dim: int | None, group, world: int, rank: int):
    """Sequence parallelism's (dim, every rank's length, rank) for a layer's input x, or None without it (or at
    world size 1, where it changes nothing)."""
    if seq_dim is None or world == 1:
        return None
    seq_dim %= x.dim()
    return seq_dim, sequence_sizes(x.shape[seq_dim], seq_dim, group, world, rank, x.device), rank


def _leave_sequence(y, seq_dim: int, group, world: int, rank: int, graph: bool):
    """This rank's share of the sequence of y's sum over the ranks (torch.tensor_split's, along seq_dim)."""
    seq_dim %= y.dim()
    size = y.shape[seq_dim]
    sizes = shares(size, world)
    if graph:
        return _apply(_ReduceScatterSequence, y, seq_dim, sizes, rank, group)
    return _seq_reduce_scatter(y, seq_dim, sizes, rank, group)


def _records_grad(*tensors) -> bool:
    """Whether autograd records this call (grad mode on and a tensor that requires grad): where it does not, the
    layers skip their autograd Function, whose bookkeeping costs host time per call for nothing."""
    if torch.is_grad_enabled():
        for t in tensors:  # a loop, not any() over a generator: less host time (bench/NOTES.md, attempt 56)
            if t is not None and t.requires_grad:
                return True
    return False


def _in_scope(scope: autotune.Tuning | None, fn, *args):
    """fn(*args) with `scope` as run-time autotuning's tuning scope (None: none)."""
    if scope is None and autotune.current_tuning() is None:  # autotuning off: nothing to set or restore
        return fn(*args)
    with _tuning(scope):
        return fn(*args)


def column_parallel_linear(x, weight, bias=None, *, process_group=None):
    """This rank's output features: x [..., K] replicated, weight [N_r, K], bias [N_r]  ->  [..., N_r].

    Backward all-reduces grad_x over `process_group` (default: the default group; or a 1-D DeviceMesh).
    """
    return column_call(x, weight, bias, resolve_group(process_group), None)


def row_parallel_linear(x, weight, bias=None, *, process_group=None):
    """The full output, summed over ranks: x [..., K_r], weight [N, K_r], bias [N] replicated  ->  [..., N].

    Forward all-reduces over `process_group` (default: the default group; or a 1-D DeviceMesh); the bias is
    counted once.
    """
    return row_call(x, weight, bias, resolve_group(process_group), None)
