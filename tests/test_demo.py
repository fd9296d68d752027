"""The demo runs end to end on 2 ranks (through the interpreter on CPU), and the README's commands are the ones CI runs."""

import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_runs_and_reports(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fused_tp", "demo", "--world-size", "2", "--tokens", "8", "--hidden", "32",
         "--dtype", "float32", "--steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    expected_path = "triton" if "cuda" in out.stdout else "triton-interpreter"
    assert f"kernel path: {expected_path} (" in out.stdout
    rows = {m.group(1): [float(v) for v in m.group(2).split()] for m in re.finditer(r"^(\S+(?: \(\w+\))?)\s+([\d.e+\- ]+)$", out.stdout, re.M)}
    assert set(rows) == {"y", "grad_x", "grad_w1 (column)", "grad_b1 (column)", "grad_w2 (row)", "grad_b2 (row)"}
    for name, (tp_vs_dense, tp_vs_f64, dense_vs_f64) in rows.items():
        assert tp_vs_f64 < 1e-5 and dense_vs_f64 < 1e-5 and tp_vs_dense < 1e-5, (name, out.stdout)


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(pip install .*)$", readme, re.M)
    assert len(commands) == 2 and commands[0].endswith("python -m fused_tp demo"), commands
    assert commands[1].endswith("python -m pytest"), commands
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="--tiny runs the kernels through Triton's interpreter, whose "
                    "triton 3.6 (the GPU image's) cannot run their persistent loop; on GPUs the bench runs for real")
def test_tp_mlp_bench_agrees_with_megatron_and_dtensor_on_gloo_ranks():
    """bench/bench_tp_mlp.py --tiny under torchrun on 2 gloo ranks: fused_tp's output and input gradient match the
    Megatron-style reference and DTensor's parallelize_module before anything is timed (the script exits non-zero
    otherwise), so the multi-GPU benchmark's three providers compute the same MLP. On a machine with 2 GPUs this
    runs on NCCL."""
    import os

    import torch

    env = dict(os.environ)
    if torch.cuda.device_count() < 2:  # CPU ranks: the kernels through the interpreter
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "bench/bench_tp_mlp.py", "--tiny",
         "--steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^\| 5 \| 16 \| 24 \| 2 \|", out.stdout, re.M), out.stdout
