"""Faults: a rank that dies or stalls mid-step, or raises on a bad argument that only it has (rank guard off), ends
the step on the other ranks within the process group's timeout, instead of a hang: over gloo with an error, over
NCCL (FUSED_TP_TEST_BACKEND=nccl, a GPU per rank) with an error or with the watchdog's abort of the process, which is
what torch's default TORCH_NCCL_ASYNC_ERROR_HANDLING does. Real ranks, started fresh for each case (a fault leaves
a group unusable).
"""

import multiprocessing as mp
import os
import queue
import tempfile
import time

import dist_cases
import pytest
import torch
from rankpool import BACKEND

TIMEOUT_S = 5  # the process group's timeout in these cases (the demo uses 120 s, the test pools 30 s)
# How long after the timeout a rank may take to end: a loaded 2-core machine (gloo); NCCL's watchdog, which polls
# and then tears the communicators down.
MARGIN_S = {"gloo": 5, "nccl": 30}[BACKEND]


@pytest.mark.parametrize("fault", ["dies", "stalls", "bad argument"])
@pytest.mark.parametrize("world", [2, 3])
def test_a_failed_rank_ends_the_others_step_without_a_hang(device, world, fault):
    if BACKEND == "nccl" and torch.cuda.device_count() < world:
        pytest.skip(f"NCCL ranks need a GPU each: {world} ranks, {torch.cuda.device_count()} GPUs")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    survivors = range(world - 1)
    entered, ends, bad = {}, {}, None
    with tempfile.TemporaryDirectory() as tmp:
        init_method = "file://" + os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=dist_cases.faulty_step,
                daemon=True,
                args=(rank, world, init_method, device, TIMEOUT_S, fault, BACKEND, results),
            )
            for rank in range(world)
        ]
        for p in procs:
            p.start()
        # Start-up (spawn, import, the first forward) takes a few seconds; then every survivor must end its step
        # within the timeout and the margin.
        deadline = time.monotonic() + 60 + 2 * (TIMEOUT_S + MARGIN_S)
        try:
            while len(ends) < len(survivors):
                try:
                    rank, kind, *rest = results.get(timeout=0.2)
                except queue.Empty:
                    for r in survivors:
                        if r not in ends and procs[r].exitcode is not None:
                            assert r in entered, f"rank {r} ended (exit code {procs[r].exitcode}) before the step"
                            ends[r] = ("aborted", f"exit code {procs[r].exitcode}", time.time() - entered[r])
                    if time.monotonic() > deadline:
                        pytest.fail(f"the surviving ranks of {world} did not return, raise or end: a hang")
                    continue
                if kind == "entered":
                    entered[rank] = rest[0]
                elif rank == world - 1:
                    bad = (kind, *rest)
                else:
                    ends[rank] = (kind, *rest)
        finally:
            for p in procs:
                p.kill()
                p.join()
    if fault == "bad argument":  # the rank with the bad argument raised its own error, before any collective
        assert bad is not None and bad[0] == "ValueError" and bad[1].startswith("input: expected last dim"), bad
    ways = ("RuntimeError", "DistBackendError") + (("aborted",) if BACKEND == "nccl" else ())
    for rank, (error, message, seconds) in sorted(ends.items()):
        assert error is not None, f"rank {rank}: the step returned although the last rank {fault}"
        assert error in ways, f"rank {rank}: {error}: {message}"
        assert seconds < TIMEOUT_S + MARGIN_S, f"rank {rank}: ended {seconds:.1f} s in, past the {TIMEOUT_S} s timeout"
        if fault != "dies" and error != "aborted":
            assert "timed out" in message.lower() or "timeout" in message.lower(), f"rank {rank}: {message}"
