"""Time every candidate config of the matmul kernel on the bench shapes, beside cuBLAS, and keep every timing.

    python bench/sweep_configs.py [--dtype bf16] [--quick | --split]

--split times the split-K choices instead (each of SPLIT_BASES with split_k None, the rule's pick, and 1..8) on
the shapes where some product has fewer output tiles than the card has SMs.

Writes bench/results/<gpu>/sweep_configs_<dtype>.json (every config's ms per op and shape) and prints, per op
and shape, the best config and its ratio against cuBLAS next to the ratio of the config fused_tp picks today.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import triton.testing

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from bench_linear import errors, ops  # noqa: E402
from common import DTYPES, env, markdown_table, require_gpu, results_dir, write  # noqa: E402

from fused_tp.kernels.configs import SPACE, KernelConfig, pin_config  # noqa: E402
from fused_tp.shapes import PRESETS  # noqa: E402
from fused_tp.tolerance import norm_check  # noqa: E402

CANDIDATES = SPACE  # the tune command's space (fused_tp/kernels/configs.py)

SPLIT_BASES = [
    KernelConfig(128, 256, 64, num_warps=8, num_stages=3),
    KernelConfig(128, 128, 64, num_warps=8, num_stages=4),
    KernelConfig(64, 128, 128, num_warps=4, num_stages=4),
    KernelConfig(64, 256, 64, num_warps=4, num_stages=4),
]
SPLIT_SHAPES = [(16384, 4096, 1792), (32768, 768, 3072), (1000, 4000, 3000), (4097, 4095, 1023)] + [
    (m, k, n) for m in (1, 16, 128) for k, n in ((8192, 14336), (14336, 8192))
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--split", action="store_true", help="sweep split_k on the few-tile shapes")
    args = p.parse_args()
    require_gpu("sweep_configs.py")
    dtype, info = DTYPES[args.dtype], env()
    if args.split:
        shapes = SPLIT_SHAPES
        candidates = [dataclasses.replace(c, split_k=s) for c in SPLIT_BASES for s in (None, 1, 2, 3, 4, 6, 8)]
    else:
        shapes, candidates = PRESETS["quick" if args.quick else "speed"], CANDIDATES
    rows, best = [], []
    for M, K, N in shapes:
        for op, (base, fused, check, flops) in ops(M, K, N, dtype).items():
            base_ms = triton.testing.do_bench(base, warmup=25, rep=100, return_mode="median")
            default_ms = triton.testing.do_bench(fused, warmup=25, rep=100, return_mode="median")
            timings = []
            for cfg in candidates:
                if cfg.BLOCK_M > 64 and M <= 64:
                    continue
                with pin_config(cfg):
                    try:
                        ok = max(errors(fused(), base(), check)) <= norm_check(dtype)
                        ms = triton.testing.do_bench(fused, warmup=25, rep=100, return_mode="median") if ok else None
                    except Exception as e:  # a config that does not compile (shared memory) is a result too
                        ok, ms = False, None
                        print(f"  {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                timings.append((cfg, ms, ok))
                rows.append(
                    dict(
                        op=op,
                        M=M,
                        K=K,
                        N=N,
                        config=repr(cfg),
                        ms=ms,
                        correct=ok,
                        baseline_ms=base_ms,
                        tflops=None if ms is None else flops / ms * 1e-9,
                        **info,
                    )
                )
            good = [(ms, cfg) for cfg, ms, ok in timings if ms is not None]
            ms, cfg = min(good, key=lambda t: t[0])
            best.append(
                dict(
                    op=op,
                    M=M,
                    K=K,
                    N=N,
                    best_ratio=base_ms / ms,
                    default_ratio=base_ms / default_ms,
                    best=f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K} w{cfg.num_warps} s{cfg.num_stages}"
                    f"{' p' if cfg.persistent else ''} k{cfg.split_k or 'auto'}",
                )
            )
            print(best[-1], flush=True)
    name = f"sweep_{'split' if args.split else 'configs'}_{args.dtype}.json"
    write(results_dir(info["gpu"]) / name, {"env": info, "best": best, "rows": rows})
    print("\n" + markdown_table(best, ["op", "M", "K", "N", "best", "best_ratio", "default_ratio"]))


if __name__ == "__main__":
    main()
