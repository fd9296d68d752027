"""What the bench scripts share: the card and versions, interleaved timing, and writing results side by side."""

from __future__ import annotations

import json
import pathlib
import statistics

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
