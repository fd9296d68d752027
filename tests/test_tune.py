"""Tuned tables and pinning: bucketing and the nearest-bucket lookup, malformed tables, FUSED_TP_CONFIG and
pin_config, configs that do not fit, and `python -m fused_tp tune` end to end under the interpreter with a fake
timer, its table then driving the kernels' first call; bench/decode_run.sh's steps on a copy of the repository."""

import argparse
import dataclasses
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from fused_tp import kernels, shapes, tune
from fused_tp.kernels import autotune, configs, jit, layout, matmul, plan, tables
from fused_tp.tolerance import act_tol, activation_grad_reference, assert_close, linear_reference, tol


@pytest.fixture
def set_env():
    """set_env(name, value): an environment variable for this test, re-read by fused_tp (which reads its variables
    at import); the old values come back, and are re-read, after it."""
    saved = {}

    def set_(name, value):
        saved.setdefault(name, os.environ.get(name))
        os.environ[name] = value
        configs.read_environment()

    yield set_
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    configs.read_environment()


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    """An empty directory of tuned tables in place of the shipped one; the caches that read it are cleared."""
    monkeypatch.setattr(tables, "TABLE_DIR", tmp_path)
    tables.tuned_table.cache_clear()
    plan.clear_caches()
    yield tmp_path
    tables.tuned_table.cache_clear()
    plan.clear_caches()


def _entry(cfg: configs.KernelConfig) -> dict:
    return {"config": cfg.to_dict(), "ms": 1.0}


A = configs.KernelConfig(64, 128, 32, num_warps=4, num_stages=2)
B = configs.KernelConfig(128, 64, 64, num_warps=8, num_stages=2)


def _write(table_dir, gpus, name="t.json"):
    (table_dir / name).write_text(json.dumps({"format": 1, "gpus": gpus}))


def test_buckets_and_the_nearest_entry(table_dir):
    assert [configs.bucket(n) for n in (0, 1, 2, 3, 16, 17, 1000, 4096, 4097)] == [0, 1, 2, 4, 16, 32, 1024, 4096, 8192]
    _write(table_dir, {"gpu x": {"fwd": {"bf16": {"tma": {"16x8192x16384": _entry(A), "8192x8192x8192": _entry(B)}}}}})
    pick = lambda *mnk, product="fwd", dtype=torch.bfloat16, tma=True, gpu="gpu x": tables.table_config(  # noqa: E731
        gpu, product, *mnk, dtype, tma
    )
    assert pick(16, 8192, 14336) == A  # its own bucket
    assert pick(7000, 8000, 9000) == B  # 8192 x 8192 x 16384: one log2 step from B's bucket, more from A's
    assert pick(100, 8192, 16384) == A  # nearer A (16 rows) than B (8192)
    assert pick(16, 8192, 14336, product="dgrad") is None  # no entry for the product, dtype, path or GPU
    assert pick(16, 8192, 14336, dtype=torch.float16) is None
    assert pick(16, 8192, 14336, tma=False) is None
    assert pick(16, 8192, 14336, gpu="gpu y") is None


def test_an_entry_with_a_reach_serves_only_the_shapes_within_it(table_dir):
    """An entry with a reach (tune --reach: the small layers' entries) serves the shapes at most that many log2
    steps from its bucket; beyond, the shape takes the entry it would take without it, or none (bench/NOTES.md,
    session 51: small layers' entries ran Llama shards up to 2.5x slower than the entries they displaced)."""
    near = {**_entry(A), "reach": 1.6}
    _write(table_dir, {"g": {"wgrad": {"bf16": {"tma": {"1024x1024x64": near, "4096x2048x4096": _entry(B)}}}}})
    pick = lambda M, N, K: tables.table_config("g", "wgrad", M, N, K, torch.bfloat16, True)  # noqa: E731
    assert pick(1024, 1024, 64) == A  # its own bucket
    assert pick(768, 1024, 128) == A  # log2(4/3) + 1 = 1.42 steps away
    assert pick(1024, 1024, 192) == A  # log2(3) = 1.58
    assert pick(4096, 1024, 64) == B  # 2 steps from A's bucket, 7 from B's: beyond A's reach, so B, the nearest left
    _write(table_dir, {"g": {"wgrad": {"bf16": {"tma": {"1024x1024x64": near}}}}})
    tables.tuned_table.cache_clear()
    assert pick(4096, 1024, 64) is None and pick(1024, 1024, 64) == A
    _write(table_dir, {"g": {"wgrad": {"bf16": {"tma": {"1024x1024x64": _entry(A)}}}}})  # no reach: any distance
    tables.tuned_table.cache_clear()
    assert pick(16384, 16384, 16384) == A


def test_half_step_buckets_keep_narrow_shards_apart_and_old_entries_serving(table_dir):
    """Table buckets are powers of two and 1.5 times them: a shard between two powers of two takes its own half-step
    entry where the table has one, else, as when buckets were powers of two, the entry of the power above."""
    sizes = (0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 1280, 2560, 3072, 3073, 4096, 7168, 10240, 14336)
    assert [tables.table_bucket(n) for n in sizes] == [
        *(0, 1, 2, 3, 4, 6, 6, 8, 12, 16),
        *(1536, 3072, 3072, 4096, 4096, 8192, 12288, 16384),
    ]
    assert tables.table_key(64, 2560, 7168) == "64x3072x8192"
    pick = lambda M, N, K: tables.table_config("g", "fwd", M, N, K, torch.bfloat16, True)  # noqa: E731
    _write(table_dir, {"g": {"fwd": {"bf16": {"tma": {"64x4096x8192": _entry(A), "64x2048x8192": _entry(B)}}}}})
    assert [pick(64, n, 8192) for n in (2560, 3072, 3500, 4096, 1600, 2048)] == [A, A, A, A, B, B]
    _write(table_dir, {"g": {"fwd": {"bf16": {"tma": {"64x4096x8192": _entry(A), "64x3072x8192": _entry(B)}}}}})
    tables.tuned_table.cache_clear()
    assert [pick(64, n, 8192) for n in (2560, 3072, 3073, 4096)] == [B, B, A, A]
    assert pick(64, 2560, 7168) == B and pick(48, 2560, 6000) == B  # the nearest in the other dims too


def test_fp32_operands_take_the_table_of_their_precision(table_dir):
    """fp32 with TF32 on and off run at speeds 4-8x apart: each has its own entries, and neither takes the other's."""
    _write(
        table_dir, {"g": {"fwd": {"tf32": {"tma": {"16x16x16": _entry(A)}}, "fp32": {"tma": {"16x16x16": _entry(B)}}}}}
    )
    assert tables.table_config("g", "fwd", 16, 16, 16, torch.float32, True, tf32=True) == A
    assert tables.table_config("g", "fwd", 16, 16, 16, torch.float32, True, tf32=False) == B
    _write(table_dir, {"g": {"fwd": {"tf32": {"tma": {"16x16x16": _entry(A)}}}}})
    tables.tuned_table.cache_clear()
    assert tables.table_config("g", "fwd", 16, 16, 16, torch.float32, True, tf32=False) is None
    assert tables.table_config("g", "fwd", 16, 16, 16, torch.bfloat16, True, tf32=True) is None  # 16-bit: "bf16"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not readable JSON"),
        ('{"format": 2, "gpus": {}}', 'expected {"format": 1'),
        ('{"format": 1, "gpus": {"g": {"fwdd": {}}}}', "unknown product 'fwdd'"),
        ('{"format": 1, "gpus": {"g": {"fwd": {"int8": {}}}}}', "unknown dtype 'int8'"),
        ('{"format": 1, "gpus": {"g": {"fwd": {"bf16": {"tmaa": {}}}}}}', "unknown path 'tmaa'"),
        (
            '{"format": 1, "gpus": {"g": {"fwd": {"bf16": {"tma": {"16x8": {"config": {}}}}}}}}',
            "bucket '16x8' is not MxNxK",
        ),
        (
            '{"format": 1, "gpus": {"g": {"fwd": {"bf16": {"tma": {"16x8x8": {"ms": 1}}}}}}}',
            "expected an object with a 'config'",
        ),
        (
            '{"format": 1, "gpus": {"g": {"fwd": {"bf16": {"tma": {"16x8x8": {"config": {}, "reach": -1}}}}}}}',
            "g/fwd/bf16/tma/16x8x8: 'reach' must be a number >= 0, got -1",
        ),
        (
            '{"format": 1, "gpus": {"g": {"fwd": {"bf16": {"tma": {"16x8x8": {"config": {}, "reach": "2"}}}}}}}',
            "'reach' must be a number >= 0, got '2'",
        ),
        (
            '{"format": 1, "gpus": {"g": {"fwd": {"bf16": {"tma": {"16x8x8": {"config": {"BLOCK_Q": 64}}}}}}}}',
            "g/fwd/bf16/tma/16x8x8: unknown config field 'BLOCK_Q'",
        ),
        (
            '{"format": 1, "gpus": {"g": {"fwd": {"bf16": {"tma": {"16x8x8": {"config": {"BLOCK_M": 48, "BLOCK_N": 64, '
            '"BLOCK_K": 64}}}}}}}}',
            "BLOCK_M: expected 1 (the GEMV form) or a power of two of at least 16",
        ),
    ],
)
def test_a_malformed_table_raises_naming_the_file_and_entry(table_dir, content, message):
    (table_dir / "bad.json").write_text(content)
    with pytest.raises(ValueError, match="tuned table .*bad.json") as e:
        tables.tuned_table("g")
    assert message in str(e.value)


def test_a_table_entry_configures_the_launch(table_dir, device):
    x, w, b = torch.randn(16, 64, device=device), torch.randn(32, 64, device=device), torch.randn(32, device=device)
    gpu = plan.device(x.get_device()).gpu
    route = "tma" if _takes_descriptors(x, w) else "pointers"
    _write(table_dir, {gpu: {"fwd": {"fp32": {route: {"16x32x64": _entry(A)}}}}})
    before = kernels.path_counts.copy()
    y = kernels.linear(x, w, b)
    assert kernels.path_counts["config_table"] == before["config_table"] + 1
    cfg, source = plan.pick_config(
        16, 32, 64, torch.float32, interpreted=matmul.INTERPRETED, tma=route == "tma", slots=3, product="fwd", gpu=gpu
    )
    assert source == "table" and dataclasses_equal(cfg, A)
    assert_close("y", y, *linear_reference(x, w, b), tol(torch.float32, 64, tf32=device == "cuda"))


def test_pin_by_environment_variable_and_context_manager(device, set_env):
    x, w = torch.randn(5, 40, device=device), torch.randn(7, 40, device=device)
    set_env("FUSED_TP_CONFIG", "BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2, persistent=0")
    assert configs.pinned_config() == configs.KernelConfig(32, 32, 16, num_warps=4, num_stages=2, persistent=False)
    before = kernels.path_counts["config_pinned"]
    y = kernels.linear(x, w)
    assert kernels.path_counts["config_pinned"] == before + 1
    assert_close("y", y, *linear_reference(x, w), tol(torch.float32, 40, tf32=device == "cuda"))
    with configs.pin_config(A):  # the context manager wins over the environment
        assert configs.pinned_config() == A
    set_env("FUSED_TP_CONFIG", "BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2, tma=0")
    assert not configs.pinned_config().tma
    set_env("FUSED_TP_CONFIG", "BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2, tma_c=0")
    assert configs.pinned_config().tma and not configs.pinned_config().tma_c
    set_env("FUSED_TP_CONFIG", "BLOCK_M=32,BLOCK_N")
    with pytest.raises(ValueError, match="FUSED_TP_CONFIG: expected NAME=INTEGER items"):
        kernels.linear(x, w)
    set_env("FUSED_TP_CONFIG", "BLOCK_M=32,BLOCK_N=32,BLOCK_K=16,num_warps=3")
    with pytest.raises(ValueError, match="FUSED_TP_CONFIG: num_warps: expected 1, 2, 4, 8 or 16, got 3"):
        kernels.linear(x, w)


def test_a_pinned_config_that_does_not_fit_raises_before_the_launch(device):
    x, w = torch.randn(5, 40, device=device), torch.randn(7, 40, device=device)
    huge = configs.KernelConfig(256, 256, 128, num_warps=8, num_stages=4)
    before = kernels.path_counts.copy()
    too_big = r"pinned config .* needs \d+ bytes of shared memory"
    with configs.pin_config(huge), pytest.raises(ValueError, match=too_big):
        kernels.linear(x, w)
    assert kernels.path_counts["config_pinned"] == before["config_pinned"]
    with pytest.raises(ValueError, match="BLOCK_K: expected a power of two of at least 16"):
        configs.KernelConfig(64, 64, 8)


def test_a_pre_activation_tile_takes_a_config_with_room_for_it(monkeypatch):
    """A grad_input launch that reads the pre-activation in its epilogue needs room for that tile: every rule config
    has it (the epilogue works on column halves, so 128x256x64 in 3 stages keeps its stages); a table's config
    without room gives way to the rule's; a pinned config without room raises, naming the pre-activation tile."""
    for (width, route, _), cfg in configs.CONFIGS.items():
        assert configs.fits(cfg, 4 if width == "32bit" else 2, route == "tma", aux_tile=True), cfg
    big = configs.KernelConfig(128, 256, 64, num_warps=8, num_stages=3)  # the bf16 rule for many rows
    assert configs.fits(big, 2, True, aux_tile=True)
    roomless = configs.KernelConfig(128, 256, 64, num_warps=8, num_stages=4, persistent=False)  # pointers: 196608 B
    assert configs.fits(roomless, 2, False) and not configs.fits(roomless, 2, False, aux_tile=True)
    monkeypatch.setattr(tables, "table_config", lambda *args, **kwargs: roomless)
    rule = configs.CONFIGS[("16bit", "pointers", "large")]
    for aux_tile, want in ((False, (roomless, "table")), (True, (rule, "rule"))):
        cfg, source = plan.pick_config(
            8192,
            8192,
            8192,
            torch.bfloat16,
            interpreted=False,
            tma=False,
            slots=132,
            product="dgrad",
            aux_tile=aux_tile,
        )
        assert (dataclasses.replace(cfg, split_k=None), source) == want
    with pytest.raises(
        ValueError,
        match=r"needs \d+ bytes of shared memory for bf16 operands and 1 "
        r"pre-activation tile",
    ):
        plan.pick_config(
            8192, 8192, 8192, torch.bfloat16, interpreted=False, tma=False, slots=132, pinned=roomless, aux_tile=True
        )


def test_a_gated_derivative_gets_room_for_both_pre_activation_tiles():
    """SwiGLU's grad_input epilogue reads the (gate, up) pairs: two output-sized tiles. The rule's config for many
    rows has room for one (the H200 ran out of shared memory: 278552 bytes asked, 232448 there), so the rule's tile
    narrows until both fit, and takes the stages back that keep its bytes in flight (4 of 128x128x64 for 3 of
    128x256x64: faster than 3 on the H200, bench/NOTES.md attempt 51); a table's without room does the same
    through the rule."""
    big = configs.CONFIGS[("16bit", "tma", "large")]
    assert configs.fits(big, 2, True, aux_tile=1) and not configs.fits(big, 2, True, aux_tile=2)
    assert plan.aux_tiles("swiglu", "load") == 2 and plan.aux_tiles("gelu", "load") == 1
    assert plan.aux_tiles("swiglu", "store") == 0
    cfg, source = plan.pick_config(
        8192, 14336, 4096, torch.bfloat16, interpreted=False, tma=True, slots=132, product="dgrad", aux_tile=2
    )
    assert source == "rule" and configs.fits(cfg, 2, True, aux_tile=2)
    assert (cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K, cfg.num_stages) == (128, 128, 64, 4)
    assert cfg.shared_memory(2, True, 2) == 4 * 256 * 64 * 2 + 2 * 128 * 128 * 2  # no more in flight than 3 x 384
    for (width, route, _), rule in configs.CONFIGS.items():
        itemsize = 4 if width == "32bit" else 2
        roomy = configs.with_room(rule, itemsize, route == "tma", 2)
        assert configs.fits(roomy, itemsize, route == "tma", 2)
        assert roomy == rule or roomy.BLOCK_N < rule.BLOCK_N or roomy.num_stages < rule.num_stages
        assert roomy in configs.SPACE  # tune times the rule's config beside the rest (tune.choose's margin)
    # A tile that has room keeps its stages; one whose narrowest tile has none gives stages up.
    assert configs.with_room(configs.ROUTE_PROBE, 2, True, 2) == configs.ROUTE_PROBE
    deep = configs.KernelConfig(128, 64, 128, num_warps=8, num_stages=6)
    assert configs.with_room(deep, 2, True, 2).num_stages == 4


def test_a_gated_grad_input_takes_its_own_table_entries(table_dir, device, monkeypatch):
    """SwiGLU's grad_input (two pre-activation tiles read, both halves' gradients written) looks its config up under
    "dgrad_gated", the plain and the GELU grad_input under "dgrad": plain dgrad's tiles ran the gated epilogue slower
    than the rule's on the H200 (bench/NOTES.md, attempt 51)."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(s, generator=gen).to(device=device, dtype=torch.bfloat16)  # noqa: E731
    g, w, pre1, pre2 = rand(16, 32), rand(32, 64), rand(16, 64), rand(16, 128)
    gpu = plan.device(g.get_device()).gpu
    routes = lambda cfg: {route: {"16x64x32": _entry(cfg)} for route in ("tma", "pointers")}  # noqa: E731
    _write(table_dir, {gpu: {"dgrad": {"bf16": routes(A)}, "dgrad_gated": {"bf16": routes(B)}}})
    planned, real = [], plan.matmul_plan

    def spy(*args):
        planned.append((args[0], real(*args)))
        return planned[-1][1]

    spy.cache_clear = real.cache_clear  # for table_dir's teardown, which runs before monkeypatch's
    monkeypatch.setattr(plan, "matmul_plan", spy)
    d, d_mag = linear_reference(g, w.t())
    cases = (("swiglu", pre2, "dgrad_gated", B), ("gelu", pre1, "dgrad", A), (None, None, "dgrad", A))
    for act, pre, product, cfg in cases:
        before = kernels.path_counts["config_table"]
        out = kernels.grad_input(g, w, activation=act, pre=pre)
        assert kernels.path_counts["config_table"] == before + 1
        name, p = planned[-1]
        assert name == product and (p.launch.kwargs["BLOCK_M"], p.launch.kwargs["BLOCK_N"]) == (
            cfg.BLOCK_M,
            cfg.BLOCK_N,
        )
        if act:
            assert_close("grad_pre", out, *activation_grad_reference(act, d, d_mag, pre), act_tol(torch.bfloat16, 32))
        else:
            assert_close("grad_x", out, d, d_mag, tol(torch.bfloat16, 32))


def test_pruning_rules():
    for dtype in (torch.float32, torch.bfloat16):
        for tma in (True, False):
            kept = configs.candidates(8192, 8192, 8192, dtype, tma)
            assert kept and all(c.shared_memory(dtype.itemsize, tma) <= configs.SHARED_MEMORY_BYTES for c in kept)
    assert len(configs.candidates(8192, 8192, 8192, torch.float32, True)) < len(configs.SPACE)  # fp32 drops some
    assert all(c.BLOCK_M <= 64 for c in configs.candidates(16, 8192, 8192, torch.bfloat16, True))  # decode rows
    assert all(c.BLOCK_M >= 64 for c in configs.candidates(256, 8192, 8192, torch.bfloat16, True))  # decode tiles
    decode = lambda tma: configs.candidates(16, 4096, 4096, torch.bfloat16, tma)  # noqa: E731
    assert any(not c.tma for c in decode(True)), "decode tiles are timed through pointers too"
    assert all(c.tma for c in decode(False)), "where no descriptor can address the operands, tma=False is a copy"
    assert any(not c.tma_c for c in decode(True)) and all(c.tma_c for c in decode(False))
    c_pointers = lambda M, rows: [  # noqa: E731
        c for c in configs.candidates(M, 4096, 4096, torch.bfloat16, True) if not c.tma_c and c.BLOCK_M in rows
    ]
    assert c_pointers(128, (64,)) and not c_pointers(129, (16, 32, 64)), (
        "64-row tiles store C through pointers in decode"
    )
    assert c_pointers(8192, (128,)), "128-row tiles trade C's tile for a stage at every size"
    for dtype in (torch.float32, torch.float16):
        for tma in (True, False):
            assert configs.candidates(1, 1, 1, dtype, tma), "every launch needs a candidate"
    gemv = lambda M: [c for c in configs.candidates(M, 4096, 4096, torch.bfloat16, True) if c.BLOCK_M == 1]  # noqa: E731
    rows = configs.GEMV_MAX_ROWS
    assert gemv(1) and gemv(rows) and not gemv(rows + 1), "the GEMV form is timed for GEMV_MAX_ROWS rows only"


def test_tma_c_stores_c_through_pointers_beside_descriptor_operands(device):
    """tma_c=False keeps A and B on descriptors where they allow them and stores C through pointers: one descriptor
    fewer a program, and no shared-memory tile for a descriptor store."""
    index = 0 if device == "cuda" else -1
    if not plan.device(index).has_tma:
        pytest.skip("tensor descriptors need sm_90")
    c_pointers = configs.KernelConfig(64, 64, 64, num_warps=4, num_stages=2, tma_c=False)
    for cfg, tma_c in ((c_pointers, False), (dataclasses.replace(c_pointers, tma_c=True), True)):
        p = plan.matmul_plan(
            "fwd",
            64,
            128,
            256,
            (256, 1),
            (1, 256),
            torch.bfloat16,
            (True,) * 4,
            1,
            "",
            "",
            index,
            False,
            (cfg, "pinned"),
        )
        assert "tma" in p.counts and p.launch.kwargs["TMA"] and p.launch.kwargs["TMA_C"] == tma_c
    assert c_pointers.shared_memory(2, True) == 2 * (64 + 64) * 64 * 2
    assert dataclasses.replace(c_pointers, tma_c=True).shared_memory(2, True) == 2 * (64 + 64) * 64 * 2 + 64 * 64 * 2


def test_the_gemv_form_is_a_config_with_a_row_tile():
    """BLOCK_M 1 is the GEMV form, whose weight tile may be 4 columns wide; other sub-16 tiles are refused, naming
    the field."""
    assert configs.KernelConfig(1, 4, 512, num_stages=1, persistent=False).BLOCK_N == 4
    with pytest.raises(ValueError, match=r"BLOCK_M: expected 1 \(the GEMV form\) or a power of two of at least 16"):
        configs.KernelConfig(8, 64, 64)
    with pytest.raises(ValueError, match="BLOCK_N: expected a power of two of at least 16"):
        configs.KernelConfig(16, 4, 64)
    with pytest.raises(ValueError, match="BLOCK_N: expected a power of two of at least 4 with BLOCK_M 1"):
        configs.KernelConfig(1, 2, 64)
    with pytest.raises(ValueError, match="tma: expected True or False, got 0"):
        configs.KernelConfig(16, 64, 64, tma=0)
    with pytest.raises(ValueError, match="tma_c: expected True or False, got 1"):
        configs.KernelConfig(16, 64, 64, tma_c=1)


def test_a_gemv_entry_serves_its_own_token_counts_only(table_dir):
    """A table's GEMV entry serves no more tokens than its bucket's; more tokens take the nearest tile entry, even
    where the GEMV bucket is nearer or as near (the GEMV form reads the weight tile once per row)."""
    rows = configs.GEMV_MAX_ROWS
    gemv = {"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_K": 512, "num_stages": 1, "persistent": False}
    tile = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}
    entries = {f"{rows}x4096x4096": {"config": gemv}, f"{8 * rows}x4096x4096": {"config": tile}}
    entries |= {"1x8192x4096": {"config": gemv}, "4x8192x4096": {"config": tile}}
    (table_dir / "g.json").write_text(json.dumps({"format": 1, "gpus": {"g": {"fwd": {"bf16": {"tma": entries}}}}}))
    for M, N, form in ((rows, 4096, 1), (rows - 1, 4096, 1), (rows + 1, 4096, 16), (1, 8192, 1), (2, 8192, 16)):
        assert tables.table_config("g", "fwd", M, N, 4096, torch.bfloat16, True).BLOCK_M == form, (M, N)


def test_tune_end_to_end_then_its_table_drives_the_first_call(table_dir, tmp_path, device, capsys):
    """The tune command under the interpreter with a fake timer that makes the config with the largest BLOCK_K
    fastest: every (product, shape, candidate) is kept, the table names the fastest, and once dropped in, the
    kernels' first call of that shape runs it without any tuning."""
    if device == "cuda":
        pytest.skip("the fake timer stands in for the interpreter's wall clock; on a GPU, tune times for real")

    def score(cfg):  # fewest K-steps first, then the smallest tile; no two configs of SPACE tie
        return (
            1.0 / cfg.BLOCK_K
            + cfg.BLOCK_M * 1e-6
            + cfg.BLOCK_N * 1e-8
            + cfg.num_stages * 1e-10
            + cfg.persistent * 1e-11
        )

    def fake_timer(fn):
        cfg = configs.pinned_config()
        return 1.0 if cfg is None else score(cfg)

    shapes = tmp_path / "shapes.txt"
    shapes.write_text("# M, K, N\n20, 48, 100\n")
    out = tmp_path / "out"
    args = argparse.Namespace(kernel="all", dtype="bf16", shapes=str(shapes), out=str(out))
    written = tune.run(args, timer=fake_timer)

    rows = json.loads(written["timings"].read_text())["rows"]
    for product in configs.PRODUCTS:
        mine = [r for r in rows if r["product"] == product]
        m, n, k = mine[0]["launch_mnk"]
        route = mine[0]["path"]
        fit = [
            c
            for c in configs.candidates(m, n, k, torch.bfloat16, route == "tma")
            if configs.fits(c, 2, route == "tma", tune.AUX_TILES.get(product, 0))
        ]
        assert len(mine) == len(fit) > 1
        assert all(r["passed_check"] for r in mine)
    assert "| fwd | 20 | 48 | 100 |" in capsys.readouterr().out
    table = json.loads(written["table"].read_text())["gpus"]["triton-interpreter"]
    fwd = next(r for r in rows if r["product"] == "fwd")
    entry = table["fwd"]["bf16"][fwd["path"]][tables.table_key(*fwd["launch_mnk"])]
    fastest = min(configs.candidates(*fwd["launch_mnk"], torch.bfloat16, fwd["path"] == "tma"), key=score)
    assert configs.KernelConfig.from_dict(entry["config"], "t") == fastest

    (table_dir / "triton-interpreter.json").write_text(written["table"].read_text())  # drop it in
    tables.tuned_table.cache_clear()  # as a fresh process would start
    plan.clear_caches()
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=gen).to(torch.bfloat16) for s in ((20, 48), (100, 48), (100,)))
    before = kernels.path_counts.copy()
    y = kernels.linear(x, w, b)
    assert kernels.path_counts["config_table"] == before["config_table"] + 1
    cfg, source = plan.pick_config(
        20,
        100,
        48,
        torch.bfloat16,
        interpreted=True,
        tma=fwd["path"] == "tma",
        slots=3,
        product="fwd",
        gpu="triton-interpreter",
    )
    assert source == "table" and dataclasses_equal(cfg, fastest)
    assert_close("y", y, *linear_reference(x, w, b), tol(torch.bfloat16, 48))


def test_tune_tf32_writes_its_own_table_key_and_restores_the_tf32_setting(tmp_path, device, set_tf32):
    """--dtype tf32 tunes fp32 operands with allow_tf32 on (torch and fused_tp alike), files them under "tf32", and
    leaves allow_tf32 as it found it."""
    if device == "cuda":
        pytest.skip("the fake timer stands in for the interpreter's wall clock; on a GPU, tune times for real")
    seen = []

    def fake_timer(fn):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        cfg = configs.pinned_config()
        return 1.0 if cfg is None else 1.0 / cfg.BLOCK_K

    set_tf32(False)
    args = argparse.Namespace(kernel="fwd", dtype="tf32", shapes="tiny", out=str(tmp_path))
    written = tune.run(args, timer=fake_timer)
    assert seen and all(seen), "tuned with TF32 off"
    assert torch.backends.cuda.matmul.allow_tf32 is False
    table = json.loads(written["table"].read_text())["gpus"]["triton-interpreter"]
    assert list(table["fwd"]) == ["tf32"]


def test_a_gemv_winner_is_filed_under_the_path_its_operands_take(table_dir, tmp_path, device):
    """A GEMV config reads through pointers whatever the operands, but a launch looks its table up under the path
    its operands can take (descriptors here): a GEMV winner for one token is filed there, also when the table that
    tune starts from already sends that shape to the GEMV form (the bug of session 14: bench/NOTES.md; here through
    a neighbour's entry, whose config the tune then files in the shape's bucket, as it keeps any it was served)."""
    if device == "cuda":
        pytest.skip("the fake timer stands in for the interpreter's wall clock; on a GPU, tune times for real")
    gemv = next(c for c in configs.SPACE if c.BLOCK_M == 1)
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("1, 64, 40\n")
    key, neighbour = tables.table_key(1, 40, 64), tables.table_key(1, 56, 64)
    assert key != neighbour
    _write(table_dir, {"triton-interpreter": {"fwd": {"bf16": {"tma": {neighbour: _entry(gemv)}}}}})
    fake_timer = lambda fn: 0.5 if configs.pinned_config() == gemv else 1.0  # noqa: E731
    args = argparse.Namespace(kernel="fwd", dtype="bf16", shapes=str(shapes), out=str(tmp_path / "out"))
    table = json.loads(tune.run(args, timer=fake_timer)["table"].read_text())["gpus"]["triton-interpreter"]
    assert list(table["fwd"]["bf16"]) == ["tma"]
    assert configs.KernelConfig.from_dict(table["fwd"]["bf16"]["tma"][key]["config"], "t") == gemv


def test_tune_merges_into_the_table_it_finds_bucket_by_bucket(tmp_path, device):
    """A second tune run into the same --out keeps the first run's buckets, in their order, and replaces only the
    buckets it tuned itself: a partial re-tune (decode shapes, say) leaves the rest of a shipped table as it was."""
    if device == "cuda":
        pytest.skip("the fake timer stands in for the interpreter's wall clock; on a GPU, tune times for real")

    def fake_timer(fn):
        cfg = configs.pinned_config()
        return 1.0 if cfg is None else 1.0 / cfg.BLOCK_K

    def run(shape):
        shapes = tmp_path / "shapes.txt"
        shapes.write_text(",".join(map(str, shape)) + "\n")
        written = tune.run(
            argparse.Namespace(kernel="fwd", dtype="bf16", shapes=str(shapes), out=str(tmp_path)), timer=fake_timer
        )
        routes = json.loads(written["table"].read_text())["gpus"]["triton-interpreter"]["fwd"]["bf16"]
        return {key: entry for entries in routes.values() for key, entry in entries.items()}

    first = run((20, 48, 100))
    second = run((300, 40, 24))
    key_1, key_2 = tables.table_key(20, 100, 48), tables.table_key(300, 24, 40)
    assert list(first) == [key_1] and list(second) == [key_1, key_2]
    assert second[key_1] == first[key_1]
    third = run((20, 48, 100))  # re-tuned: replaced in place
    assert list(third) == [key_1, key_2] and third[key_2] == second[key_2]


def test_tune_reach_goes_into_the_entries_it_writes(tmp_path, device):
    """--reach STEPS is written into each entry the run makes (tables.py: the entry then serves only shapes within
    it); a negative reach is refused before anything is timed."""
    if device == "cuda":
        pytest.skip("the fake timer stands in for the interpreter's wall clock; on a GPU, tune times for real")
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("20, 48, 100\n")
    timed = []

    def fake_timer(fn):
        timed.append(configs.pinned_config())
        return 1.0

    def run(reach):
        args = argparse.Namespace(kernel="fwd", dtype="bf16", shapes=str(shapes), out=str(tmp_path), reach=reach)
        return tune.run(args, timer=fake_timer)

    with pytest.raises(SystemExit, match="--reach: expected a number of log2 steps >= 0, got -1"):
        run(-1.0)
    assert not timed
    routes = json.loads(run(1.6)["table"].read_text())["gpus"]["triton-interpreter"]["fwd"]["bf16"]
    entries = [entry for route in routes.values() for entry in route.values()]
    assert entries and all(entry["reach"] == 1.6 for entry in entries)


def _shipped_a_at_20x48x100(table_dir) -> tuple[str, str]:
    """(operand path, bucket key): a shipped table with config A for 20 tokens through a 48 -> 100 bf16 forward,
    under the path those operands take."""
    x, w = torch.randn(20, 48, dtype=torch.bfloat16), torch.randn(100, 48, dtype=torch.bfloat16)
    route = "tma" if _takes_descriptors(x, w) else "pointers"
    key = tables.table_key(20, 100, 48)
    _write(table_dir, {"triton-interpreter": {"fwd": {"bf16": {route: {key: _entry(A)}}}}})
    tables.tuned_table.cache_clear()
    return route, key


def test_tune_keeps_the_config_the_table_served_where_it_wins(tmp_path, table_dir, device):
    """The config the tables serve a shape before the tune (a neighbour's entry, or its bucket's own) is timed with
    the candidates and is what they must beat: where it wins, a neighbour's config is written into the shape's
    bucket with a reach of 0 (the bucket keeps it whatever the tune adds around it), and a bucket's own entry is left
    as it is (bench/NOTES.md, session 52); where a candidate beats it by the margin, the candidate is written."""
    if device == "cuda":
        pytest.skip("the fake timer stands in for the interpreter's wall clock; on a GPU, tune times for real")
    route, own = _shipped_a_at_20x48x100(table_dir)
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("20, 48, 100\n20, 48, 140\n")  # the entry's own bucket (128 features), a neighbour (192)

    def run(served_ms, out):
        def fake_timer(fn):
            cfg = configs.pinned_config()
            return 1.0 if cfg is None else served_ms if dataclasses.replace(cfg, split_k=None) == A else 1.0

        args = argparse.Namespace(kernel="fwd", dtype="bf16", shapes=str(shapes), out=str(tmp_path / out))
        return tune.run(args, timer=fake_timer)

    written = run(0.5, "wins")
    marks = {(r["N"], r["incumbent"]) for r in json.loads(written["timings"].read_text())["rows"] if "incumbent" in r}
    assert marks == {(100, "own"), (140, "nearest")}, marks
    entries = json.loads(written["table"].read_text())["gpus"]["triton-interpreter"]["fwd"]["bf16"][route]
    assert list(entries) == [tables.table_key(20, 140, 48)], entries
    assert entries[tables.table_key(20, 140, 48)]["reach"] == 0
    assert configs.KernelConfig(**entries[tables.table_key(20, 140, 48)]["config"]) == A
    written = run(1.0 / (1 - autotune.MARGIN) + 0.01, "loses")  # every other config beats it by the margin
    entries = json.loads(written["table"].read_text())["gpus"]["triton-interpreter"]["fwd"]["bf16"][route]
    assert sorted(entries) == sorted([own, tables.table_key(20, 140, 48)]), entries
    assert all("reach" not in e and configs.KernelConfig(**e["config"]) != A for e in entries.values()), entries


def test_tune_missing_times_only_the_buckets_the_table_lacks(tmp_path, table_dir, device, capsys):
    """--missing skips a shape whose bucket the shipped table or the one in --out already holds for its product,
    dtype and path (a table's new half-step buckets tuned without re-tuning the rest), and says how many; with
    nothing left it exits naming the option."""
    if device == "cuda":
        pytest.skip("the fake timer stands in for the interpreter's wall clock; on a GPU, tune times for real")

    def fake_timer(fn):
        cfg = configs.pinned_config()
        return 1.0 if cfg is None else 1.0 / cfg.BLOCK_K

    def run(lines, out):
        shapes = tmp_path / "shapes.txt"
        shapes.write_text(lines)
        args = argparse.Namespace(kernel="fwd", dtype="bf16", shapes=str(shapes), out=str(out), missing=True)
        return tune.run(args, timer=fake_timer)

    route, _ = _shipped_a_at_20x48x100(table_dir)
    out = tmp_path / "out"
    written = run("20, 48, 100\n20, 48, 140\n", out)  # 100 and 140 features: buckets 128 and 192
    rows = json.loads(written["timings"].read_text())["rows"]
    assert {(r["M"], r["K"], r["N"]) for r in rows} == {(20, 48, 140)}
    assert "1 of 2 shapes skipped" in capsys.readouterr().out
    table = json.loads(written["table"].read_text())["gpus"]["triton-interpreter"]["fwd"]["bf16"][route]
    assert list(table) == [tables.table_key(20, 140, 48)]
    with pytest.raises(SystemExit, match="--missing: every shape's bucket has an entry already"):
        run("20, 48, 100\n20, 48, 130\n", out)  # 130 features: the bucket that run wrote into --out


def test_tune_tokens_times_only_the_shapes_of_those_token_counts(tmp_path, table_dir, device):
    """--tokens keeps the shapes of --shapes whose M it lists (a preset tuned in parts, each within a device call's
    limit); listing no M of the shapes exits naming the option, before anything is timed."""
    if device == "cuda":
        pytest.skip("the fake timer stands in for the interpreter's wall clock; on a GPU, tune times for real")
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("1, 48, 100\n16, 48, 100\n16, 40, 24\n")

    def args(tokens):
        return argparse.Namespace(kernel="fwd", dtype="bf16", shapes=str(shapes), out=str(tmp_path), tokens=tokens)

    written = tune.run(args([16]), timer=lambda fn: 1.0)
    rows = json.loads(written["timings"].read_text())["rows"]
    assert {(r["M"], r["K"], r["N"]) for r in rows} == {(16, 48, 100), (16, 40, 24)}
    with pytest.raises(SystemExit, match=r"--tokens: no shape of --shapes .* has M in \[2, 4\]"):
        tune.run(args([2, 4]), timer=lambda fn: pytest.fail("timed with no shape left"))


@pytest.mark.parametrize("fast_split", [3, None])
def test_tune_pins_a_split_only_where_one_beats_the_rule_s_split(tmp_path, table_dir, device, fast_split):
    """A product of fewer output tiles than SMs (the interpreter has 3 program slots) gets its chosen config timed
    at pinned splits too: a split faster than the rule's by the margin goes into the table entry (every launch the
    entry serves takes it), each pinned split's timing is kept beside the others; with none faster the entry
    leaves the split to the rule. The timings file says in its env which splits the stage times (decode_run.sh's
    retune leaves the buckets of such a file out)."""
    if device == "cuda":
        pytest.skip("the fake timer stands in for the interpreter's wall clock; on a GPU, tune times for real")

    def fake_timer(fn):  # the smallest BLOCK_K fastest, then fast_split halves the time
        cfg = configs.pinned_config()
        if cfg is None:
            return 1.0
        ms = cfg.BLOCK_K / 64 + cfg.BLOCK_M * 1e-6 + cfg.BLOCK_N * 1e-8 + cfg.num_stages * 1e-10
        return ms * (0.5 if fast_split is not None and cfg.split_k == fast_split else 1.0)

    shapes = tmp_path / "shapes.txt"
    shapes.write_text("4, 512, 40\n")  # one 40-wide tile of outputs, 512 deep: a split has K-steps to share
    args = argparse.Namespace(kernel="fwd", dtype="bf16", shapes=str(shapes), out=str(tmp_path / "out"))
    written = tune.run(args, timer=fake_timer)
    timings = json.loads(written["timings"].read_text())
    rows = timings["rows"]
    assert timings["env"]["splits_timed"] == list(tune.SPLITS_TIMED)
    split_rows = [r for r in rows if r.get("stage") == "split"]
    (entries,) = json.loads(written["table"].read_text())["gpus"]["triton-interpreter"]["fwd"]["bf16"].values()
    (entry,) = entries.values()
    chosen = configs.KernelConfig.from_dict(entry["config"], "t")
    assert split_rows and all(r["passed_check"] for r in split_rows)
    assert {configs.KernelConfig(**r["config"]) for r in split_rows} >= {
        dataclasses.replace(chosen, split_k=s) for s in (1, 3, 4)
    }
    assert chosen.split_k == fast_split and chosen.BLOCK_K == min(r["config"]["BLOCK_K"] for r in rows)
    if fast_split:
        assert entry["unpinned_split_ms"] > entry["ms"]


def test_decode_run_tunes_into_its_tree_and_retunes_only_what_no_split_stage_timed(tmp_path, device):
    """bench/decode_run.sh, the device sessions' decode workflow, run as they run it (a copy of the repository, on the
    CPU under the interpreter, SHAPES=tiny): a tune: step writes the table into the tree it runs in and its timings,
    which name the splits they time, gzipped as the tree keeps them, into the call's archive; a retune: step of the same
    call leaves out the bucket that tune timed with the pinned-split stage, a later call whose tree lacks those timings
    tunes it again, and once they are copied into the tree it leaves the bucket out again (bench/NOTES.md, attempt 83);
    a retime: step times a bucket that has an entry again, where tune: skips it (attempt 104); a stale: step times again
    the buckets whose entries were not timed from CUDA graphs, and only those (session 40); a small: step tunes
    grad_input for the buckets of its preset that have no entry (attempt 114), entries of a limited reach (session 51),
    and a compare: step then times the launches whose config the call changed, with both tables. A malformed step is
    refused before any step runs."""
    if device == "cuda":
        pytest.skip("on a GPU the script tunes for real, minutes a step")
    root = pathlib.Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"
    skip = shutil.ignore_patterns("__pycache__", "results")
    for part in ("fused_tp", "bench"):
        shutil.copytree(root / part, tree / part, ignore=skip)
    results = tree / "bench" / "results" / "triton-interpreter"
    results.mkdir(parents=True)
    # the last decode bench's rows as bench_linear.py writes them: the tiny preset's 33-token shape at 0.5x cuBLAS
    bench = {"env": {"gpu": "triton-interpreter"}, "rows": [{"M": 33, "K": 40, "N": 17, "ratio": 0.5}]}
    (results / "bench_linear_bf16_decode.json").write_text(json.dumps(bench))
    table = tree / "fused_tp" / "kernels" / "tuned" / "triton-interpreter.json"

    def call(*steps):
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        env = {**os.environ, "TRITON_INTERPRET": "1", "SHAPES": "tiny", "OUT": str(out)}
        env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # its python3: this one's
        run = subprocess.run(
            ["bash", "bench/decode_run.sh", *steps], cwd=tree, env=env, capture_output=True, text=True, timeout=600
        )
        files = {}  # what the call's archive holds: the device's fetch brings back that one file
        if (out / "results.tgz").exists():
            with tarfile.open(out / "results.tgz") as tar:
                files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        return run, files

    refused, files = call("tune:bf16:33", "retune:bf16")
    assert refused.returncode == 2 and "got retune:bf16" in refused.stderr and not files
    assert not table.exists()

    first, files = call("tune:bf16:33", "retune:bf16:0.92")
    assert first.returncode == 0, first.stderr
    (entry,) = json.loads(table.read_text())["gpus"]["triton-interpreter"]["fwd"]["bf16"]["tma"].values()
    assert entry["shape_MKN"] == [33, 40, 17]
    timings = json.loads(gzip.decompress(files["./tune/timings_fwd_bf16_decode-33.json.gz"]))
    assert timings["env"]["splits_timed"] == list(tune.SPLITS_TIMED)
    assert files["./retune_bf16.txt"] == b""
    assert "retune: no row below 0.92" in first.stdout

    second, files = call("retune:bf16:0.92")
    assert second.returncode == 0, second.stderr
    assert files["./retune_bf16.txt"] == b"33,40,17\n"
    assert "./tune/timings_fwd_bf16_retune.json.gz" in files

    (results / "tune").mkdir()
    (results / "tune" / "timings_fwd_bf16_decode-33.json.gz").write_bytes(gzip.compress(json.dumps(timings).encode()))
    third, files = call("retune:bf16:0.92")
    assert third.returncode == 0, third.stderr
    assert files["./retune_bf16.txt"] == b""

    # once the bucket has an entry, tune: skips it and retime: (after the space grew) times it again
    fourth, files = call("tune:bf16:33", "retime:bf16:33")
    assert fourth.returncode == 0, fourth.stderr
    assert "./tune/timings_fwd_bf16_decode-33.json.gz" not in files
    retimed = json.loads(gzip.decompress(files["./tune/timings_fwd_bf16_retime-33.json.gz"]))
    assert {(r["M"], r["K"], r["N"]) for r in retimed["rows"]} == {(33, 40, 17)}
    (entry,) = json.loads(table.read_text())["gpus"]["triton-interpreter"]["fwd"]["bf16"]["tma"].values()
    assert entry["shape_MKN"] == [33, 40, 17]

    # stale: times again the buckets whose entry was not timed from CUDA graphs (on the CPU every entry says "flush"),
    # and leaves out those without an entry (tune:'s) and those timed from graphs
    fifth, files = call("stale:bf16")
    assert fifth.returncode == 0, fifth.stderr
    assert files["./stale_bf16.txt"] == b"33,40,17\n"
    stale = json.loads(gzip.decompress(files["./tune/timings_fwd_bf16_stale.json.gz"]))
    assert {(r["M"], r["K"], r["N"]) for r in stale["rows"]} == {(33, 40, 17)}
    tuned = json.loads(table.read_text())
    for entry in tuned["gpus"]["triton-interpreter"]["fwd"]["bf16"]["tma"].values():
        entry["timer"] = "graph"
    table.write_text(json.dumps(tuned))
    sixth, files = call("stale:bf16")
    assert sixth.returncode == 0, sixth.stderr
    assert files["./stale_bf16.txt"] == b"" and "stale: every entry" in sixth.stdout

    # small: tunes grad_input (or the weight gradient) into the same table, the buckets of its preset without an
    # entry (attempt 114), and leaves the forward's entries as they were; once they are there it times nothing
    refused, files = call("small:bf16:fwd")
    assert refused.returncode == 2 and "got small:bf16:fwd" in refused.stderr and not files
    forward = json.loads(table.read_text())["gpus"]["triton-interpreter"]["fwd"]
    seventh, files = call("small:bf16:dgrad", "compare:bf16:dgrad")
    assert seventh.returncode == 0, seventh.stderr
    # compare: the launches whose config the call's tune changed (both of the preset's: the rule's before), each run
    # with both tables (the interpreter's wall clock: a check of the script)
    compared = files["./compare_bf16_dgrad.log"].decode()
    assert "2 of 2 layers' dgrad launches take another config" in compared and "\n2 launches;" in compared, compared
    assert compared.rstrip().endswith("a check of the script, not speed"), compared
    tuned = json.loads(table.read_text())["gpus"]["triton-interpreter"]
    assert tuned["fwd"] == forward
    entries = [e for route in tuned["dgrad"]["bf16"].values() for e in route.values()]
    assert sorted(e["shape_MKN"] for e in entries) == sorted(map(list, shapes.PRESETS["tiny"]))
    assert all(e["reach"] == 1.6 for e in entries)  # kept from the shapes far from them (session 51)
    small = json.loads(gzip.decompress(files["./tune/timings_dgrad_bf16_small.json.gz"]))
    assert {(r["product"], r["M"], r["K"], r["N"]) for r in small["rows"]} == {
        ("dgrad", *s) for s in shapes.PRESETS["tiny"]
    }
    # grid: the same tune over its own preset (SHAPES=tiny here, every bucket tuned by now)
    eighth, files = call("small:bf16:dgrad", "grid:bf16:dgrad")
    assert eighth.returncode == 0, eighth.stderr
    assert eighth.stdout.count("every shape's bucket has an entry already") == 2, eighth.stdout
    assert not [f for f in files if f.startswith("./tune/timings_")], files
    assert json.loads(table.read_text())["gpus"]["triton-interpreter"] == tuned


def test_tune_times_the_contenders_again_and_keeps_each_minimum(tmp_path, device, monkeypatch):
    """One stalled timing (a whole do_bench median read 4x slow, as on a busy host) neither costs the rule's config
    its place nor skews torch's figure: each shape's CONFIRM_TOP fastest configs and the rule's are timed
    CONFIRM_ROUNDS more times, interleaved with torch, and every timing keeps its minimum."""
    if device == "cuda":
        pytest.skip("the fake timer stands in for the interpreter's wall clock; on a GPU, tune times for real")

    # The interpreter's rule config is not among the candidates; on a GPU it is. Stand in the last candidate that
    # both operand paths time (operands no descriptor can address drop the configs with C through pointers), so
    # that the stand-in is one config whichever path the shape takes.
    def rule_config(M, dtype, interpreted, tma, aux_tile=0):
        return [c for c in configs.candidates(20, 100, 48, dtype, tma) if c.tma and c.tma_c][-1]

    monkeypatch.setattr(configs, "rule_config", rule_config)
    rules = {rule_config(20, torch.bfloat16, True, tma) for tma in (True, False)}

    def true_ms(cfg):  # torch 0.5; the rule's config within autotune.MARGIN of the fastest, so it stays
        if cfg is None or cfg in rules:
            return 0.5 if cfg is None else 1.01
        return 1.0 + 1.0 / cfg.BLOCK_K + cfg.BLOCK_M * 1e-6 + cfg.BLOCK_N * 1e-8 + cfg.num_stages * 1e-10

    calls = []

    def fake_timer(fn):
        cfg = configs.pinned_config()
        calls.append(cfg)
        stalled = (cfg is None or cfg in rules) and calls.count(cfg) == 1
        return true_ms(cfg) * (4 if stalled else 1)

    shapes = tmp_path / "shapes.txt"
    shapes.write_text("20,48,100\n")
    written = tune.run(
        argparse.Namespace(kernel="fwd", dtype="bf16", shapes=str(shapes), out=str(tmp_path)), timer=fake_timer
    )
    rows = json.loads(written["timings"].read_text())["rows"]
    rule = rule_config(20, torch.bfloat16, True, rows[0]["path"] == "tma")
    others = sorted((c for c in map(lambda r: configs.KernelConfig(**r["config"]), rows) if c != rule), key=true_ms)
    again = [configs.KernelConfig(**r["config"]) for r in rows if len(r["ms_rounds"]) == 1 + autotune.CONFIRM_ROUNDS]
    assert sorted(again, key=true_ms) == sorted(others[: autotune.CONFIRM_TOP] + [rule], key=true_ms)
    assert sum(len(r["ms_rounds"]) == 1 for r in rows) == len(rows) - len(again)
    for r in rows:
        assert r["ms"] == true_ms(configs.KernelConfig(**r["config"])) == min(r["ms_rounds"])
        assert r["torch_ms"] == 0.5 and r["torch_rounds"] == [2.0] + [0.5] * autotune.CONFIRM_ROUNDS
    (entries,) = json.loads(written["table"].read_text())["gpus"]["triton-interpreter"]["fwd"]["bf16"].values()
    assert [e["config"] for e in entries.values()] == [rule.to_dict()]


def _takes_descriptors(x, w) -> bool:
    """Whether kernels.linear(x, w) moves its operands through tensor descriptors (aligned, contiguous operands)."""
    size = x.element_size()
    return (
        plan.device(x.get_device()).has_tma
        and layout.tma_route(x.shape[0], w.shape[0], x.shape[1], x.stride(), w.t().stride(), size, size, True, True)
        is not None
    )


def dataclasses_equal(cfg, other):
    """Equal but for split_k, which pick_config always fills in."""
    return dataclasses.replace(cfg, split_k=None) == other


@pytest.mark.parametrize("text, message", [("1,2\n", "expected three positive integers"), ("", "lists no shapes")])
def test_a_bad_shapes_file_is_refused(tmp_path, text, message):
    path = tmp_path / "s.txt"
    path.write_text(text)
    with pytest.raises(SystemExit, match=message):
        tune.load_shapes(str(path))
    with pytest.raises(SystemExit, match="neither a preset"):
        tune.load_shapes(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("rule_slower_by, chosen", [(0.02, "rule"), (0.05, "fastest")])
def test_a_tuned_config_must_beat_the_rule_by_the_margin(rule_slower_by, chosen):
    rule = configs.rule_config(100, torch.bfloat16, matmul.INTERPRETED, tma=True)
    row = dict(
        product="fwd", M=100, K=64, N=64, launch_mnk=[100, 64, 64], path="tma", torch_ms=1.0, ratio=1.0, tflops=1.0
    )
    rows = [
        dict(row, config=A.to_dict(), ms=1.0),
        dict(row, config=rule.to_dict(), ms=1.0 + rule_slower_by),
        dict(row, config=B.to_dict(), ms=None),
    ]  # B failed its check: never chosen
    (pick,), table = tune.choose(rows, "bf16")
    want = rule if chosen == "rule" else A
    assert pick["config"] == want.to_dict() and pick["rule_ms"] == 1.0 + rule_slower_by
    assert table["fwd"]["bf16"]["tma"]["128x64x64"]["config"] == want.to_dict()


def test_contenders_are_the_fastest_few_and_the_rule():
    """autotune.contenders: the CONFIRM_TOP fastest by their first timing, fastest first, and the rule's config
    wherever it ranks; an untimed candidate (None) never."""
    cands = [configs.KernelConfig(16 << i, 64, 32) for i in range(6)]
    first = [5.0, None, 1.0, 3.0, 2.0, 9.0]
    assert autotune.CONFIRM_TOP == 3
    assert autotune.contenders(cands, first, rule=cands[5]) == [2, 4, 3, 5]
    assert autotune.contenders(cands, first, rule=cands[4]) == [2, 4, 3]
    assert autotune.contenders(cands, first, rule=cands[1]) == [2, 4, 3]  # the rule untimed (it failed its check)
    assert autotune.contenders(cands[:2], [None, 4.0], rule=A) == [1]


def test_a_config_crosses_the_autotuning_broadcast_whole():
    """Rank 0's choice travels as integers (autotune.to_ints): every field of every config of the space comes back,
    split_k and the flags (persistent, tma) included, and no config reads as None."""
    pinned = dataclasses.replace(configs.SPACE[0], split_k=3, persistent=False, tma=False)
    for cfg in (*configs.SPACE, pinned):
        assert autotune.from_ints(autotune.to_ints(cfg)) == cfg
    assert autotune.from_ints(autotune.to_ints(None)) is None


@pytest.mark.parametrize("table", [False, True], ids=["no table", "a pointer tile's table"])
def test_run_time_autotuning_times_each_shape_once(device, monkeypatch, set_env, table_dir, table):
    """FUSED_TP_AUTOTUNE=1: the first launch of a shape times every candidate, then the three fastest twice more
    (autotune.contenders; the timing launches not counted), runs the fastest, and later launches of that shape time
    nothing; a pinned config still wins. The candidates are those of the operands' path, also where the table's
    config reads them through pointers (tma=False)."""
    if device == "cuda":
        pytest.skip("a fake timer stands in for the interpreter's wall clock")
    if table:
        tile = _entry(configs.KernelConfig(16, 64, 64, num_warps=4, num_stages=2, tma=False))
        gpus = {"triton-interpreter": {"fwd": {"fp32": {"tma": {"8x128x64": tile}}}}}
        (table_dir / "t.json").write_text(json.dumps({"format": 1, "gpus": gpus}))
    calls = []

    def timer(fn):
        calls.append(configs.pinned_config())
        return 1.0 / calls[-1].BLOCK_K + calls[-1].BLOCK_N * 1e-6

    launched = []
    kernel = jit.matmul_kernel

    class Spy:  # records the meta-parameters of every launch
        def __getitem__(self, grid):
            def launch(*args, **meta):
                launched.append(meta)
                return kernel[grid](*args, **meta)

            return launch

    set_env("FUSED_TP_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "timer", timer)
    monkeypatch.setattr(jit, "matmul_kernel", Spy())
    monkeypatch.setattr(autotune, "autotuned", {})
    plan.clear_caches()
    x, w = torch.randn(6, 40), torch.randn(70, 40)
    before = kernels.path_counts.copy()
    y, again = kernels.linear(x, w), kernels.linear(x, w)
    cands = configs.candidates(6, 70, 40, torch.float32, _takes_descriptors(x, w))
    score = lambda c: 1.0 / c.BLOCK_K + c.BLOCK_N * 1e-6  # noqa: E731
    assert configs.rule_config(6, torch.float32, matmul.INTERPRETED, True) not in cands  # the interpreter's
    fastest = sorted(cands, key=score)[: autotune.CONFIRM_TOP]
    assert calls[: len(cands)] == cands  # every candidate once, then the fastest again, then nothing
    assert calls[len(cands) :] == fastest * autotune.CONFIRM_ROUNDS
    (chosen,) = autotune.autotuned.values()
    assert chosen == fastest[0]
    for meta in launched[-2:]:  # the two calls' own launches ran the chosen config
        assert {k: meta[k] for k in chosen.meta()} == chosen.meta()
    assert kernels.path_counts["config_autotuned"] == before["config_autotuned"] + 2
    assert kernels.path_counts["triton-interpreter"] == before["triton-interpreter"] + 2  # timing launches not counted
    assert torch.equal(y, again)
    assert_close("y", y, *linear_reference(x, w), tol(torch.float32, 40))
    with configs.pin_config(A):
        kernels.linear(x, w)
    assert kernels.path_counts["config_pinned"] == before["config_pinned"] + 1
    assert len(calls) == len(cands) + autotune.CONFIRM_TOP * autotune.CONFIRM_ROUNDS


def test_the_decode_set_is_the_projections_of_its_models_as_shards():
    """Issue 18's decode set: Llama-3-70B's QKV at TP 8 holds 8 query heads and one key/value head of 128 (8192 ->
    1280), the row layers split their input (down at TP 4: 7168 -> 8192), an expert has no attention; and
    decode-buckets holds one shape per table bucket of the set, covering them all."""
    assert "llama3-70b qkv tp8" in shapes.DECODE_SHARDS[(8192, 1280)]
    assert "llama3-70b down tp4" in shapes.DECODE_SHARDS[(7168, 8192)]
    assert not any("mixtral-8x22b-expert qkv" in v for v in shapes.DECODE_SHARDS.values())
    assert len(shapes.PRESETS["decode"]) == len(shapes.DECODE_TOKENS) * len(shapes.DECODE_SHARDS)
    keys = [tables.table_key(m, n, k) for m, k, n in shapes.PRESETS["decode-buckets"]]
    want = {tables.table_key(m, n, k) for m, k, n in shapes.PRESETS["decode"]}
    assert len(keys) == len(set(keys)) and set(keys) == want


def test_the_timer_follows_the_preset_and_cycles_through_operand_copies():
    """--timer auto times the decode presets and the small layers from CUDA graphs and the rest with do_bench's L2
    flush; a graph timing cycles through operand copies, one call after another."""
    assert tune.timer_name("auto", "decode") == tune.timer_name("auto", "decode-buckets") == "graph"
    assert tune.timer_name("auto", "small") == "graph"
    assert tune.timer_name("auto", "grid") == "graph"
    assert tune.timer_name("auto", "speed") == tune.timer_name("flush", "decode") == "flush"
    assert tune.copies_for(10**9, "flush", "cpu") == 1
    turn = tune._cycling(lambda t: t, [(1,), (2,), (3,)])
    assert [turn() for _ in range(4)] == [1, 2, 3, 1]
