"""What a new user runs first: the demo on 2 ranks (through the interpreter on CPU), the example script under
torchrun, the commands' help, and README's two commands, which are what CI runs."""

import functools
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_runs_and_reports(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fused_tp",
            "demo",
            "--world-size",
            "2",
            "--tokens",
            "8",
            "--hidden",
            "32",
            "--dtype",
            "float32",
            "--steps",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    expected_path = "triton" if "cuda" in out.stdout else "triton-interpreter"
    assert f"kernel path: {expected_path} (" in out.stdout
    row = r"^(\S+(?: \(\w+\))?)\s+([\d.e+\- ]+)\s+(PASS|FAIL)$"
    rows = {
        m.group(1): ([float(v) for v in m.group(2).split()], m.group(3)) for m in re.finditer(row, out.stdout, re.M)
    }
    assert set(rows) == {"y", "grad_x", "grad_w1 (column)", "grad_b1 (column)", "grad_w2 (row)", "grad_b2 (row)"}
    for name, ((tp_vs_dense, tp_vs_f64, dense_vs_f64, worst), verdict) in rows.items():
        assert tp_vs_f64 < 1e-5 and dense_vs_f64 < 1e-5 and tp_vs_dense < 1e-5, (name, out.stdout)
        assert verdict == "PASS" and worst <= 1, (name, out.stdout)
    assert re.search(r"^PASS: every element .* within the float32 bound", out.stdout, re.M), out.stdout
    if expected_path == "triton-interpreter":  # the GPU's copy engine is not mentioned where it does not run
        assert "TMA" not in out.stdout and "descriptor" not in out.stdout


def test_readme_commands_are_what_ci_runs():
    """.ci/run runs, in a fresh virtual environment, exactly the two commands of README's "Two commands" block."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"^## Two commands\n.*?^```\n(.*?)^```$", readme, re.M | re.S)
    assert block, "README.md: no code block under '## Two commands'"
    commands = block.group(1).splitlines()
    assert len(commands) == 2 and commands[0].endswith("python -m fused_tp demo"), commands
    assert commands[1].endswith("python -m pytest"), commands
    ci = subprocess.run(["bash", ".ci/run", "--print-commands"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ci.returncode == 0, ci.stderr
    assert ci.stdout.splitlines() == commands
    assert "python3 -m venv" in (ROOT / ".ci" / "run").read_text()


def test_commands_show_their_defaults_and_what_tune_needs():
    for command, wanted in (("demo", "(default: bfloat16)"), ("tune", "(default: all)")):
        out = subprocess.run(
            [sys.executable, "-m", "fused_tp", command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0 and wanted in out.stdout, out.stdout
    assert "TRITON_INTERPRET=1" in out.stdout  # tune --help says it needs a GPU or the interpreter


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, tune runs")
def test_tune_without_a_gpu_or_the_interpreter_says_what_it_needs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "fused_tp", "tune", "--shapes", "tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode != 0 and "needs a GPU, or TRITON_INTERPRET=1" in out.stderr, out.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(
    torch.cuda.device_count() == 1,
    reason="with one GPU the 2 ranks are CPU ranks through the "
    "interpreter, whose triton 3.6 (the GPU image's) cannot run the kernels' persistent loop",
)
def test_the_example_trains_under_torchrun_on_2_ranks():
    """examples/train_tp_mlp.py, as README shows it: gloo ranks on the CPU (NCCL where there is a GPU per rank)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "examples/train_tp_mlp.py",
            "--steps",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"^step \d+: loss ([\d.]+)$", out.stdout, re.M)]
    assert len(losses) == 2 and losses[1] < losses[0], out.stdout
    error = re.search(r"relative error ([\d.e+-]+) \(2 ranks", out.stdout)
    assert error and float(error.group(1)) < 1e-2, out.stdout


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="--tiny runs the kernels through Triton's interpreter, whose "
    "triton 3.6 (the GPU image's) cannot run their persistent loop; on GPUs the bench runs for real",
)
def test_tp_mlp_bench_agrees_with_megatron_and_dtensor_on_gloo_ranks():
    """bench/bench_tp_mlp.py --tiny under torchrun on 2 gloo ranks, plain, with --sequence-parallel and with
    --compile (every provider through torch.compile, inductor: fused_tp's functional collectives in an inductor
    graph): fused_tp's output and input gradient match the Megatron-style reference and DTensor's
    parallelize_module before anything is timed (the script exits non-zero otherwise), so the multi-GPU benchmark's
    providers compute the same MLP. On a machine with 2 GPUs this runs on NCCL."""
    env = dict(os.environ)
    if torch.cuda.device_count() < 2:  # CPU ranks: the kernels through the interpreter
        env["TRITON_INTERPRET"] = "1"
    for mode in ([], ["--sequence-parallel"], ["--compile"]):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "bench/bench_tp_mlp.py",
                "--tiny",
                "--steps",
                "1",
                *mode,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert re.search(r"^\| 8 \| 16 \| 24 \| 2 \|", out.stdout, re.M), out.stdout


def test_memory_bench_measures_what_sequence_parallelism_saves():
    """bench/bench_memory.py --tiny: rank 0 of TP 1-8 on a fake process group, the block's saved activations with
    and without sequence parallelism. The script exits non-zero where a rank saves less than README's formula; here
    the sequence-parallel rank saves less than the all-reduce one from TP 2 on, and the same at TP 1."""
    out = subprocess.run(
        [sys.executable, "bench/bench_memory.py", "--tiny", "--dtype", "fp32"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ratios = {
        int(m.group(1)): float(m.group(2))
        for m in re.finditer(
            r"^\| 64 \| 32 \| 96 \| (\d) \| 1 \| sequence-parallel \| \d+ \| \d+ \| ([\d.]+) \|", out.stdout, re.M
        )
    }
    assert ratios.keys() == {1, 2, 4, 8} and ratios[1] == 1.0, out.stdout
    assert ratios[8] < ratios[4] < ratios[2] < 1.0, ratios


def test_decode_summary_finds_a_known_launch_cost(tmp_path):
    """bench/bench_linear.py --summarize on rows whose fused_tp times are 3 us + 1.0 x cuBLAS's at one token count
    and 1.2 x cuBLAS's at another: the launch-cost fit gives back those lines, and the goals the lowest ratio."""
    rows = []
    for m, fixed, slope in ((4, 3.0, 1.0), (16, 0.0, 1.2)):
        for k, n, cublas_us in ((4096, 4096, 12.0), (8192, 1280, 11.0), (4096, 14336, 31.0), (14336, 4096, 33.0)):
            ours_us = fixed + slope * cublas_us
            rows.append(
                dict(op="forward", M=m, K=k, N=n, dtype_bytes=2, baseline_ms=cublas_us / 1e3, fused_tp_ms=ours_us / 1e3,
                     ratio=cublas_us / ours_us, copy_gbps=4000.0, baseline_weight_gbps=k * n * 2 / cublas_us / 1e3,
                     fused_tp_of_copy_rate=k * n * 2 / ours_us / 1e3 / 4000.0)
            )  # fmt: skip
    path = tmp_path / "decode.json"
    path.write_text(json.dumps({"rows": rows}))
    out = subprocess.run(
        [sys.executable, "bench/bench_linear.py", "--summarize", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    goals = json.loads(out.stdout)
    fit = goals["launch_cost_fit"]
    assert fit["4"]["fixed_us"] == pytest.approx(3.0, abs=1e-6) and fit["4"]["slope"] == pytest.approx(1.0)
    assert fit["16"]["fixed_us"] == pytest.approx(0.0, abs=1e-6) and fit["16"]["slope"] == pytest.approx(1.2)
    assert goals["rows"] == 8 and goals["lowest"] == pytest.approx(11 / 14)  # 8192 x 1280 at 4 tokens
    assert goals["geomean_by_tokens"]["16"] == pytest.approx(1 / 1.2)


def test_compare_tables_lists_the_launches_whose_config_a_new_table_changes(tmp_path):
    """bench/compare_tables.py --list: of the small preset's weight gradients, the launches whose table config
    differs between two tables, with both configs: a new entry with a reach changes only the launches within it
    (bench/NOTES.md, session 51), the same entry without one every launch it is nearest; a malformed table, or timing
    another GPU's entries, exits naming its option."""
    far = {"config": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}}
    near = {"config": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}, "reach": 1.6}

    def table(name, entries):
        path = tmp_path / name
        path.write_text(json.dumps({"format": 1, "gpus": {"g": {"wgrad": {"bf16": {"tma": entries}}}}}))
        return str(path)

    old = table("old.json", {"8192x8192x4096": far})
    args = [sys.executable, "bench/compare_tables.py", "--old", old, "--gpu", "g", "--product", "wgrad", "--list"]

    def listed(new):
        out = subprocess.run([*args, "--new", new, "--shapes", "small"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.splitlines()

    # 256 x 256 at 64 and 128 tokens: launches 256x256x64 (0 steps from the entry) and 256x256x128 (1 step); at 16
    # tokens 2 steps, beyond the reach, as is every wider layer
    got = listed(table("reach.json", {"8192x8192x4096": far, "256x256x64": near}))
    assert got == [
        "2 of 18 layers' wgrad launches take another config (g, bf16)",
        "  64 x 256 -> 256: launch 256x256x64 tma: 128x128x64 w8 s3 -> 64x64x64 w4 s3",
        "  128 x 256 -> 256: launch 256x256x128 tma: 128x128x64 w8 s3 -> 64x64x64 w4 s3",
    ], got
    unlimited = {**near}
    del unlimited["reach"]
    got = listed(table("any.json", {"8192x8192x4096": far, "256x256x64": unlimited}))
    assert got[0] == "18 of 18 layers' wgrad launches take another config (g, bf16)", got
    out = subprocess.run([*args, "--new", str(tmp_path / "none.json")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().startswith("--new: tuned table"), out.stderr[-3000:]
    # timing runs only the entries of the machine's own launches (the interpreter's here: tests/test_tune.py's
    # decode_run test times them); another GPU's it refuses, naming the option
    out = subprocess.run(args[:-1], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().startswith("--gpu g: its entries can only be listed here"), out


def test_compare_tables_pins_the_old_config_where_the_new_table_ran_slower(tmp_path):
    """bench/compare_tables.py --pin's entries, from timed rows: one of reach 0 with the old table's config at the
    bucket of each launch the new table ran more than 5% slower (one per bucket and path, however many launches
    share it), none where it ran within 5%, and none in a bucket the new table has an entry of its own in (printed
    instead); written into the table file beside its entries, which still load, and the pin serves its own bucket
    only (bench/NOTES.md, session 52)."""
    spec = importlib.util.spec_from_file_location("fused_tp_bench_compare_tables", ROOT / "bench" / "compare_tables.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    old = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    old = {**old, "persistent": True, "split_k": None, "tma": True, "tma_c": True}

    def row(launch, ratio, path="tma"):
        return dict(
            layer_MKN=list(launch),
            launch_mnk=list(launch),
            path=path,
            old_config_dict=old,
            old_us=20.0,
            torch_us=19.0,
            new_over_old=ratio,
        )

    rows = [
        row((128, 6144, 4096), 1.21),
        row((128, 6144, 4000), 1.10),  # the same bucket: its first row's timing kept
        row((128, 7168, 4096), 1.05),  # within 5%: no pin
        row((32, 512, 4096), 1.30),  # the new table's own bucket: not pinned
        row((32, 512, 4096), 1.30, "pointers"),
    ]
    near = {"config": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}}
    table = tmp_path / "t.json"
    own_key = compare.tables.table_key(32, 512, 4096)
    new = {"tma": {"128x4096x4096": near, own_key: near}}
    table.write_text(json.dumps({"format": 1, "gpus": {"g": {"dgrad": {"bf16": new}, "wgrad": {"bf16": new}}}}))
    own = compare.own_buckets(table, "g", "dgrad", "bf16")
    assert own == {("tma", "128x4096x4096"), ("tma", own_key)} and not compare.own_buckets(
        tmp_path / "x", "g", "dgrad", "bf16"
    )
    pins, skipped = compare.pin_entries(rows, own)
    key = compare.tables.table_key(128, 6144, 4096)
    assert sorted(pins) == ["pointers", "tma"] and sorted(pins["tma"]) == [key], pins
    assert pins["tma"][key]["reach"] == 0 and pins["tma"][key]["config"] == old and pins["tma"][key]["ms"] == 0.02
    assert [r["path"] for r in skipped] == ["tma"] and skipped[0]["launch_mnk"] == [32, 512, 4096]
    compare.write_pins(table, "g", "dgrad", "bf16", pins)
    entries = compare.tables.load_table(table)["g"][("dgrad", "bf16", "tma")]
    assert sorted(entries) == sorted([(128, 4096, 4096), (32, 512, 4096), compare.tables.bucket_of(128, 6144, 4096)])
    shipped = compare.tables.TABLE_DIR
    compare.tables.TABLE_DIR = tmp_path
    compare.tables.tuned_table.cache_clear()
    try:
        pick = functools.partial(compare.tables.table_config, "g", "dgrad", dtype=torch.bfloat16, tma=True)
        assert pick(128, 6144, 4096).BLOCK_N == 128  # the pin, in its own bucket
        assert pick(128, 7168, 4096).BLOCK_N == 64  # one bucket over: the nearest entry, as before the pin
    finally:
        compare.tables.TABLE_DIR = shipped
        compare.tables.tuned_table.cache_clear()


def test_a_steps_launches_are_read_off_device_events_by_position():
    """bench/common.py's per_launch, which bench_layers.py --launches reads a step's launches with: device events of
    four steps of three launches, out of order, give each launch's mean in launch order; steps that launched other
    kernels, or an event count that is not a whole number of steps, raise rather than give a mean of different
    kernels."""
    # by its path: "common" alone could name another module already imported
    spec = importlib.util.spec_from_file_location("fused_tp_bench_common", ROOT / "bench" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    per_launch = common.per_launch
    step = [("matmul_kernel", 10.0), ("matmul_kernel", 20.0), ("colsum_kernel", 2.0)]
    events = [(name, 100.0 * s + i, us + s) for s in range(4) for i, (name, us) in enumerate(step)]
    got = per_launch(events[::-1], 4)
    assert got == [("matmul_kernel", 11.5), ("matmul_kernel", 21.5), ("colsum_kernel", 3.5)]
    with pytest.raises(ValueError, match="launch 2 of a step is not one kernel"):
        per_launch([*events[:-1], ("Memset (Device)", 399.0, 1.0)], 4)
    with pytest.raises(ValueError, match="11 device events do not split into 4 steps"):
        per_launch(events[:-1], 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script times real shapes for minutes")
def test_the_first_call_bench_runs_and_the_gpu_benches_say_what_they_need():
    """bench/bench_first_call.py without a GPU: the table and autotuning processes on tiny shapes through the
    interpreter, their tables printed, then a line saying they time the interpreter, and nothing written under
    bench/results/ (a check of the script); the benches that time against cuBLAS exit with one line naming what
    they need, not a traceback."""
    results = ROOT / "bench" / "results" / "cpu"
    before = sorted(results.iterdir()) if results.exists() else []
    out = subprocess.run(
        [sys.executable, "bench/bench_first_call.py"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^\| wgrad \| 33 \| 40 \| 17 \|", out.stdout, re.M), out.stdout
    assert out.stdout.rstrip().endswith("a check of the script, not speed"), out.stdout[-500:]
    assert (sorted(results.iterdir()) if results.exists() else []) == before
    for script in ("bench_linear.py", "bench_layers.py", "bench_compile.py", "sweep_configs.py"):
        out = subprocess.run([sys.executable, f"bench/{script}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        want = f"{script}: needs a CUDA GPU (it times fused_tp against cuBLAS on one); none is visible"
        assert out.returncode == 1 and out.stderr.strip() == want, out.stderr[-3000:]
