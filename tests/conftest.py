"""Test set-up: where kernels run, hypothesis profiles, and the pools of gloo ranks.

Without a GPU the Triton kernels run through Triton's interpreter; TRITON_INTERPRET must be set before fused_tp's
kernel module is imported, which is why it is set here, before any test module imports fused_tp. With a GPU the
kernels run compiled, and the multi-rank tests run gloo ranks that share the GPU.
"""

import os

import pytest

# bench/gpu_run.sh runs the suite in pytest-xdist workers spread over the GPUs listed in FUSED_TP_TEST_GPUS
# ("0,1"): each worker sees one of them as "cuda", chosen before anything initialises CUDA.
if os.environ.get("FUSED_TP_TEST_GPUS") and os.environ.get("PYTEST_XDIST_WORKER"):
    _gpus = os.environ["FUSED_TP_TEST_GPUS"].split(",")
    os.environ["CUDA_VISIBLE_DEVICES"] = _gpus[int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw")) % len(_gpus)]

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# "ci" (the default) is derandomized so that CI runs the same examples every time; "dev" explores more; "gpu", a
# quarter as many examples as ci, for a lent GPU's 10-minute call (bench/gpu_run.sh), where nearly every example
# compiles a new kernel specialisation and test_kernels alone ran past the call at ci's count (bench/NOTES.md,
# sessions 14-16); the interpreter runs ci's on every CI run.
# deadline=None: the first call of a new kernel specialisation compiles.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=100, **_common)
settings.register_profile("gpu", derandomize=True, max_examples=25, **_common)
settings.register_profile("dev", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture
def set_tf32():
    """set_tf32(flag) sets torch.backends.cuda.matmul.allow_tf32 (which F.linear and fused_tp follow) for this test;
    the setting it found is restored after the test, whatever happened. Not monkeypatch.setattr: the flag is served
    by the module's __getattr__, so pytest 9's undo deletes an attribute that was never stored on it and raises,
    leaving the test's other patches in place for every later test."""
    before = torch.backends.cuda.matmul.allow_tf32

    def set_(flag: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = flag

    try:
        yield set_
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture
def fresh_plans():
    """Launch plans are cached (fused_tp.kernels.plan): a test that changes what a plan depends on (a layout rule,
    the interpreter switch, the tuned tables) starts and ends with none, so that neither it nor a later test runs a
    plan made under other rules."""
    from fused_tp.kernels import plan

    plan.clear_caches()
    yield
    plan.clear_caches()


@pytest.fixture(scope="session")
def rank_pools():
    """rank_pools(world_size) -> a RankPool of long-lived gloo ranks, started on first use, closed at the end."""
    from rankpool import RankPool

    pools = {}

    def get(world_size):
        from rankpool import BACKEND

        # NCCL needs a GPU per rank: a test with a fixed world (the subgroup test's 3) skips on fewer GPUs
        if BACKEND == "nccl" and torch.cuda.device_count() < world_size:
            pytest.skip(f"NCCL ranks need a GPU each: {world_size} ranks, {torch.cuda.device_count()} GPUs")
        if world_size not in pools:
            pools[world_size] = RankPool(world_size, DEVICE)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()
