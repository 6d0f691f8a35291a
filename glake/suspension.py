"""Suspend and resume the process's glake-managed device memory (``glake.suspend`` / ``glake.resume``).

Covers the process-wide allocators (the ones ``glake.torch``, ``glake.cupy`` and the C ABI use),
device by device: their live data goes to host memory, their physical memory back to the driver, and
every address stays reserved, so tensors and CUDA graphs stay valid across a resume. The copies go
through the device's multipath engine (``glake.multipath.engine``: pageable host memory staged through
pinned buffers by several threads), consecutive live chunks in one copy. Private ``glake.Allocator``
objects have their own ``suspend``/``resume``. Not covered yet: KV caches (``glake.kvcache.KVCache``)
and multipath's staging buffers keep their memory.
"""

from __future__ import annotations

from typing import List, Optional

from glake import _C


def _devices(device: Optional[int]) -> List[int]:
    if device is not None:
        return [int(device)] if _C.gmlake_global_exists(int(device)) else []
    return [d for d in range(64) if _C.gmlake_global_exists(d)]


def _engine(a):
    from glake import multipath

    return multipath.engine(a.backend, a.device)._e


def suspend(device: Optional[int] = None) -> List[int]:
    """Suspend the process-wide allocator of ``device`` (default: every device that has one).

    Returns the devices suspended. Raises what :meth:`glake.Allocator.suspend` raises; devices
    suspended before a failure stay suspended (``resume()`` brings them back).
    """
    done = []
    for d in _devices(device):
        a = _C.gmlake_global(d)
        if not a.suspended:
            a.suspend(_engine(a))
            done.append(d)
    return done


def resume(device: Optional[int] = None) -> List[int]:
    """Resume the process-wide allocator of ``device`` (default: every suspended one); returns those resumed.

    Raises :class:`glake.OutOfMemoryError` when a device cannot give its memory back yet; that device
    stays suspended and ``resume()`` can be called again.
    """
    done = []
    for d in _devices(device):
        a = _C.gmlake_global(d)
        if a.suspended:
            a.resume(_engine(a))
            done.append(d)
    return done
