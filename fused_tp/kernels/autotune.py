"""Run-time autotuning (FUSED_TP_AUTOTUNE=1, eager only) and the selection rules it shares with `python -m fused_tp
tune`: time every candidate config at the first launch of a shape, time the fastest few again, keep the fastest
unless the rule's config is within MARGIN of it.

On a process group every rank must run the same config, so that replicated results stay bitwise identical: inside
a layer call that is new on every rank (autograd.py decides), `consensus` replaces each rank's choice with rank
0's. The scope is process-wide module state, set around the call and its backward: autotuning is an eager
experiment, and a plain global costs a launch nothing when it is off.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import triton.testing

from . import configs
from .configs import KernelConfig
from .jit import INTERPRETED
from .launch import path_counts

MARGIN = 0.03  # how much faster than the rule's config a tuned one must time to be chosen (see `choose`)

# One timing is one sample of a shared host and a GPU's clocks: on the H100 host a whole do_bench median now and
# then read 2-4x slow (bench/NOTES.md, attempt 29). So the CONFIRM_TOP fastest candidates and the rule's config are
# timed CONFIRM_ROUNDS more times, and each keeps its fastest timing, as noise only ever slows a run down: a stalled
# timing of the rule's config no longer hands its place to a config within MARGIN of it.
CONFIRM_TOP = 3
CONFIRM_ROUNDS = 2

autotuned: dict = {}  # a launch's key -> the config run-time autotuning chose for it in this process


@dataclass(frozen=True)
class Tuning:
    """A layer call that is new on every rank of its group: its launches (re)decide their configs, and
    `consensus(config) -> config` (None at world size 1) replaces each rank's choice with rank 0's."""

    consensus: object = None


_scope: Tuning | None = None


class tuning:
    """`with tuning(scope):` makes `scope` the current Tuning (None: none), restoring the one before after."""

    __slots__ = ("scope", "before")

    def __init__(self, scope: Tuning | None):
        self.scope = scope

    def __enter__(self) -> Tuning | None:
        global _scope
        self.before, _scope = _scope, self.scope
        return self.scope

    def __exit__(self, *exc) -> None:
        global _scope
        _scope = self.before


def current_tuning() -> Tuning | None:
    return _scope


def timer(fn) -> float:
    """ms of fn() for run-time autotuning: do_bench's median on a GPU, the wall clock's under the interpreter."""
    if INTERPRETED:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def autotuned_config(
    key,
    candidates: list[KernelConfig],
    rule: KernelConfig,
    run: Callable[[], object],
    usable: Callable[[KernelConfig], bool],
) -> KernelConfig | None:
    """The config this process chose for `key`, timing `run()` under each candidate pinned the first time (those
    launches are not counted in path_counts: they are not the caller's). Inside
    a tuning scope with a consensus, every rank takes part in it for every launch, cached or not and empty or not,
    so that the collectives pair up, and all ranks keep rank 0's choice where it is `usable` here (this rank's
    operands may take the other path, where its tiles do not fit)."""
    cfg, scope = autotuned.get(key), _scope
    if cfg is None and candidates:

        def timed(cand):
            with configs.pin_config(cand):
                return timer(run)

        counts = path_counts.copy()
        times = [[timed(cand)] for cand in candidates]
        for _ in range(CONFIRM_ROUNDS):
            for i in contenders(candidates, [t[0] for t in times], rule):
                times[i].append(timed(candidates[i]))
        path_counts.clear()
        path_counts.update(counts)
        cfg = choose(candidates, [min(t) for t in times], rule)
    if scope is not None and scope.consensus is not None:
        chosen = scope.consensus(cfg)
        if chosen is not None and usable(chosen):
            cfg = chosen
    if cfg is not None:
        autotuned[key] = cfg
    return cfg


def contenders(candidates: list[KernelConfig], first_ms: list, rule: KernelConfig) -> list[int]:
    """Indices of the candidates to time again: the CONFIRM_TOP fastest by their first timing (None: not timed,
    never a contender) and the rule's config wherever it ranks."""
    timed = sorted((i for i, t in enumerate(first_ms) if t is not None), key=lambda i: first_ms[i])
    return timed[:CONFIRM_TOP] + [i for i in timed[CONFIRM_TOP:] if candidates[i] == rule]


def choose(candidates: list[KernelConfig], times_ms: list, rule: KernelConfig) -> KernelConfig:
    """The fastest candidate, unless the rule's config (if timed) is within MARGIN of it: the fastest of a dozen
    noisy timings is optimistic, and a pick within noise of the rule's is as likely to be slower next time.
    Untimed candidates (None) are never chosen."""
    timed = [(t, c) for c, t in zip(candidates, times_ms) if t is not None]
    fastest_ms, fastest = min(timed, key=lambda tc: tc[0])
    rule_ms = next((t for t, c in timed if c == rule), None)
    return rule if rule_ms is not None and fastest_ms >= (1 - MARGIN) * rule_ms else fastest


# Every field of a config, so that one added later travels in the broadcast too (tma did not, for a while).
_FIELDS = dataclasses.fields(KernelConfig)


def to_ints(cfg: KernelConfig | None) -> list[int]:
    """A config as one integer per field (all 0 for None), for a collective."""
    return [0] * len(_FIELDS) if cfg is None else [int(getattr(cfg, f.name) or 0) for f in _FIELDS]


def from_ints(values: list[int]) -> KernelConfig | None:
    """to_ints's config back: flags (boolean fields) from 0/1, None for an optional field's 0."""
    if not any(values):
        return None
    fields = {
        f.name: bool(v) if isinstance(f.default, bool) else v or None if f.default is None else v
        for f, v in zip(_FIELDS, values)
    }
    return KernelConfig(**fields)
