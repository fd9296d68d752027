"""The first call of a shape, with the shipped tuned table against run-time autotuning (FUSED_TP_AUTOTUNE=1),
and the speed of the configs each picks, side by side.

    python bench/bench_first_call.py [--dtype bf16] [--shapes speed | M,K,N ...]

Each mode runs in a fresh process with an empty Triton cache (TRITON_CACHE_DIR), so the first call pays what a
user's first call pays: compiling, and with autotuning, compiling and timing every candidate. Per shape and mode:
the first forward + backward products (linear, grad_input, grad_params) in seconds. Then, in the autotuning
process, the steady-state ms of each product with the config autotuning chose and with the config the table (or,
where it has no entry, the rule) picks, both pinned, and cuBLAS's, timed interleaved in that one process
(common.time_interleaved): `autotuned_over_table` > 1 means autotuning's choice is faster. `--shapes speed` is the
18 shapes of the speed issue. Writes bench/results/<gpu>/bench_first_call_<dtype>.json and prints a markdown table.
Without a GPU it runs through Triton's interpreter on tiny shapes, timed by the wall clock, and writes nothing:
a check of the script (tests/test_demo.py runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

SHAPES = [(8192, 8192, 14336), (1000, 4000, 3000), (16, 8192, 14336)]
PRODUCTS = ("fwd", "dgrad", "wgrad")


def child(dtype_name: str, shapes, autotuning: bool) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from common import DTYPES, time_interleaved

    from fused_tp import kernels, path_counts
    from fused_tp.kernels import autotune, configs, jit, plan

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, rows = DTYPES[dtype_name], []
    for M, K, N in shapes:
        x, w, b = (torch.randn(s, device=device, dtype=dtype) for s in ((M, K), (N, K), (N,)))
        g = torch.randn(M, N, device=device, dtype=dtype)
        ours = {
            "fwd": lambda: kernels.linear(x, w, b),
            "dgrad": lambda: kernels.grad_input(g, w),
            "wgrad": lambda: kernels.grad_params(g, x),
        }
        theirs = {"fwd": lambda: F.linear(x, w, b), "dgrad": lambda: g @ w, "wgrad": lambda: (g.t() @ x, g.sum(0))}
        # each product's launcher (M, N, K), as the tables and the autotuner key it
        launch = {"fwd": (M, N, K), "dgrad": (M, K, N), "wgrad": (N, K, M)}
        if device == "cuda":
            torch.cuda.synchronize()
        before = path_counts.copy()
        start = time.perf_counter()
        for fn in ours.values():
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        row = dict(
            M=M,
            K=K,
            N=N,
            first_call_s=time.perf_counter() - start,
            sources={k: v - before[k] for k, v in path_counts.items() if k.startswith("config_")},
        )
        if autotuning:
            for name in PRODUCTS:
                key = next(k for k in autotune.autotuned if k[2] == name and k[7:] == launch[name])
                tma, tf32 = key[5], key[4]
                tuned, dev = autotune.autotuned[key], plan.device(x.get_device())
                table, source = plan.pick_config(
                    *launch[name],
                    dtype,
                    interpreted=jit.INTERPRETED,
                    tma=tma,
                    slots=dev.slots,
                    product=name,
                    gpu=dev.gpu,
                    tf32=tf32,
                )
                t = time_interleaved(
                    {
                        "autotuned": _pinned(ours[name], tuned, configs),
                        "table": _pinned(ours[name], table, configs),
                        "cublas": theirs[name],
                    },
                    timer=None if device == "cuda" else autotune.timer,
                )
                row.update(
                    {
                        f"{name}_autotuned_ms": t["autotuned"][0],
                        f"{name}_table_ms": t["table"][0],
                        f"{name}_cublas_ms": t["cublas"][0],
                        f"{name}_table_source": source,
                        f"{name}_autotuned_over_table": t["table"][0] / t["autotuned"][0],
                        f"{name}_same_config": tuned == _unsplit(table),
                        f"{name}_spread": max(s for _, s in t.values()),
                    }
                )
        rows.append(row)
    return rows


def _pinned(fn, cfg, configs):
    def run():
        with configs.pin_config(cfg):
            return fn()

    return run


def _unsplit(cfg):
    """pick_config fills split_k in; the autotuner keeps the candidate as the space lists it."""
    return dataclasses.replace(cfg, split_k=None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--shapes", nargs="*", default=None, help="speed, or M,K,N triples (default: three shapes)")
    p.add_argument("--child", choices=["table", "autotune"], help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    if args.shapes == ["speed"]:
        from fused_tp.tune import PRESETS

        shapes = PRESETS["speed"]
    elif args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    else:
        shapes = SHAPES if torch.cuda.is_available() else [(8, 16, 24), (33, 40, 17)]
    if args.child:
        print(json.dumps(child(args.dtype, shapes, args.child == "autotune")))
        return
    from common import env, geomean, markdown_table, results_dir, write

    rows = []
    for mode in ("table", "autotune"):
        with tempfile.TemporaryDirectory() as cache:
            environ = dict(os.environ, TRITON_CACHE_DIR=cache)
            environ.pop("FUSED_TP_AUTOTUNE", None)
            if mode == "autotune":
                environ["FUSED_TP_AUTOTUNE"] = "1"
            if not torch.cuda.is_available():
                environ["TRITON_INTERPRET"] = "1"
            command = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--dtype",
                args.dtype,
                "--shapes",
                *(",".join(map(str, s)) for s in shapes),
            ]
            done = subprocess.run(command, env=environ, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{mode} process failed:\n{done.stderr}")
        for r in json.loads(done.stdout.splitlines()[-1]):
            rows.append(dict(mode=mode, **r))
            print(mode, r["M"], r["K"], r["N"], f"first call {r['first_call_s']:.2f} s", flush=True)
    info = env()
    first = [
        dict(M=t["M"], K=t["K"], N=t["N"], table_first_s=t["first_call_s"], autotune_first_s=a["first_call_s"])
        for t, a in zip((r for r in rows if r["mode"] == "table"), (r for r in rows if r["mode"] == "autotune"))
    ]
    speed = [
        dict(
            M=r["M"],
            K=r["K"],
            N=r["N"],
            product=name,
            autotuned_ms=r[f"{name}_autotuned_ms"],
            table_ms=r[f"{name}_table_ms"],
            cublas_ms=r[f"{name}_cublas_ms"],
            autotuned_over_table=r[f"{name}_autotuned_over_table"],
            same_config=r[f"{name}_same_config"],
            spread=r[f"{name}_spread"],
        )
        for r in rows
        if r["mode"] == "autotune"
        for name in PRODUCTS
    ]
    geo = {name: geomean(s["autotuned_over_table"] for s in speed if s["product"] == name) for name in PRODUCTS}
    if torch.cuda.is_available():  # without one, the interpreter's run is a check of the script: nothing to keep
        write(
            results_dir(info["gpu"]) / f"bench_first_call_{args.dtype}.json",
            {"env": info, "first_call": first, "speed": speed, "geomean_autotuned_over_table": geo, "rows": rows},
        )
    print(markdown_table(first, ["M", "K", "N", "table_first_s", "autotune_first_s"]))
    print()
    print(
        markdown_table(
            speed,
            [
                "product",
                "M",
                "K",
                "N",
                "autotuned_ms",
                "table_ms",
                "cublas_ms",
                "autotuned_over_table",
                "same_config",
                "spread",
            ],
        )
    )
    print(
        "\ngeometric mean of autotuned over table (> 1: autotuning's configs are faster):",
        ", ".join(f"{name} {v:.3f}" for name, v in geo.items()),
    )
    if not torch.cuda.is_available():
        print("no GPU: Triton's interpreter ran the kernels, timed by the wall clock: a check of the script, not speed")


if __name__ == "__main__":
    main()
