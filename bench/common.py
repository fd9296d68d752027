"""What the bench scripts share: the card and versions, interleaved timing, and writing results side by side."""

from __future__ import annotations

import json
import pathlib
import statistics
import time

import torch
import triton
import triton.testing

from fused_tp.kernels import tables

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DTYPES = tables.DTYPES  # the --dtype names


def env() -> dict:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": name, "torch": torch.__version__, "triton": triton.__version__}


def require_gpu(script: str) -> None:
    """Exit with a message naming `script` where no CUDA GPU is visible: its timings are against cuBLAS."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script}: needs a CUDA GPU (it times fused_tp against cuBLAS on one); none is visible")


def results_dir(gpu: str) -> pathlib.Path:
    path = RESULTS / tables.gpu_slug(gpu)
    path.mkdir(parents=True, exist_ok=True)
    return path


def time_interleaved(providers: dict, rounds: int = 3, timer=None) -> dict:
    """{name: (median ms, spread)}: each provider timed by do_bench (median; it clears L2 before every call), or by
    `timer(fn) -> ms`, `rounds` times, alternating the order; spread is (max - min) / median over the rounds."""
    timer = timer or (lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = {name: [] for name in providers}
    names = list(providers)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timer(providers[name]))
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = (med, (max(ts) - min(ts)) / med)
    return out


# The caching allocator's counters of calls into the driver (torch.cuda.memory_stats): a cudaFree, and the
# synchronisation before the allocator releases cached blocks, wait for the GPU, so a step that makes them runs its
# host time and its GPU time one after the other.
DRIVER_CALLS = ("num_device_alloc", "num_device_free", "num_sync_all_streams", "num_alloc_retries")


def launch_profile(step, steps: int = 10) -> dict:
    """What one eager step costs besides its wall time, on the GPU: its launches in order with each one's GPU time
    (the mean over `steps` steps, from torch.profiler's device events) and their sum; the host's time to issue a
    step (`steps` steps back to back, no synchronisation inside: the host's own cost while the GPU's queue has
    room); and the caching allocator's calls into the driver during those steps (DRIVER_CALLS, each non-zero one).
    `error` says why the launches are not listed where the steps did not launch alike (per_launch)."""
    step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    host_us = (time.perf_counter() - start) / steps * 1e6
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    driver = {k: after.get(k, 0) - before.get(k, 0) for k in DRIVER_CALLS if after.get(k, 0) != before.get(k, 0)}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    device = torch.autograd.DeviceType.CUDA
    events = [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == device]
    gpu_us = sum(us for _, _, us in events) / steps
    try:
        launches, error = per_launch(events, steps), None
    except ValueError as e:  # the sum still holds; which launch took what does not
        launches, error = [], str(e)
    return {"host_us": host_us, "gpu_us": gpu_us, "launches": launches, "driver_calls": driver, "error": error}


def per_launch(events: list[tuple[str, float, float]], steps: int) -> list[tuple[str, float]]:
    """[(kernel name, mean us)] of one step's launches in launch order, from the (name, start, us) device events of
    `steps` steps that launch the same kernels: the events ordered by start, the i-th launch of every step averaged.
    ValueError where they do not split so (a step that launched other kernels than the rest)."""
    events = sorted(events, key=lambda e: e[1])
    if steps < 1 or not events or len(events) % steps:
        raise ValueError(f"{len(events)} device events do not split into {steps} steps of the same launches")
    per = len(events) // steps
    out = []
    for i in range(per):
        same = events[i::per]
        names = sorted({name for name, _, _ in same})
        if len(names) != 1:
            raise ValueError(f"launch {i} of a step is not one kernel in every step: {names}")
        out.append((names[0], sum(us for _, _, us in same) / steps))
    return out


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else "-" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write(path: pathlib.Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")


def geomean(xs) -> float:
    xs = list(xs)
    return statistics.geometric_mean(xs) if xs else float("nan")


def plot_ratios(rows: list[dict], path: pathlib.Path, title: str, series: str, label) -> None:
    """Bars of each row's ratio: one bar group per case (`label(row)`), one colour per value of `row[series]`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r[series] for r in rows))
    cases = list(dict.fromkeys(label(r) for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.7), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ratio = {label(r): r["ratio"] for r in rows if r[series] == name}
        ax.bar([j + i * width for j in range(len(cases))], [ratio.get(c, 0) for c in cases], width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed vs baseline (baseline ms / fused_tp ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
