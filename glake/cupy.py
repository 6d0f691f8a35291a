"""glake as CuPy's allocator, on CuPy's current stream (as RMM's CuPy allocator does).

>>> import glake.cupy
>>> glake.cupy.install()
>>> a = cupy.zeros(1 << 28)          # served by glake's stitched allocator

Each allocation is made for the stream CuPy has current on the calling thread, so glake reuses its
memory in that stream's order and only migrates it to another stream through an event, as torch's
allocator does; CuPy's C-function allocator interface cannot pass a stream. CuPy and torch share the
same per-device glake allocator when both are installed. Out of memory raises
:class:`glake.OutOfMemoryError` (a ``MemoryError``) with glake's full report.
"""

from __future__ import annotations

from glake import _C
from glake.errors import BackendUnavailableError


class _Allocation:
    """Owns one glake allocation for CuPy: freed when CuPy drops its memory object."""

    __slots__ = ("allocator", "ptr")

    def __init__(self, allocator, ptr: int) -> None:
        self.allocator = allocator
        self.ptr = ptr

    def __del__(self) -> None:
        self.allocator.free(self.ptr)


def malloc(nbytes: int):
    """CuPy's allocator function: ``nbytes`` on the current device, for CuPy's current stream."""
    import cupy

    device = cupy.cuda.runtime.getDevice()
    if nbytes == 0:
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(0, 0, None, device), 0)
    allocator = _C.gmlake_global(device)
    ptr = allocator.malloc(nbytes, cupy.cuda.get_current_stream().ptr)
    memory = cupy.cuda.UnownedMemory(ptr, nbytes, _Allocation(allocator, ptr), device)
    return cupy.cuda.MemoryPointer(memory, 0)


def install() -> None:
    """Route CuPy's device allocations to glake's process-wide allocator."""
    import cupy

    if _C.backend_name(None) != "cuda":
        raise BackendUnavailableError(f"glake.cupy.install() needs the cuda backend ({_C.cuda_unavailable_reason()})")
    cupy.cuda.set_allocator(malloc)


__all__ = ["install", "malloc"]
