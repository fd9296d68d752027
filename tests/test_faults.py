"""Faults: a rank that dies or stalls mid-step, or raises on a bad argument that only it has (rank guard off), ends
the step on the other ranks with an error within the process group's timeout, instead of a hang. Real gloo ranks,
started fresh for each case (a fault leaves a group unusable).
"""

import multiprocessing as mp
import os
import queue
import tempfile

import pytest

import dist_cases

TIMEOUT_S = 5  # the process group's timeout in these cases (the demo uses 120 s, the test pools 30 s)


@pytest.mark.parametrize("fault", ["dies", "stalls", "bad argument"])
@pytest.mark.parametrize("world", [2, 3])
def test_a_failed_rank_ends_the_step_with_an_error(device, world, fault):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_method = "file://" + os.path.join(tmp, "store")
        procs = [ctx.Process(target=dist_cases.faulty_step, daemon=True,
                             args=(rank, world, init_method, device, TIMEOUT_S, fault, results))
                 for rank in range(world)]  # fmt: skip
        for p in procs:
            p.start()
        try:
            # Start-up (spawn, import, the first forward) takes a few seconds; the error must then come within
            # the timeout, with a margin for a loaded 2-core machine.
            outs = [results.get(timeout=60 + 2 * TIMEOUT_S) for _ in range(world - (fault != "bad argument"))]
        except queue.Empty:
            pytest.fail(f"the surviving ranks of {world} did not return or raise: a hang")
        finally:
            for p in procs:
                p.kill()
                p.join()
    if fault == "bad argument":  # the rank with the bad argument raised its own error, before any collective
        (bad,) = [o for o in outs if o[0] == world - 1]
        assert bad[1] == "ValueError" and bad[2].startswith("input: expected last dim"), bad
        outs = [o for o in outs if o[0] != world - 1]
    for rank, error, message, seconds in outs:
        assert error is not None, f"rank {rank}: the step returned although the last rank {fault}"
        assert error in ("RuntimeError", "DistBackendError"), f"rank {rank}: {error}: {message}"
        assert seconds < TIMEOUT_S + 5, f"rank {rank}: raised after {seconds:.1f} s, past the {TIMEOUT_S} s timeout"
        if fault != "dies":
            assert "timed out" in message.lower() or "timeout" in message.lower(), f"rank {rank}: {message}"
