"""Tuned tables: the configs `python -m fused_tp tune` measured fastest, shipped as JSON in fused_tp/kernels/tuned/
(one file per GPU model), read once per process and looked up by the nearest shape bucket.

A bucket is a size rounded up to the grid 1, 2, 3, 4, 6, 8, 12, 16, ..., 3072, 4096, 6144, 8192, ... (powers of two
and one and a half times them: table_bucket), in each of M, N and K of the launch. The half steps keep apart shards
that want different tiles: 8192 x 2560 and 7168 x 4096, or 8192 x 10240 and 8192 x 14336, shared a power-of-two
bucket, and on the H100 the narrower ran the wider one's tile at 0.68-0.78x cuBLAS's speed where a tile of its own
ran 0.85-0.95x (bench/NOTES.md, attempt 76). Entries tuned before session 28 sit at power-of-two buckets, which the
grid keeps: a bucket 1.5 x 2^k is log2(4/3) from 2^(k+1) and log2(3/2) from 2^k, so a size with no half-step entry
of its own takes the entry of the power of two above it, as it did before.

The file: {"format": 1, "gpus": {gpu name: {product: {dtype: {"tma" | "pointers": {"MxNxK" bucket:
{"config": {KernelConfig fields}, "reach": log2 steps (optional), ...measured fields, kept for people, ignored
here}}}}}}}.

An entry with a reach serves only the shapes at most that far from its bucket (log2 steps summed over M, N and K, as
the nearest-bucket rule measures); one without serves whatever it is nearest. Small layers' entries carry one
(`tune --reach`): tuned at 16-128 tokens into 256-1024 features, they were the nearest entry of Llama shards 4096-8192
wide and ran there up to 2.5x slower than the entries they displaced (bench/NOTES.md, session 51).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import re
from typing import NamedTuple

import torch

from .configs import PRODUCTS, KernelConfig, bucket

TABLE_DIR = pathlib.Path(__file__).resolve().parent / "tuned"


def gpu_slug(gpu: str) -> str:
    """A GPU name as its table file (and its bench results folder) is named: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")


def table_bucket(n: int) -> int:
    """A size's table bucket: the next of 1, 2, 3, 4, 6, 8, 12, ... (a power of two, or 1.5 times one; 0 stays 0)."""
    p = bucket(n)
    return 3 * p // 4 if p >= 4 and n <= 3 * p // 4 else p


def bucket_of(M: int, N: int, K: int) -> tuple[int, int, int]:
    return table_bucket(M), table_bucket(N), table_bucket(K)


def table_key(M: int, N: int, K: int) -> str:
    return "x".join(map(str, bucket_of(M, N, K)))


@functools.cache
def tuned_table(gpu: str) -> dict:
    """{(product, dtype name, path): {bucket (M, N, K): Entry}} for `gpu` from the tables in TABLE_DIR; empty if
    none names it. A malformed table raises ValueError naming its file and entry."""
    found = {}
    for path in sorted(TABLE_DIR.glob("*.json")):
        found.update(load_table(path).get(gpu, {}))
    return found


def load_table(path: pathlib.Path) -> dict:
    """{gpu: {(product, dtype, path): {bucket: Entry}}} of one tuned table file (the format above)."""
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"tuned table {path}: not readable JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("gpus"), dict):
        raise ValueError(f'tuned table {path}: expected {{"format": 1, "gpus": {{...}}}}')
    out = {}
    for gpu, products in data["gpus"].items():
        for product, dtypes in _items(products, f"{path}: {gpu}"):
            if product not in PRODUCTS:
                raise ValueError(f"tuned table {path}: {gpu}: unknown product {product!r} (known: {PRODUCTS})")
            for dtype, routes in _items(dtypes, f"{path}: {gpu}/{product}"):
                if dtype not in TABLE_DTYPES:
                    raise ValueError(
                        f"tuned table {path}: {gpu}/{product}: unknown dtype {dtype!r} (known: {TABLE_DTYPES})"
                    )
                for route, entries in _items(routes, f"{path}: {gpu}/{product}/{dtype}"):
                    if route not in ("tma", "pointers"):
                        raise ValueError(f"tuned table {path}: {gpu}/{product}/{dtype}: unknown path {route!r}")
                    where = f"tuned table {path}: {gpu}/{product}/{dtype}/{route}"
                    table = out.setdefault(gpu, {}).setdefault((product, dtype, route), {})
                    for key, entry in _items(entries, where):
                        dims = key.split("x")
                        if len(dims) != 3 or not all(d.isdigit() for d in dims):
                            raise ValueError(f"{where}: bucket {key!r} is not MxNxK")
                        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
                            raise ValueError(f"{where}/{key}: expected an object with a 'config' object")
                        reach = entry.get("reach", math.inf)
                        if isinstance(reach, bool) or not isinstance(reach, (int, float)) or not reach >= 0:
                            raise ValueError(f"{where}/{key}: 'reach' must be a number >= 0, got {reach!r}")
                        config = KernelConfig.from_dict(entry["config"], f"{where}/{key}")
                        table[tuple(map(int, dims))] = Entry(config, float(reach))
    return out


class Entry(NamedTuple):
    """A table entry: its config, and how far (log2 steps) from its bucket it serves (math.inf: any distance)."""

    config: KernelConfig
    reach: float


def _items(d, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"tuned table {where}: expected an object, got {type(d).__name__}")
    return d.items()


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}  # the names --dtype options take (tune, the benches)
# A table's dtype names: fp32 operands have two, as their dot products cut operands to TF32 or not (cuBLAS and
# fused_tp follow torch.backends.cuda.matmul.allow_tf32), and the two run at speeds 4-8x apart.
TABLE_DTYPES = ("bf16", "fp16", "fp32", "tf32")


def table_dtype(dtype: torch.dtype, tf32: bool) -> str:
    """The name a tuned table keys operands of `dtype` by; `tf32`: fp32 dot products may use TF32."""
    return "tf32" if tf32 and dtype == torch.float32 else DTYPE_NAMES[dtype]


def table_config(
    gpu: str, product: str, M: int, N: int, K: int, dtype: torch.dtype, tma: bool, tf32: bool = False
) -> KernelConfig | None:
    """The tuned config of the entry whose bucket is nearest (M, N, K)'s, in log2 steps summed over the three dims
    (ties: the smaller bucket), among those whose reach it is within; None if the table has none for this product,
    dtype (table_dtype) and path. A GEMV entry serves no more tokens than its bucket's: the form reads the weight
    tile once per row, so a config timed at one row loses at two to the tiles (bench/NOTES.md, attempt 48)."""
    entries = tuned_table(gpu).get((product, table_dtype(dtype, tf32), "tma" if tma else "pointers"), {})
    rows = table_bucket(M)
    want = [math.log2(max(b, 1)) for b in bucket_of(M, N, K)]
    steps = {b: sum(abs(math.log2(max(x, 1)) - w) for x, w in zip(b, want)) for b in entries}
    near = [b for b, e in entries.items() if (e.config.BLOCK_M > 1 or b[0] >= rows) and steps[b] <= e.reach]
    return entries[min(near, key=lambda b: (steps[b], b))].config if near else None
