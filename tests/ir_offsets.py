"""The element type of every pointer offset in the compiled IR of fused_tp's kernels, printed as JSON.

    python tests/ir_offsets.py      (with TRITON_INTERPRET unset: under the interpreter, Triton's own helpers such
                                     as tl.cdiv are interpreted functions and the code generator cannot call them)

The kernels are compiled for sm_90, which needs no GPU. tests/test_scale.py runs this in a subprocess.
"""

import json
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from fused_tp.kernels import epilogues, jit

# Every variant is this with its own switches over it; C moves as A and B do (TMA_C follows TMA) unless it says.
_MATMUL_META = dict(
    BLOCK_M=64,
    BLOCK_N=64,
    BLOCK_K=32,
    GROUP_M=8,
    INPUT_PRECISION="ieee",
    HAS_BIAS=True,
    UPCAST=False,
    TMA=False,
    HOST_DESC=False,
    A_T=False,
    B_T=False,
    SPLIT=False,
    ACT=None,
    AUX="",
    GATED=False,
    ROW_SUM=False,
)
_GELU_STORE = dict(ACT=epilogues.gelu, AUX="store")
VARIANTS = {
    "matmul, pointers": dict(),
    "matmul, pointers, split-K": dict(UPCAST=True, SPLIT=True),
    "matmul, GEMV form, split-K": dict(BLOCK_M=1, BLOCK_N=4, SPLIT=True),
    "matmul, GEMV form, SwiGLU": dict(BLOCK_M=1, BLOCK_N=4, ACT=epilogues.swiglu, AUX="store", GATED=True),
    "matmul, descriptors": dict(TMA=True, B_T=True),
    "matmul, descriptors, C through pointers": dict(TMA=True, TMA_C=False, B_T=True),
    "matmul, descriptors, split-K": dict(HAS_BIAS=False, TMA=True, A_T=True, SPLIT=True),
    "matmul, descriptors, A's row sums": dict(HAS_BIAS=False, TMA=True, A_T=True, ROW_SUM=True),
    "matmul, pointers, A's row sums": dict(HAS_BIAS=False, UPCAST=True, ROW_SUM=True),
    "matmul, descriptors, split-K, GELU storing the pre-activation": dict(
        TMA=True, B_T=True, SPLIT=True, **_GELU_STORE
    ),
    "matmul, pointers, GELU storing the pre-activation": dict(**_GELU_STORE),
    "matmul, pointers, GELU's derivative": dict(HAS_BIAS=False, ACT=epilogues.gelu_tanh_grad, AUX="load"),
    "matmul, descriptors, GELU storing the pre-activation": dict(TMA=True, B_T=True, **_GELU_STORE),
    "matmul, descriptors, GELU's derivative": dict(
        HAS_BIAS=False, TMA=True, A_T=True, ACT=epilogues.gelu_grad, AUX="load"
    ),
    "matmul, descriptors, C through pointers, GELU's derivative": dict(
        HAS_BIAS=False, TMA=True, TMA_C=False, A_T=True, ACT=epilogues.gelu_grad, AUX="load"
    ),
    "matmul, descriptors, SwiGLU storing the pre-activation, split-K": dict(
        TMA=True, TMA_C=False, B_T=True, SPLIT=True, ACT=epilogues.swiglu, AUX="store", GATED=True
    ),
    "matmul, pointers, SwiGLU's derivative": dict(HAS_BIAS=False, ACT=epilogues.swiglu_grad, AUX="load", GATED=True),
}


@triton.jit
def _int32_indexing(src_ptr, dst_ptr, stride, BLOCK: tl.constexpr):
    """What the check must catch: rows * stride in int32."""
    rows = tl.arange(0, BLOCK)
    tl.store(dst_ptr + rows, tl.load(src_ptr + rows * stride))


def ttir(kernel, constexprs: dict, pointer_types: dict) -> str:
    signature = {n: "constexpr" if n in constexprs else pointer_types.get(n, "i32") for n in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ttir"]


def offset_types(ir: str) -> list[str]:
    """The element type of each tt.addptr's offset operand (after the comma of its operand types)."""
    return [m.group(1) for m in re.finditer(r"tt\.addptr [^:]*:[^,]*, (?:tensor<[0-9x]*)?(i\d+)", ir)]


def main() -> dict:
    out = {}
    for name, switches in VARIANTS.items():
        meta = {**_MATMUL_META, "TMA_C": switches.get("TMA", False), **switches}
        out[name] = offset_types(
            ttir(
                jit.matmul_kernel,
                meta,
                dict(
                    a_ptr="*bf16",
                    b_ptr="*bf16",
                    bias_ptr="*bf16",
                    c_ptr="*bf16",
                    ws_ptr="*fp32",
                    aux_ptr="*bf16",
                    count_ptr="*i32",
                ),
            )
        )
    pair_meta = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, UPCAST=False, INPUT_PRECISION="ieee", ROW_SUM=True)
    pair_ptrs = {name: "*bf16" for name in ("a0", "b0", "c0", "a1", "b1", "sums1", "c1")}
    out["paired backward"] = offset_types(ttir(jit.pair_kernel, pair_meta, pair_ptrs))
    out["column sum"] = offset_types(
        ttir(jit.colsum_kernel, dict(BLOCK_M=32, BLOCK_N=64), dict(g_ptr="*bf16", out_ptr="*fp32"))
    )
    out["int32 indexing"] = offset_types(ttir(_int32_indexing, dict(BLOCK=16), dict(src_ptr="*fp32", dst_ptr="*fp32")))
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
