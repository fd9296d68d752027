"""A pool of long-lived gloo ranks for the multi-process tests.

The parent process draws every hypothesis example and sends the same call to every rank, so all ranks run the
same example and a shrinking example cannot split them. The ranks start once per pool (once per test run) and
serve many calls; each call has a timeout; a pool whose call failed or timed out is torn down and starts afresh
on its next call, since a rank that raised may have left the others waiting inside a collective.
"""

import importlib
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(seconds=30)
# gloo by default (ranks share the CPU, or one GPU); FUSED_TP_TEST_BACKEND=nccl runs the ranks on a GPU each.
BACKEND = os.environ.get("FUSED_TP_TEST_BACKEND", "gloo")


class RankError(AssertionError):
    pass


def _worker(rank, world_size, init_method, device, tasks, results):
    torch.set_num_threads(1)  # several ranks share two cores
    if BACKEND == "nccl":
        torch.cuda.set_device(rank)  # "cuda" in the cases is then this rank's own GPU
    dist.init_process_group(
        BACKEND, init_method=init_method, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    while (task := tasks.get()) is not None:
        name, args = task
        try:
            module, qualname = name.split(":")
            results.put((rank, True, getattr(importlib.import_module(module), qualname)(*args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int, device: str, timeout: float = 120.0):
        self.world_size, self.device, self.timeout = world_size, device, timeout
        self._procs, self._tasks = [], []

    def _start(self):
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory()
        init_method = "file://" + os.path.join(self._dir.name, "store")
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                daemon=True,
                args=(rank, self.world_size, init_method, self.device, self._tasks[rank], self._results),
            )
            for rank in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args):
        """fn(*args) on every rank (fn must be importable by its module name); the list of results by rank."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((f"{fn.__module__}:{fn.__qualname__}", args))
        outs, errors = {}, {}
        deadline = time.monotonic() + self.timeout
        while len(outs) + len(errors) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=1.0)
            except queue.Empty as empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    waiting = sorted(set(range(self.world_size)) - set(outs) - set(errors))
                    self.close(graceful=False)
                    why = f"ranks {dead} died" if dead else f"timed out after {self.timeout:.0f} s"
                    raise RankError(
                        f"{fn.__qualname__} on {self.world_size} ranks: {why}; waiting for {waiting}"
                    ) from empty
                continue
            (outs if ok else errors)[rank] = value
        if errors:
            self.close(graceful=False)
            raise RankError(
                "\n".join(f"rank {r} of {self.world_size} raised:\n{tb}" for r, tb in sorted(errors.items()))
            )
        return [outs[r] for r in range(self.world_size)]

    def close(self, graceful: bool = True):
        for q, p in zip(self._tasks, self._procs):
            if graceful and p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=10 if graceful else 0)
            if p.is_alive():
                p.kill()
                p.join()
        if self._procs:
            self._dir.cleanup()
        self._procs = []
