"""glake as PyTorch's CUDA allocator: stitching against fragmentation, no torch rebuild.

>>> import glake.torch
>>> glake.torch.install()            # before the first CUDA allocation
>>> x = torch.empty(1 << 30, device="cuda")
>>> torch.cuda.memory_allocated()    # torch's own memory API works as with torch's allocator
>>> glake.torch.memory_stats()["num_stitches"]   # glake's own figures

With the default ``"cpp"`` frontend (:mod:`glake.torch_frontend`, built against the installed torch
on first use) torch's ``memory_stats``, ``memory_summary``, ``memory_snapshot``,
``_record_memory_history``/``_dump_snapshot``, ``get/set_per_process_memory_fraction``,
``torch.cuda.OutOfMemoryError``, CUDA graph pools and ``MemPool`` behave as with torch's allocator.
This module's functions of the same names give glake's view (torch's key names plus
``num_stitches``, ``stitched_bytes.current``, ``mapped_va_bytes.current``...), under either frontend.

Notes
-----
- ``install`` must run before CUDA memory is first allocated (torch refuses to swap allocators
  afterwards). ``glake run -- python train.py`` does it for you.
- A stitched block spans several physical allocations: nvidia_peermem (GPUDirect RDMA) cannot pin
  it. Disable stitching (``stitch=False``) for buffers registered with RDMA NICs.
- CUDA graphs: allocations of a capture go to the graph's private pool, as with torch's allocator:
  memory freed during the capture is reused later in it, and graphs captured into one pool
  (``torch.cuda.graph(g, pool=...)``, ``make_graphed_callables``) share it. If the slow path must map
  during a capture, glake switches the thread to relaxed capture mode, as torch does around cudaMalloc.
- CUDA IPC of glake memory (``torch.multiprocessing`` sharing CUDA tensors) raises a clear error:
  VMM memory cannot be exported through cudaIpcGetMemHandle.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from typing import Any, Dict, List, Optional

from glake import _C
from glake.allocator import Allocator, conf_string
from glake.units import fmt_bytes
from glake.errors import BackendUnavailableError, GlakeError, GlakeWarning, InvalidArgumentError

_PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libglake_torch.so")
_state: Dict[str, Any] = {"installed": False, "allocator": None}


def plugin_path() -> str:
    """Path of the C-ABI plugin library (``glake_malloc`` / ``glake_free``)."""
    return _PLUGIN


def _pluggable():
    import torch

    return torch.cuda.memory.CUDAPluggableAllocator(_PLUGIN, "glake_malloc", "glake_free")


def _wire_hooks(pluggable) -> List[str]:
    """Connect empty_cache, set_per_process_memory_fraction and record_stream to glake."""
    lib = ctypes.CDLL(_PLUGIN)
    inner = pluggable.allocator()
    wired = []
    for setter, symbol in (("set_reset_fn", "glake_empty_cache"),
                           ("set_memory_fraction_fn", "glake_set_memory_fraction"),
                           ("set_record_stream_fn", "glake_record_stream")):
        fn = getattr(inner, setter, None)
        if fn is not None:
            fn(ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value)
            wired.append(setter)
    return wired


FRONTENDS = ("auto", "cpp", "pluggable")


def _cpp_allocator():
    """torch's CUDAAllocator interface over glake, built against this torch on first use."""
    import torch

    from glake import torch_frontend

    return torch.cuda.memory._CUDAAllocator(torch_frontend.load().make_allocator())


def _registered_for_accelerator() -> bool:
    from glake import torch_frontend

    return torch_frontend.load().register_device_allocator()


def install(frontend: Optional[str] = None, **conf: Any) -> None:
    """Make glake torch's CUDA allocator for this process.

    Parameters
    ----------
    frontend : {"auto", "cpp", "pluggable"}, optional
        How glake plugs into torch; default ``$GLAKE_TORCH_FRONTEND``, else ``"auto"``.
        ``"cpp"``: torch's own C++ allocator interface, so ``torch.cuda.memory_stats``,
        ``memory_summary``, ``memory_snapshot``, ``_record_memory_history``,
        ``torch.cuda.OutOfMemoryError``, CUDA graph pools and ``MemPool`` behave as with torch's
        allocator; compiled against the installed torch on first use (20-60 s, then cached: see
        :mod:`glake.torch_frontend`). ``"pluggable"``: torch's ``CUDAPluggableAllocator`` over
        glake's C ABI, no build, but torch's memory functions raise (use this module's) and
        ``torch.accelerator``'s report torch's own, unused allocator.
        ``"auto"``: ``"cpp"``, falling back to ``"pluggable"`` with a warning saying why.
    **conf
        Allocator configuration (see :mod:`glake.allocator`), applied over ``$GLAKE_ALLOC_CONF``.

    Raises
    ------
    BackendUnavailableError
        No usable CUDA GPU (glake's backend is not ``cuda``).
    InvalidArgumentError
        An unknown ``frontend``.
    GlakeError
        CUDA memory was already allocated through torch's own allocator, or the ``"cpp"`` frontend
        could not be built.
    """
    import torch

    if _state["installed"]:
        if conf:
            raise GlakeError("glake.torch is already installed; its configuration can no longer change")
        return
    choice = frontend or os.environ.get("GLAKE_TORCH_FRONTEND") or "auto"
    if choice not in FRONTENDS:
        raise InvalidArgumentError(f"glake.torch.install: frontend {choice!r} is not one of {', '.join(FRONTENDS)}")
    if not torch.cuda.is_available() or _C.backend_name(None) != "cuda":
        raise BackendUnavailableError("glake.torch.install() needs a CUDA GPU and glake's cuda backend "
                                      f"(backend is {_C.backend_name(None)!r}; {_C.cuda_unavailable_reason()})")
    if conf:
        _C.gmlake_configure(conf_string(conf))
    allocator_obj, used = None, choice
    if choice in ("auto", "cpp"):
        try:
            allocator_obj, used = _cpp_allocator(), "cpp"
        except Exception as e:  # noqa: BLE001  (a compiler, header or link failure: say which)
            if choice == "cpp":
                raise GlakeError(f"glake.torch: the C++ torch frontend could not be built or loaded: {e}") from e
            warnings.warn(f"glake.torch: the C++ torch frontend could not be built or loaded ({e}); using torch's "
                          "pluggable allocator interface instead, under which torch.cuda.memory_stats and friends "
                          "raise: use glake.torch.memory_stats(). Set GLAKE_TORCH_FRONTEND=pluggable to skip "
                          "the build.", GlakeWarning, stacklevel=2)
    if allocator_obj is None:
        allocator_obj, used = _pluggable(), "pluggable"
    try:
        torch.cuda.memory.change_current_allocator(allocator_obj)
    except RuntimeError as e:
        raise GlakeError("glake.torch.install() must run before the first CUDA allocation of this process "
                         f"(torch says: {e}). Call it at the top of your script, or use `glake run -- python ...`."
                         ) from e
    if used == "cpp" and not _registered_for_accelerator():
        raise GlakeError("glake.torch: torch kept another allocator registered for CUDA devices; "
                         "torch.accelerator's memory functions would not see glake")
    if used == "pluggable":
        _state["hooks"] = _wire_hooks(allocator_obj)
        _patch_graphs(torch)  # torch's C++ interface tells the cpp frontend about graphs itself
    _state.update(installed=True, allocator=allocator_obj, frontend=used)


def frontend() -> Optional[str]:
    """Which frontend :func:`install` used (``"cpp"`` or ``"pluggable"``), or None before it."""
    return _state.get("frontend")


_graph_devices: Dict[int, int] = {}


def _patch_graphs(torch) -> None:
    """Tell glake when a CUDA graph captures and when it goes, so that memory a graph's replays
    use is never handed to anyone else while the graph lives (torch's private graph pools do the
    same for its own allocator; a pluggable allocator gets no such call from torch)."""
    graph_cls = torch.cuda.CUDAGraph
    if getattr(graph_cls, "_glake_patched", False):
        return
    begin, end, reset = graph_cls.capture_begin, graph_cls.capture_end, graph_cls.reset

    def release(self) -> None:
        dev = _graph_devices.pop(id(self), None)
        if dev is not None:
            _C.gmlake_release_graph(dev, id(self))

    def capture_begin(self, *args, **kwargs):
        dev = torch.cuda.current_device()
        release(self)  # re-capturing a graph replaces its old memory
        _graph_devices[id(self)] = dev
        _C.gmlake_begin_graph(dev, id(self))
        try:
            return begin(self, *args, **kwargs)
        except BaseException:
            _C.gmlake_end_graph(dev, id(self))
            release(self)
            raise

    def capture_end(self):
        try:
            return end(self)
        finally:
            dev = _graph_devices.get(id(self))
            if dev is not None:
                _C.gmlake_end_graph(dev, id(self))

    def reset_(self):
        reset(self)
        release(self)

    def __del__(self):
        release(self)

    graph_cls.capture_begin, graph_cls.capture_end, graph_cls.reset = capture_begin, capture_end, reset_
    graph_cls.__del__ = __del__
    graph_cls._glake_patched = True


def is_installed() -> bool:
    """Whether glake is torch's CUDA allocator in this process."""
    return bool(_state["installed"])


def _device_index(device) -> int:
    import torch

    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    return torch.device(device).index or 0


def allocator(device=None) -> Allocator:
    """The process-wide glake allocator of ``device`` (the one torch uses once installed)."""
    return Allocator._wrap(_C.gmlake_global(_device_index(device)))


def memory_stats(device=None) -> Dict[str, int]:
    """torch.cuda.memory_stats() for glake: torch's key names plus glake's."""
    return allocator(device).stats()


def memory_allocated(device=None) -> int:
    """Bytes held by live tensors."""
    return memory_stats(device)["allocated_bytes.all.current"]


def max_memory_allocated(device=None) -> int:
    """Peak of memory_allocated since the start or the last reset_peak_memory_stats."""
    return memory_stats(device)["allocated_bytes.all.peak"]


def memory_reserved(device=None) -> int:
    """Physical bytes glake holds (live tensors + cache)."""
    return memory_stats(device)["reserved_bytes.all.current"]


def max_memory_reserved(device=None) -> int:
    """Peak of memory_reserved."""
    return memory_stats(device)["reserved_bytes.all.peak"]


def reset_peak_memory_stats(device=None) -> None:
    """Set every peak to its current value."""
    allocator(device).reset_peak_stats()


def empty_cache(device=None) -> None:
    """Release glake's cached memory (idle stitched ranges and free segments)."""
    allocator(device).empty_cache()


def memory_snapshot(device=None) -> List[Dict[str, Any]]:
    """Segments and stitched ranges with their blocks (address, size, state, stream)."""
    return allocator(device).snapshot()


def format_summary(stats: Dict[str, int], title: str = "glake memory summary") -> str:
    """A text table of allocator stats, laid out like torch.cuda.memory_summary()."""

    rows = [
        ("Allocated memory", "allocated_bytes.all", fmt_bytes),
        ("  from small pool", "allocated_bytes.small_pool", fmt_bytes),
        ("  from large pool", "allocated_bytes.large_pool", fmt_bytes),
        ("Active memory", "active_bytes.all", fmt_bytes),
        ("Requested memory", "requested_bytes.all", fmt_bytes),
        ("Reserved memory", "reserved_bytes.all", fmt_bytes),
        ("Stitched memory", "stitched_bytes", fmt_bytes),
        ("Mapped VA", "mapped_va_bytes", fmt_bytes),
        ("Allocations", "allocation.all", str),
        ("Segments", "segment.all", str),
    ]
    width = 76
    lines = ["=" * width, f"|{title:^{width - 2}}|", "=" * width,
             f"| {'Metric':<30}| {'Cur Usage':>19} | {'Peak Usage':>19} |", "-" * width]
    for label, key, fmt in rows:
        lines.append(f"| {label:<30}| {fmt(stats[key + '.current']):>19} | {fmt(stats[key + '.peak']):>19} |")
    lines.append("-" * width)
    eff = stats["allocated_bytes.all.peak"] / stats["reserved_bytes.all.peak"] if stats["reserved_bytes.all.peak"] else 0
    for label, value in (("Stitches (new / reused)", f"{stats['num_stitches']} / {stats['num_stitch_reuses']}"),
                         ("Alloc retries / OOMs", f"{stats['num_alloc_retries']} / {stats['num_ooms']}"),
                         ("Peak allocated / peak reserved", f"{eff:.3f}"),
                         ("Limit", fmt_bytes(stats["limit_bytes"]) if stats["limit_bytes"] else "none")):
        lines.append(f"| {label:<30}| {value:>41} |")
    lines.append("=" * width)
    return "\n".join(lines)


def memory_summary(device=None) -> str:
    """torch.cuda.memory_summary() for glake."""
    return format_summary(memory_stats(device), f"glake memory summary, device {_device_index(device)}")


def mem_pool():
    """A ``torch.cuda.MemPool`` backed by glake, for ``with torch.cuda.use_mem_pool(pool):`` regions.

    In this mode torch's caching allocator splits blocks and glake only sees segment-sized
    requests, so stitching helps less than with :func:`install`.
    """
    import torch

    pluggable = _pluggable()
    _wire_hooks(pluggable)
    return torch.cuda.MemPool(allocator=pluggable.allocator())


def auto_install() -> Optional[str]:
    """Install with the configuration from the environment (``glake run``'s import hook calls this
    once torch is imported); returns why glake could not be installed, or None."""
    try:
        install()
    except GlakeError as e:
        return str(e)
    return None


__all__ = [
    "install", "frontend", "FRONTENDS", "is_installed", "allocator", "memory_stats", "memory_allocated", "max_memory_allocated",
    "memory_reserved", "max_memory_reserved", "reset_peak_memory_stats", "empty_cache", "memory_snapshot",
    "memory_summary", "format_summary", "mem_pool", "plugin_path",
]
