"""The first call of a shape, with the shipped tuned table against run-time autotuning (FUSED_TP_AUTOTUNE=1),
and the speed each then runs at, side by side.

    python bench/bench_first_call.py [--dtype bf16] [--shapes M,K,N ...]

Each mode runs in a fresh process with an empty Triton cache (TRITON_CACHE_DIR), so the first call pays what a
user's first call pays: compiling, and with autotuning, compiling and timing every candidate. Per shape and mode:
the first forward + backward products (linear, grad_input, grad_params) in seconds, then the steady-state ms of
each product (do_bench median) and cuBLAS's in the same process. Writes
bench/results/<gpu>/bench_first_call_<dtype>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

SHAPES = [(8192, 8192, 14336), (1000, 4000, 3000), (16, 8192, 14336)]


def child(dtype_name: str, shapes) -> list[dict]:
    import torch
    import torch.nn.functional as F
    import triton.testing

    from common import DTYPES
    from fused_tp import kernels, path_counts

    dtype, rows = DTYPES[dtype_name], []
    for M, K, N in shapes:
        x, w, b = (torch.randn(s, device="cuda", dtype=dtype) for s in ((M, K), (N, K), (N,)))
        g = torch.randn(M, N, device="cuda", dtype=dtype)
        ours = {"fwd": lambda: kernels.linear(x, w, b), "dgrad": lambda: kernels.grad_input(g, w),
                "wgrad": lambda: kernels.grad_params(g, x)}  # fmt: skip
        theirs = {"fwd": lambda: F.linear(x, w, b), "dgrad": lambda: g @ w, "wgrad": lambda: (g.t() @ x, g.sum(0))}
        torch.cuda.synchronize()
        start = time.perf_counter()
        for fn in ours.values():
            fn()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - start
        bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
        row = dict(M=M, K=K, N=N, first_call_s=first_s, sources=dict(path_counts))
        for name in ours:
            row[f"{name}_ms"], row[f"{name}_cublas_ms"] = bench(ours[name]), bench(theirs[name])
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--shapes", nargs="*", default=[",".join(map(str, s)) for s in SHAPES])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    if args.child:
        print(json.dumps(child(args.dtype, shapes)))
        return
    from common import env, markdown_table, results_dir, write

    rows = []
    for mode in ("table", "autotune"):
        with tempfile.TemporaryDirectory() as cache:
            environ = dict(os.environ, TRITON_CACHE_DIR=cache)
            environ.pop("FUSED_TP_AUTOTUNE", None)
            if mode == "autotune":
                environ["FUSED_TP_AUTOTUNE"] = "1"
            command = [sys.executable, __file__, "--child", "--dtype", args.dtype, "--shapes", *args.shapes]
            done = subprocess.run(command, env=environ, capture_output=True, text=True, check=True)
        for r in json.loads(done.stdout.splitlines()[-1]):
            rows.append(dict(mode=mode, **r))
            print(mode, r["M"], r["K"], r["N"], f"first call {r['first_call_s']:.2f} s", flush=True)
    info = env()
    for r in rows:
        r.update(info)
    write(results_dir(info["gpu"]) / f"bench_first_call_{args.dtype}.json", {"env": info, "rows": rows})
    print(markdown_table(rows, ["mode", "M", "K", "N", "first_call_s", "fwd_ms", "fwd_cublas_ms", "dgrad_ms",
                                "dgrad_cublas_ms", "wgrad_ms", "wgrad_cublas_ms"]))  # fmt: skip


if __name__ == "__main__":
    main()
