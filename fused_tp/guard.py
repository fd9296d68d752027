"""The rank-consistency guard: before a layer call's first collective, the ranks compare what they will send.

A tensor-parallel call is collective: every rank of the group must make it, with the same leading shape, dtype,
kind of device and gradient needs, or the collectives of its forward or backward hang (one rank waits for a
call that never comes) or, worse, reduce buffers of different sizes. The guard turns those into one clear
error, raised identically on every rank, at the call that went wrong:

    facts  what decides the call's collectives (shapes, dtype, device type, which gradients flow, options),
           as text that must be equal on every rank, plus this rank's count of guarded calls on the group
    error  this rank's own argument error, if its checks failed (the other ranks would otherwise wait for it)

Every rank all-gathers a fixed-size record of both (one collective of RECORD_BYTES per rank, and a host sync).
If all ranks agree and none failed, the call goes on. If every rank failed with the same error, each raises its
own (identical) error. Otherwise every rank raises the same RankMismatchError, which lists each rank's record.

Off by default: the gather costs a collective per layer call (bench/bench_guard.py measures it). On with
FUSED_TP_CHECK_RANKS=1 in every rank's environment (read when fused_tp is imported; read_environment() reads it
again), or inside `with fused_tp.check_ranks():` on every rank. Both are plain module state, not context variables:
a layer call reads them on its host path, and torch.compile can read (and guard on) plain globals only.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

ENV_VAR = "FUSED_TP_CHECK_RANKS"
RECORD_BYTES = 1024
_SEP = b"\x1f"  # between facts and error in a record; never in the text (it is ASCII printable plus newlines)

_switch: bool | None = None  # the innermost check_ranks() block's setting, for the whole process
_env_on = False  # FUSED_TP_CHECK_RANKS
_calls: dict = {}  # guarded calls made so far, per process group (None: the default group)


class RankMismatchError(RuntimeError):
    """The ranks of a group disagree about a collective call; raised identically on every rank."""


def read_environment() -> None:
    """Read FUSED_TP_CHECK_RANKS again (fused_tp reads it once, at import)."""
    global _env_on
    _env_on = os.environ.get(ENV_VAR, "0") not in ("", "0")


def enabled() -> bool:
    """Whether layer calls run the guard: the innermost check_ranks() block, else FUSED_TP_CHECK_RANKS."""
    return _env_on if _switch is None else _switch


@contextlib.contextmanager
def check_ranks(on: bool = True):
    """Run the guard on the layer calls inside this block (on=False: skip it, whatever the environment says).

    Enter it on every rank: with it on for some ranks only, the others never join the guard's gather. The setting
    is the process's, not the thread's: a layer called from another thread inside the block is guarded too."""
    global _switch
    before, _switch = _switch, bool(on)
    try:
        yield
    finally:
        _switch = before


def collective_device(group) -> torch.device:
    """Where a small tensor for a collective on `group` lives: NCCL takes device tensors only; gloo (or the
    cpu:gloo part of a mixed group) takes host ones."""
    if "gloo" in str(dist.get_backend(group)) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def describe(name: str, t, leading_only: bool = False) -> str:
    """A tensor's facts that must agree across ranks: shape (or all but the last dim), dtype, device type, grad."""
    if not isinstance(t, torch.Tensor):
        return f"{name}: {type(t).__name__}"
    shape = f"{tuple(t.shape[:-1])} + [..]" if leading_only else str(tuple(t.shape))
    return f"{name}: {shape} {str(t.dtype).removeprefix('torch.')} {t.device.type} grad={t.requires_grad}"


def _encode(facts: str, error: str | None) -> torch.Tensor:
    # Both parts are cut to fit one fixed-size record: the gather needs equal sizes on every rank.
    half = RECORD_BYTES // 2 - 1
    data = facts.encode()[:half] + _SEP + (error or "").encode()[:half]
    record = torch.zeros(RECORD_BYTES, dtype=torch.uint8)
    record[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return record


def _decode(record: torch.Tensor) -> tuple[str, str | None]:
    facts, _, error = bytes(record.tolist()).rstrip(b"\0").partition(_SEP)
    return facts.decode(errors="replace"), error.decode(errors="replace") or None


def agree(where: str, group, facts: str, error: Exception | None) -> None:
    """Compare `facts` and this rank's `error` across the ranks of `group`; raise on every rank if they differ.

    Called on every rank of `group` before the call's first collective, whatever its local checks found."""
    count = _calls[group] = _calls.get(group, 0) + 1
    facts = f"{where}, guarded call {count} on this group; {facts}"
    mine = None if error is None else f"{type(error).__name__}: {error}"
    record = _encode(facts, mine).to(collective_device(group))
    records = [torch.empty_like(record) for _ in range(dist.get_world_size(group))]
    dist.all_gather(records, record, group=group)
    seen = [_decode(r) for r in torch.stack(records).cpu()]  # one copy to the host (and one sync under NCCL)
    errors = {e for _, e in seen}
    if errors == {None} and len({f for f, _ in seen}) == 1:
        return
    if error is not None and errors == {mine}:
        raise error  # every rank failed the same check: its own error is already the same everywhere
    lines = "\n".join(f"  rank {r}: {f}" + (f"\n    raised {e}" if e else "") for r, (f, e) in enumerate(seen))
    raise RankMismatchError(
        f"{where}: the ranks of the group disagree about this call (FUSED_TP_CHECK_RANKS):\n{lines}"
    ) from error


read_environment()
