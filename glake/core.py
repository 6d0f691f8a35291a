"""The VMM core: physical chunks, virtual ranges and chunk pools on the cuda or host backend.

Every function and constructor takes ``backend=None`` (``$GLAKE_BACKEND`` if set, else ``"cuda"``
when a GPU and driver are usable, else ``"host"``) and ``device=0``.

>>> from glake import core
>>> g = core.granularity()
>>> chunk = core.PhysChunk(g)
>>> with core.VirtualRange(4 * g) as r:
...     r.map(0, chunk)
...     r.map(g, chunk)          # the same physical bytes at a second address
...     core.write(r.ptr, b"hi")
...     core.read(r.ptr + g, 2)
b'hi'
"""

from __future__ import annotations

import array
import socket
from typing import Dict, Iterable, List, Optional, Tuple

from glake import _C

PhysChunk = _C.PhysChunk
VirtualRange = _C.VirtualRange
ChunkPool = _C.ChunkPool


def backend_name(backend: Optional[str] = None) -> str:
    """The backend ``backend`` resolves to: ``"cuda"`` or ``"host"``.

    Raises
    ------
    BackendUnavailableError
        ``"cuda"`` was asked for (by argument or ``GLAKE_BACKEND``) and cannot be used here.
    """
    return _C.backend_name(backend)


def granularity(backend: Optional[str] = None, device: int = 0) -> int:
    """Mapping granularity in bytes: the size of one physical chunk (2 MiB on H100 and on host)."""
    return _C.granularity(backend, device)


def device_count(backend: Optional[str] = None) -> int:
    """Number of devices the backend drives (1 on host)."""
    return _C.device_count(backend)


def mem_info(backend: Optional[str] = None, device: int = 0) -> Tuple[int, int]:
    """``(free, total)`` bytes of the device (host: MemAvailable and MemTotal)."""
    return _C.mem_info(backend, device)


def stats(backend: Optional[str] = None) -> Dict[str, int]:
    """The backend's counters.

    Keys: ``chunks_live``, ``chunks_created``, ``chunks_released``, ``physical_bytes.current|peak``,
    ``reserved_va_bytes.current|peak``, ``ranges_live``, ``mapped_bytes.current|peak``, and per driver
    operation (create, release, reserve, free_va, map, unmap, set_access, export, import)
    ``calls.<op>`` and ``time_ns.<op>``, plus ``time_ns.total``.
    """
    return _C.stats(backend)


def reset_peak_stats(backend: Optional[str] = None) -> None:
    """Set peaks to current values and zero call counts and times."""
    _C.reset_peak_stats(backend)


def read(ptr: int, n: int, device: int = 0, backend: Optional[str] = None) -> bytes:
    """Copy ``n`` bytes at address ``ptr`` (device or host) into a new ``bytes``."""
    return _C.read(ptr, n, device, backend)


def write(ptr: int, data: bytes, device: int = 0, backend: Optional[str] = None) -> None:
    """Copy ``data`` to address ``ptr`` (device or host)."""
    _C.write(ptr, data, device, backend)


def memset(ptr: int, value: int, n: int, device: int = 0, backend: Optional[str] = None) -> None:
    """Set ``n`` bytes at ``ptr`` to ``value``."""
    _C.memset(ptr, value, n, device, backend)


def memcpy(dst: int, src: int, n: int, device: int = 0, backend: Optional[str] = None) -> None:
    """Copy ``n`` bytes from ``src`` to ``dst`` (any mix of device and host addresses)."""
    _C.memcpy(dst, src, n, device, backend)


def send_chunks(sock: socket.socket, chunks: Iterable[PhysChunk]) -> None:
    """Send chunks to another process over a unix socket (file descriptors via SCM_RIGHTS).

    The receiver calls :func:`recv_chunks`. Only the handles travel: each side maps them itself.
    """
    chunks = list(chunks)
    fds = [c.export_fd() for c in chunks]
    try:
        sizes = array.array("q", [c.size for c in chunks])
        header = array.array("q", [len(chunks)]).tobytes()
        socket.send_fds(sock, [header + sizes.tobytes()], fds)
    finally:
        for fd in fds:
            socket.close(fd)


def recv_chunks(sock: socket.socket, device: int = 0, backend: Optional[str] = None, max_chunks: int = 1024) -> List[PhysChunk]:
    """Receive chunks sent by :func:`send_chunks`; each becomes a PhysChunk of this process."""
    msg, fds, _flags, _addr = socket.recv_fds(sock, 8 * (max_chunks + 1), max_chunks)
    try:
        count = array.array("q", msg[:8])[0]
        sizes = array.array("q", msg[8 : 8 * (count + 1)])
        if count != len(fds) or len(sizes) != count:
            raise _C.InvalidArgumentError(f"recv_chunks: message announces {count} chunks, carries {len(fds)} fds")
        return [PhysChunk.import_fd(fd, size, device, backend) for fd, size in zip(fds, sizes)]
    finally:
        for fd in fds:
            socket.close(fd)


__all__ = [
    "PhysChunk", "VirtualRange", "ChunkPool", "backend_name", "granularity", "device_count", "mem_info",
    "stats", "reset_peak_stats", "read", "write", "memset", "memcpy", "send_chunks", "recv_chunks",
]
