"""Launching a planned kernel (plan.Launch), and the global memory device-side tensor descriptors need.

Triton's JITFunction.run binds and specialises every argument of a launch, which cost about three times the host
time of calling the compiled kernel with the same arguments, and more than all of F.linear (bench/NOTES.md,
attempt 18). So the first launch of a plan goes through kernel[grid](...), which
compiles and returns the compiled kernel, and later launches of the same plan call that kernel directly. A plan
fixes everything Triton specialises on (the meta-parameters, each integer argument's value, each tensor's dtype
and 16-byte alignment, the device: plan.matmul_plan's key), so the kernel run would choose is the one kept; it is
kept on the plan, whose cache is bounded.

The direct call goes one level further down than CompiledKernel.run: to the C function Triton built for the kernel
(its launcher's `launch`), with the descriptor scratch taken from this module's buffers instead of through Triton's
allocator hook (a context variable and a Python callback per launch); that saves a third of the launch's host time
(bench/NOTES.md, attempt 53). It uses Triton's compiled-kernel internals (the launcher's attributes and the C
function's arguments), which are not a public API: it is on only for the Triton versions it was run with on a GPU
(TESTED_TRITON), and FUSED_TP_DIRECT_LAUNCH=0 (read at import) turns it off. Off, every launch goes through
kernel[grid] (the same kernel, with Triton's binding's host time per launch); on an untested Triton a warning says
so once. path_counts["direct_launch"] counts the direct launches.

A launch through tensor descriptors captured into a CUDA graph takes them made on the host (jit.py's HOST_DESC,
through kernel[grid]): their encoding costs host time at capture only, and every replay is spared the programs'
prologue that makes them on the device (bench/NOTES.md, attempt 66). Eager launches keep the device-made ones,
which cost no host time. HOST_DESCRIPTORS says where ("graphs", "always" or "never"; FUSED_TP_HOST_DESCRIPTORS, read
at import, sets it); path_counts["host_descriptors"] counts those launches.
"""

from __future__ import annotations

import collections
import math
import os
import types
import warnings

import torch
import triton
from triton import knobs
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from .jit import INTERPRETED

TESTED_TRITON = ("3.6",)  # major.minor versions whose compiled kernels were launched directly on a GPU
TRITON_VERSION = ".".join(triton.__version__.split(".")[:2])
DIRECT = TRITON_VERSION in TESTED_TRITON and os.environ.get("FUSED_TP_DIRECT_LAUNCH", "1") != "0"
_warned_untested = False
HOST_DESCRIPTORS = os.environ.get("FUSED_TP_HOST_DESCRIPTORS", "graphs")
if HOST_DESCRIPTORS not in ("graphs", "always", "never"):
    raise ValueError(f"FUSED_TP_HOST_DESCRIPTORS={HOST_DESCRIPTORS!r}: expected 'graphs', 'always' or 'never'")

# How many launches took each path since import, by key: "triton", "triton-interpreter" or "torch" per product;
# "tma" the matmul launches that moved tiles through tensor descriptors, "split_k" those that split their K loop,
# "align_copy" / "fp32_copy" the operands copied first (layout.py), "config_pinned" / "config_autotuned" /
# "config_table" / "config_rule" where each config came from, "direct_launch" the launches made directly.
path_counts: collections.Counter = collections.Counter()


def launch(kernel, spec, tensors: tuple) -> None:
    """kernel[spec.grid](*tensors, *spec.ints, **spec.kwargs) on the tensors' device (spec.device); directly through
    the compiled kernel's C launcher from the second launch of `spec` on (see above)."""
    if spec.host is not None and _host_made(spec.device):
        _launch_through_triton(kernel, spec.host, host_descriptors(spec, tensors))
        path_counts["host_descriptors"] += 1
        return
    direct = spec.direct
    if direct is None or not DIRECT:
        _launch_through_triton(kernel, spec, tensors)
        return
    c_launch, function, metadata, flags, scratch_bytes, values, compiled = direct
    device = torch._C._cuda_getDevice()  # torch.cuda.current_device() without its lazy-init check: CUDA is up here
    if device != spec.device:  # Triton launches on the current device: made the tensors' one, as F.linear does
        with torch.cuda.device(spec.device):
            launch(kernel, spec, tensors)
        return
    stream = torch._C._cuda_getCurrentRawStream(device)  # what Triton's driver reads for the current stream
    scratch = _descriptor_scratch(scratch_bytes, 0, stream) if scratch_bytes else None
    # Launch hooks (profilers) are passed on as run passes them, but an empty hook chain (Triton keeps hooks in
    # chains that are never None) is passed as None: the launcher then skips it, and the launch metadata only hooks
    # read is not built (bench/NOTES.md, attempt 24).
    enter, leave = hook(knobs.runtime.launch_enter_hook), hook(knobs.runtime.launch_exit_hook)
    meta = None
    if enter is not None or leave is not None:
        meta = compiled.launch_metadata(spec.grid, stream, *tensors, *spec.ints, *values)
    # The tensors as their addresses: the launcher then skips its data_ptr call and its check that the address is
    # one the device can read, per tensor (bench/NOTES.md, attempts 61-62). Every tensor here is on spec.device:
    # the products' checks put the caller's there (check_operands), and they make the rest there.
    ptrs = [t.data_ptr() for t in tensors]
    c_launch(
        *spec.grid, stream, function, *flags, scratch, None, metadata, meta, enter, leave, *ptrs, *spec.ints, *values
    )
    path_counts["direct_launch"] += 1


def _host_made(device: int) -> bool:
    """Whether a launch through tensor descriptors on `device` takes them made on the host (HOST_DESCRIPTORS)."""
    if HOST_DESCRIPTORS == "graphs":
        return device >= 0 and torch._C._cuda_isCurrentStreamCapturing()
    return HOST_DESCRIPTORS == "always"


def host_descriptors(spec, tensors: tuple) -> tuple:
    """matmul_kernel's tensors (a, b, bias, c, partials, aux, counters) with the descriptors its prologue would make
    (jit.py, TMA) made on the host instead, in the slots of the tensors they address."""
    a, b, bias, c, partials, aux, counters = tensors
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm = spec.ints[:8]
    kw = spec.kwargs
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    if kw["A_T"]:
        a = TensorDescriptor(a, [K, M], [stride_ak, 1], [bk, bm])
    else:
        a = TensorDescriptor(a, [M, K], [stride_am, 1], [bm, bk])
    if kw["B_T"]:
        b = TensorDescriptor(b, [N, K], [stride_bn, 1], [bn, bk])
    else:
        b = TensorDescriptor(b, [K, N], [stride_bk, 1], [bk, bn])
    if kw["TMA_C"]:
        block = [bm, bn // 2] if kw["AUX"] else [bm, bn]  # the activation epilogue's column halves
        c = TensorDescriptor(c, [M, N], [stride_cm, 1], block)
        if kw["AUX"]:
            aux = TensorDescriptor(aux, [M, N], [stride_cm, 1], block)
    return a, b, bias, c, partials, aux, counters


def _launch_through_triton(kernel, spec, tensors: tuple) -> None:
    """The first launch of `spec` (which compiles), or every launch where the direct one is off."""
    if not INTERPRETED and spec.device != torch._C._cuda_getDevice():
        with torch.cuda.device(spec.device):  # Triton launches (and compiles for) the current device
            _launch_through_triton(kernel, spec, tensors)
        return
    if spec.tma and not INTERPRETED:
        # Triton keeps its allocator in a context variable, which autograd's backward thread does not inherit.
        triton.set_allocator(_descriptor_scratch)
    compiled = kernel[spec.grid](*tensors, *spec.ints, **spec.kwargs)
    if isinstance(kernel, JITFunction) and DIRECT:  # not a stand-in (tests, bench_host's stubs)
        spec.direct = _direct_entry(kernel, spec, compiled)
    elif not INTERPRETED:
        _warn_untested_once()


def _direct_entry(kernel, spec, compiled) -> tuple | None:
    """What the direct launches of `spec` pass Triton's C launcher besides the grid, the stream and the arguments
    (Triton 3.6's CudaLauncher.__call__ builds the same): or None, leaving every launch to kernel[grid], where the
    launcher wants what only Triton's Python gives it (profile scratch: a kernel built for instrumentation; a
    launch function wrapped for descriptors made on the host)."""
    launcher, meta = compiled.run, compiled.metadata
    if meta.profile_scratch_size or not isinstance(launcher.launch, types.BuiltinFunctionType):
        return None
    scratch_bytes = meta.global_scratch_size * math.prod(spec.grid) * launcher.num_ctas
    values = tuple(spec.kwargs[p.name] for p in kernel.params if p.is_constexpr)
    flags = (launcher.launch_cooperative_grid, launcher.launch_pdl)
    return launcher.launch, compiled.function, compiled.packed_metadata, flags, scratch_bytes, values, compiled


def hook(chain):
    """A launch hook as the launcher takes it: None for an empty chain (or none)."""
    return chain if chain is not None and getattr(chain, "calls", True) else None


def _warn_untested_once() -> None:
    global _warned_untested
    if not _warned_untested and TRITON_VERSION not in TESTED_TRITON:
        _warned_untested = True
        warnings.warn(
            f"fused_tp: Triton {triton.__version__} is not among the versions whose compiled kernels it "
            f"launches directly ({', '.join(TESTED_TRITON)}): every launch goes through Triton's launcher, "
            "which costs more host time per launch (fused_tp.kernels.launch.DIRECT; bench/NOTES.md, attempt 18)",
            stacklevel=4,
        )


_kept: dict = {}  # (what, device index, stream) -> a buffer the launches on that stream reuse
_reuse_scratch = True  # off while a registered operator runs (scratch_per_launch)
_default_streams: dict = {}  # device index -> the handle of its default stream


class scratch_per_launch:
    """Launches inside take fresh scratch buffers each, kept nowhere, unless they run on the device's default
    stream. For the registered operators (ops.py): torch.compile's CUDA graphs warm up with this thread's
    allocations routed to the graph's private pool, where a buffer kept past the graph counts as a leak, and they
    warm up and capture on a stream of their own (torch._inductor.cudagraph_trees). On the default stream, where a
    compiled graph without CUDA graphs runs, the operators reuse the kept buffers as eager launches do: a split-K
    launch's zeroed counters and the descriptors' scratch cost it no allocation (bench/NOTES.md, attempt 102). A
    class, not a generator: it runs around every operator call."""

    __slots__ = ("before",)

    def __enter__(self) -> None:
        global _reuse_scratch
        self.before, _reuse_scratch = _reuse_scratch, False

    def __exit__(self, *exc) -> None:
        global _reuse_scratch
        _reuse_scratch = self.before


def _default_stream(index: int) -> int:
    handle = _default_streams.get(index)
    if handle is None:
        handle = _default_streams[index] = torch.cuda.default_stream(index).cuda_stream
    return handle


def _kept_buffer(what: str, size: int, dtype: torch.dtype, device: torch.device, stream, zeroed: bool):
    """A buffer of at least `size` elements for launches on `stream`: one per (what, device, stream), reused.

    Launches on one stream run in order, so a kernel is done with the buffer before the next one uses it. Reuse
    saves an allocation per launch (host time; a zeroed one, a fill launch too) and keeps scratch out of each
    step's peak memory. A stream being captured into a CUDA graph gets its own buffer from the graph's pool, not
    kept here, and so does a launch from a registered operator off the default stream (scratch_per_launch).
    `zeroed`: a new buffer starts at zero (the kernels that use such a buffer leave it at zero)."""
    new = torch.zeros if zeroed else torch.empty
    if device.type == "cuda" and (
        torch._C._cuda_isCurrentStreamCapturing() or (not _reuse_scratch and stream != _default_stream(device.index))
    ):
        return new(size, device=device, dtype=dtype)
    key = (what, device.index, stream)
    buf = _kept.get(key)
    if buf is None or buf.numel() < size:
        buf = _kept[key] = new(size, device=device, dtype=dtype)
    return buf


def tile_counters(tiles: int, device: torch.device) -> torch.Tensor:
    """The int32 arrival counters of a split-K launch's tiles (jit.py): zero, and left zero by the kernel."""
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else None
    return _kept_buffer("counters", tiles, torch.int32, device, stream, zeroed=True)


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the descriptors a kernel makes on the device (Triton's allocator hook). torch's blocks are
    512-byte aligned, past any `alignment` asked for."""
    device = torch.device("cuda", torch._C._cuda_getDevice())
    return _kept_buffer("descriptors", size, torch.int8, device, stream, zeroed=False)
