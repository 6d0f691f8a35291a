"""glake as CuPy's allocator, through CuPy's C-function allocator (no Python on the hot path).

>>> import glake.cupy
>>> glake.cupy.install()
>>> a = cupy.zeros(1 << 28)          # served by glake's stitched allocator

CuPy and torch share the same per-device glake allocator when both are installed.
"""

from __future__ import annotations

from glake import _C
from glake.errors import BackendUnavailableError


def install() -> None:
    """Route CuPy's device allocations to glake's process-wide allocator.

    Out-of-memory surfaces as a ``MemoryError`` with glake's full report.
    """
    import cupy

    if _C.backend_name(None) != "cuda":
        raise BackendUnavailableError(f"glake.cupy.install() needs the cuda backend ({_C.cuda_unavailable_reason()})")
    malloc_fn, free_fn = _C.gmlake_cupy_functions()
    allocator = cupy.cuda.memory.CFunctionAllocator(0, malloc_fn, free_fn, _C)
    cupy.cuda.set_allocator(allocator.malloc)


__all__ = ["install"]
