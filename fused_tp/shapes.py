"""The problem shapes that `tune`, the bench scripts and the tests share, as (M tokens, K, N) of y[M, N] = x[M, K] @
w[N, K].T: one home, so that a table tuned on a preset and a bench reporting on it speak of the same shapes.

    speed    the speed issue's 18 shapes: Llama-3-70B/8B MLP shards at TP 1-8, odd widths, three decode sizes
    quick    four of them, for a look in a minute
    decode   issue 18's decode set: every projection of the DECODE_MODELS as a TP 1, 2, 4 and 8 shard (DECODE_SHARDS),
             at DECODE_TOKENS tokens
    decode-buckets  what `tune` needs to fill the table for the whole decode set: one shape per tuned-table bucket
             (the most flops; 217 of the 273 since buckets have half steps, 140 before). Session 13 tuned the H200
             at 1, 8, 32 and 128 tokens only (80 shapes), and the nearest-bucket lookup served 64 tokens the
             32-token tiles: every token count has its own buckets now
    mid      mid-size products (512-2048 tokens), which no speed-set bucket is near, and bench_layers --mid's
    layers   bench_layers.py's 16- and 128-token layers, whose output widths no decode bucket of `speed` is near
    swiglu   the down projections (M, intermediate, hidden) of bench_layers.py's SwiGLU MLPs and of Llama-3-8B's at
             TP 4 and 8, for `tune --kernel dgrad_gated` (their grad_input runs SwiGLU's derivative)
    small    small layers (16-128 tokens, 256-1024 features), for `tune --kernel dgrad` and `wgrad`: no table bucket
             was near them, and the nearest one's tiles ran grad_input over 64-128 tokens into 512-1024 features at
             2x the time of a 64 x 32 x 64 tile on the H200 (bench/NOTES.md, attempt 113); the H100's dgrad entries
             for them brought it to torch's time (attempt 114)
    grid     layers of 32-512 tokens into 512-4096 features, 80 of them, for `tune --kernel dgrad`: between `small`
             and the decode and speed sets' buckets, whose entries ran grad_input there at 1.2x torch's time on the
             H100 (bench/NOTES.md, session 52)
    tiny     for the interpreter
"""

from __future__ import annotations

# (hidden, intermediate, attention heads, key/value heads) with 128-wide heads; an expert has no attention.
DECODE_MODELS = {
    "llama3-8b": (4096, 14336, 32, 8),
    "llama3-70b": (8192, 28672, 64, 8),
    "mixtral-8x22b-expert": (6144, 16384, 0, 0),
}
DECODE_TP = (1, 2, 4, 8)
DECODE_TOKENS = (1, 4, 8, 16, 32, 64, 128)
HEAD_DIM = 128


def _decode_shards() -> dict[tuple[int, int], str]:
    """{(K, N): the projections with that shard}. Column layers (qkv, and gate/up as one SwiGLU launch of
    interleaved pairs) split the output features, row layers (o, down) the input features; at TP 8 each rank of a
    Llama-3 holds one key/value head."""
    shards = {}
    for model, (hidden, inter, heads, kv_heads) in DECODE_MODELS.items():
        for tp in DECODE_TP:
            proj = {"gate_up": (hidden, 2 * inter // tp), "down": (inter // tp, hidden)}
            if heads:
                proj = {
                    "qkv": (hidden, (heads + 2 * kv_heads) * HEAD_DIM // tp),
                    "o": (heads * HEAD_DIM // tp, hidden),
                    **proj,
                }
            for name, kn in proj.items():
                label = f"{model} {name} tp{tp}"
                shards[kn] = f"{shards[kn]}, {label}" if kn in shards else label
    return shards


DECODE_SHARDS = _decode_shards()
_SPEED_DECODE = [(m, k, n) for m in (1, 16, 128) for k, n in ((8192, 14336), (14336, 8192))]
DECODE = [(m, k, n) for m in DECODE_TOKENS for k, n in DECODE_SHARDS]


def _one_per_bucket(shapes: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    from .kernels.tables import table_key  # the tuned table's bucket of a forward launch C[M, N] (K deep)

    best = {}
    for M, K, N in shapes:
        key = table_key(M, N, K)
        if key not in best or M * K * N > best[key][0] * best[key][1] * best[key][2]:
            best[key] = (M, K, N)
    return list(best.values())


PRESETS = {
    "speed": [
        (8192, 8192, 14336),
        (8192, 14336, 8192),
        (8192, 8192, 7168),
        (8192, 7168, 8192),
        (8192, 8192, 3584),
        (8192, 3584, 8192),
        (4096, 4096, 7168),
        (4096, 7168, 4096),
        (16384, 4096, 1792),
        (32768, 768, 3072),
        (1000, 4000, 3000),
        (4097, 4095, 1023),
    ]
    + _SPEED_DECODE,
    "quick": [(8192, 8192, 14336), (4096, 4096, 7168), (1000, 4000, 3000), (4097, 4095, 1023), (16, 8192, 14336)],
    "decode": DECODE,
    "decode-buckets": _one_per_bucket(DECODE),
    "mid": [
        (512, 4096, 1024),
        (1024, 4096, 1024),
        (2048, 4096, 1024),
        (1024, 1024, 4096),
        (512, 4096, 4096),
        (2048, 4096, 4096),
        (2048, 4096, 14336),
        # the products of bench_layers --mid's steps (Llama-3-8B's MLP; fc1 of SwiGLU is 2 x 14336 wide)
        (512, 4096, 14336),
        (1024, 4096, 14336),
        (512, 14336, 4096),
        (1024, 14336, 4096),
        (2048, 14336, 4096),
        (512, 4096, 28672),
        (1024, 4096, 28672),
        (2048, 4096, 28672),
    ],
    "layers": [(16, 4096, 14336), (16, 14336, 4096), (128, 8192, 7168), (128, 7168, 8192)],
    "swiglu": [
        (16, 14336, 4096),
        (128, 7168, 8192),
        (512, 14336, 4096),
        (1024, 14336, 4096),
        (2048, 14336, 4096),
        (4096, 7168, 4096),
        (8192, 14336, 4096),
        (8192, 7168, 8192),
        (4096, 3584, 4096),
        (1024, 1792, 4096),
    ],
    "small": [
        (m, k, n)
        for m in (16, 64, 128)
        for n, k in ((256, 256), (512, 512), (768, 768), (1024, 576), (576, 1024), (1024, 1024))
    ],
    "grid": [
        (m, k, n) for m in (32, 64, 128, 256, 512) for k in (512, 1024, 2048, 4096) for n in (512, 1024, 2048, 4096)
    ],
    "tiny": [(8, 16, 24), (33, 40, 17)],
}
