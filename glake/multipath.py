"""Multipath host<->device copies: pageable memory at close to the PCIe limit, pinned memory no slower.

torch copies pageable host memory through the driver's own small staging buffers, one thread, at a
fraction of what the link carries (7.3 GB/s H2D on an H100 whose link moves 54 GB/s pinned). glake
stages pageable data through its own pinned buffers, filled and drained by a pool of C++ threads
while the copy engines move the previous buffers. Pinned copies take the plain driver path, or are
split over several copy streams / peer GPUs where configured.

Copies are stream-ordered like ``Tensor.copy_(non_blocking=...)``: a copy starts after the work
already on the current stream and later work on that stream sees the data.

>>> import torch, glake.multipath as mp
>>> w = torch.empty(1 << 28, dtype=torch.uint8)            # pageable host memory
>>> g = torch.empty_like(w, device="cuda")
>>> mp.copy_(g, w)                                          # blocking: g holds w's bytes
>>> mp.copy_(w, g, non_blocking=True)                      # pageable destination: complete on return

Paths (``Engine.plan`` tells which one a copy takes):

``plain``         one driver copy on the caller's stream: small copies, pinned copies by default,
                  managed memory (device<->device tensor copies are handed to torch)
``staged_h2d``    pageable -> device through the staging pipeline
``staged_d2h``    device -> pageable through the staging pipeline
``pinned_split``  a large pinned copy split over ``pinned_streams`` copy streams
``peer``          a large pinned copy partly routed through peer GPUs (``peers=True``)

Configuration: keyword arguments of :class:`Engine`, or the environment variable
``GLAKE_MULTIPATH_CONF="chunk_bytes:16M,buffers:4,threads:16"`` (keyword arguments win). Keys: see
:data:`CONFIG_KEYS`. Sizes are ints or strings with units (``"16M"``, ``"16MiB"``; powers of 1024),
parsed by the same parser as ``GLAKE_ALLOC_CONF``.

Every engine publishes its counters to ``glake.stats`` (section ``multipath``) until it is closed.

The host backend runs the same pipeline host-to-host with real threads and real staging buffers:
``copy_(dst, src)`` on two CPU tensors goes through it (there "device" memory is host memory and
the copy lanes are threads). On the host backend a non-blocking copy's destination is complete
after :func:`synchronize` (the host has no streams to order on).
"""

from __future__ import annotations

import atexit
import threading
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

from glake import _C
from glake.errors import GlakeWarning, InvalidArgumentError
from glake.stats.sources import next_serial, register_section, unregister
from glake.units import conf_texts

ENV_VAR = "GLAKE_MULTIPATH_CONF"

#: Every configuration key and its type ("bytes": an int or a size string such as "16MiB").
CONFIG_KEYS: Dict[str, str] = {
    "chunk_bytes": "bytes",            # size of one pinned staging buffer (one pipeline step)
    "buffers": "int",                  # staging buffers in flight
    "threads": "int",                  # CPU threads copying to/from staging, caller included (0 = auto)
    "piece_bytes": "bytes",            # CPU work item (0 = chunk_bytes / threads, >= 256 KiB)
    "streams": "int",                  # copy streams a staged copy's chunks go to, round robin
    "pinned_streams": "int",           # copy streams a large pinned copy is split over (1 = plain path)
    "pinned_split_min_bytes": "bytes", # pinned copies below this are never split
    "small_copy_bytes": "bytes",       # pageable copies below this take the plain path (0 = never)
    "peers": "bool",                   # route part of large pinned copies through peer GPUs
    "peer_devices": "list",            # candidate peers (empty = all); used only if peer access exists
    "peer_min_bytes": "bytes",         # pinned copies below this never use peers
    "peer_chunk_bytes": "bytes",       # step size through a peer's two buffers
}

_KINDS: Dict[str, Tuple[str, str]] = {  # copy_raw kind -> (dst kind, src kind)
    "auto": ("auto", "auto"),
    "h2d": ("device", "host"),
    "d2h": ("host", "device"),
    "d2d": ("device", "device"),
    "pageable_to_device": ("device", "pageable"),
    "pinned_to_device": ("device", "pinned"),
    "device_to_pageable": ("pageable", "device"),
    "device_to_pinned": ("pinned", "device"),
}


def default_config() -> Dict[str, Any]:
    """The built-in configuration (``threads=0`` and ``piece_bytes=0`` mean automatic)."""
    return dict(_C.multipath_default_config())


def parse_conf(text: str, source: str = ENV_VAR) -> Dict[str, Any]:
    """Parse ``"key:value,key:value"`` (the ``GLAKE_MULTIPATH_CONF`` syntax) into Engine keywords.

    The parser is glake's one configuration parser (the allocator's too): sizes take units
    (``16M``, ``16MiB``, ``1.5G``; powers of 1024), ``peers`` is true/false (or 1/0, on/off),
    ``peer_devices`` is a ``+``-separated list (``peer_devices:1+2``).

    Raises
    ------
    InvalidArgumentError
        An unknown key or a malformed value; the message names the key, the value and ``source``.
    """
    return dict(_C.multipath_parse_conf(text, source))


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is an optional dependency
        raise InvalidArgumentError("glake.multipath.copy_ needs torch; use copy_raw for raw addresses") from e
    return torch


def _tensor_kind(torch, t, name: str) -> str:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise InvalidArgumentError(f"{name} has layout {t.layout}; only strided (dense) tensors can be copied")
    if not t.is_contiguous():
        raise InvalidArgumentError(f"{name} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}): "
                                   "call .contiguous() first")
    if t.device.type == "cuda":
        return "device"
    if t.device.type == "cpu":
        return "pinned" if t.numel() and t.is_pinned() else "pageable"
    raise InvalidArgumentError(f"{name} is on {t.device}; multipath copies cpu and cuda tensors")


def _check_pair(torch, dst, src) -> Tuple[str, str, int]:
    dk, sk = _tensor_kind(torch, dst, "dst"), _tensor_kind(torch, src, "src")
    if dst.dtype != src.dtype:
        raise InvalidArgumentError(f"dtype mismatch: dst is {dst.dtype}, src is {src.dtype}; multipath copies bytes "
                                   "and does not convert (view both as one dtype, e.g. .view(torch.uint8))")
    if tuple(dst.shape) != tuple(src.shape):
        raise InvalidArgumentError(f"shape mismatch: dst is {tuple(dst.shape)}, src is {tuple(src.shape)}; multipath "
                                   "copies whole tensors of one shape and does not broadcast (reshape src first, "
                                   "e.g. src.view(dst.shape))")
    nbytes = dst.numel() * dst.element_size()
    if dst.requires_grad:
        raise InvalidArgumentError("dst requires grad: multipath writes bytes outside autograd; pass dst.detach()")
    return dk, sk, nbytes


class Engine:
    """A copy engine for one device: pinned staging buffers, CPU threads and copy streams.

    Parameters
    ----------
    backend : str, optional
        ``"cuda"`` or ``"host"`` (default: ``$GLAKE_BACKEND``, else auto-detect).
    device : int
        The device whose copies this engine makes.
    name : str, optional
        Its name in ``glake.stats`` (label ``engine``; default ``"<backend>:<device>/<n>"``).
    **conf
        Configuration keys (:data:`CONFIG_KEYS`); they override ``GLAKE_MULTIPATH_CONF``.
        Buffers, threads and streams are made on the first copy that needs them.

    Raises
    ------
    InvalidArgumentError
        An unknown key or an out-of-range value.
    """

    def __init__(self, backend: Optional[str] = None, device: int = 0, *, name: Optional[str] = None,
                 **conf: Any) -> None:
        self._e = _C.MultipathEngine(conf_texts(conf), device, backend)  # $GLAKE_MULTIPATH_CONF is read in C++
        self._pending: List[Tuple[Any, Tuple[Any, ...]]] = []  # (cuda event, tensors kept alive)
        self._pending_lock = threading.Lock()
        self.stats_name = name or f"{self._e.backend}:{self._e.device}/{next_serial()}"
        self._stats_key = register_section("multipath", self, device=self._e.device,
                                           labels={"engine": self.stats_name, "backend": self._e.backend})

    @property
    def handle(self) -> Any:
        """The native engine (``glake._C.MultipathEngine``), for C++ callers such as suspend's copies."""
        return self._e

    @property
    def backend(self) -> str:
        """``"cuda"`` or ``"host"``."""
        return self._e.backend

    @property
    def device(self) -> int:
        """The device this engine copies for."""
        return self._e.device

    @property
    def config(self) -> Dict[str, Any]:
        """The configuration in use (``threads`` and ``piece_bytes`` resolved)."""
        return self._e.config()

    @property
    def peer_devices(self) -> List[int]:
        """Peer GPUs this engine routes pinned copies through (empty unless ``peers=True`` and access exists)."""
        return list(self._e.stats()["peer_devices"])

    def peers_skipped(self) -> List[str]:
        """Why candidate peers are not used (e.g. ``"device 2: no peer access with device 0"``)."""
        return list(self._e.peers_skipped())

    def plan(self, dst_ptr: int, src_ptr: int, nbytes: int, kind: str = "auto") -> str:
        """The path :meth:`copy_raw` would take, after the same validation (nothing is copied)."""
        dk, sk = _kind_pair(kind)
        return self._e.plan(dst_ptr, src_ptr, nbytes, dk, sk)

    def copy_raw(self, dst_ptr: int, src_ptr: int, nbytes: int, kind: str = "auto", stream: int = 0,
                 non_blocking: bool = False) -> None:
        """Copy ``nbytes`` between raw addresses, ordered on ``stream`` (a ``CUstream`` as an int).

        Parameters
        ----------
        kind : str
            ``"auto"`` (cuda only: both sides asked of the driver), ``"h2d"``, ``"d2h"`` (host side's
            pinned-ness asked of the driver on cuda, pageable on the host backend), ``"d2d"``, or
            explicit ``"pageable_to_device"``, ``"pinned_to_device"``, ``"device_to_pageable"``,
            ``"device_to_pinned"``.
        non_blocking : bool
            False: return when the data has landed. True: return once a pageable source has been
            read (it may be reused), at once for pinned memory; a pageable destination is always
            complete on return. Later work on ``stream`` sees the data either way.

        Raises
        ------
        InvalidArgumentError
            Bad kind, negative size, null pointers, overlapping ranges, memory that is not what
            ``kind`` says, a stream capturing a CUDA graph. Nothing is copied.
        """
        dk, sk = _kind_pair(kind)
        self._e.copy(dst_ptr, src_ptr, nbytes, dk, sk, stream, non_blocking)

    def copy_many_raw(self, items: Sequence[Tuple[int, int, int]], kind: str, stream: int = 0,
                      non_blocking: bool = False) -> None:
        """Copy each ``(dst_ptr, src_ptr, nbytes)`` of ``items``, all in one direction (``kind`` as in
        :meth:`copy_raw`), as :meth:`copy_raw` would one after another; but the pageable ones go
        through staging as one pipeline, so many runs of a few MiB move at the speed of one large
        copy (suspend and resume copy this way). The items must not overlap each other. Every item
        is validated before any byte moves.
        """
        dk, sk = _kind_pair(kind)
        self._e.copy_many([(int(d), int(s), int(n)) for d, s, n in items], dk, sk, stream, non_blocking)

    def copy_(self, dst, src, non_blocking: bool = False):
        """Copy tensor ``src`` into tensor ``dst`` (any mix of pageable, pinned and cuda); returns ``dst``.

        Both must be contiguous with the same dtype and byte size. cuda<->cpu copies run on this
        engine's device, ordered on its current torch stream. Two CPU tensors need a host-backend
        engine (the staging pipeline host-to-host); two cuda tensors are copied by torch.

        Raises
        ------
        InvalidArgumentError
            Not tensors, not contiguous, dtype or size mismatch, dst requires grad, overlapping,
            a tensor on another device than this engine's. Nothing is copied.
        """
        torch = _torch()
        dk, sk, nbytes = _check_pair(torch, dst, src)
        if dk == "device" and sk == "device":
            dst.copy_(src, non_blocking=non_blocking)
            return dst
        if dk != "device" and sk != "device":
            if self.backend != "host":
                raise InvalidArgumentError("both tensors are on the cpu: use a host-backend engine "
                                           "(glake.multipath.copy_ picks one)")
            self._e.copy(dst.data_ptr(), src.data_ptr(), nbytes, "device", "pageable", 0, non_blocking)
            return dst
        if self.backend != "cuda":
            raise InvalidArgumentError("a cuda tensor needs a cuda-backend engine")
        dev = (dst if dk == "device" else src).device.index
        dev = torch.cuda.current_device() if dev is None else dev
        if dev != self.device:
            raise InvalidArgumentError(f"the cuda tensor is on cuda:{dev}; this engine copies for cuda:{self.device}")
        stream = torch.cuda.current_stream(dev)
        self._e.copy(dst.data_ptr(), src.data_ptr(), nbytes, dk, sk, stream.cuda_stream, non_blocking)
        if non_blocking and "pinned" in (dk, sk):
            # torch's pinned-memory cache would hand the block out again once the tensor dies, while
            # the copy may still read or write it: keep it alive until the stream passes this point.
            event = torch.cuda.Event()
            event.record(stream)
            with self._pending_lock:
                self._pending = [p for p in self._pending if not p[0].query()]
                self._pending.append((event, (dst, src)))
        return dst

    def synchronize(self) -> None:
        """Wait until every copy this engine has started is complete."""
        self._e.synchronize()
        with self._pending_lock:
            for event, _ in self._pending:
                event.synchronize()
            self._pending = []

    def stats(self) -> Dict[str, Any]:
        """Counters: ``calls.<path>``/``bytes.<path>`` per path (plain, staged_h2d, staged_d2h,
        pinned_split, peer), ``calls``, ``bytes``, ``chunks``, ``cpu_copy_ns`` (thread time in
        memcpy), ``wait_ns`` (thread time waiting for buffers or copies), ``busy_ns`` (wall time in
        copies), ``errors``, ``peer_devices``."""
        return dict(self._e.stats())

    def reset_stats(self) -> None:
        """Zero the counters."""
        self._e.reset_stats()

    def close(self) -> None:
        """Wait for outstanding copies, then free buffers, threads and streams. Idempotent."""
        if not self._e.closed:
            self.synchronize()
            unregister(self._stats_key)
        self._e.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._e.closed

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<glake.multipath.Engine closed>"
        c = self.config
        return (f"<glake.multipath.Engine {self.backend}:{self.device} chunk={c['chunk_bytes']} "
                f"buffers={c['buffers']} threads={c['threads']} streams={c['streams']}>")


def _kind_pair(kind: str) -> Tuple[str, str]:
    try:
        return _KINDS[kind]
    except (KeyError, TypeError):
        raise InvalidArgumentError(f"unknown copy kind {kind!r} (expected one of {', '.join(_KINDS)})") from None


_engines: Dict[Tuple[str, int], Engine] = {}
_engines_lock = threading.Lock()


def engine(backend: Optional[str] = None, device: int = 0) -> Engine:
    """The default engine of ``(backend, device)``, made on first use from ``GLAKE_MULTIPATH_CONF``
    (its stats name is ``"<backend>:<device>"``)."""
    name = _C.backend_name(backend)
    with _engines_lock:
        e = _engines.get((name, device))
        if e is None or e.closed:
            e = _engines[(name, device)] = Engine(name, device, name=f"{name}:{device}")
        return e


def copy_(dst, src, non_blocking: bool = False):
    """Copy tensor ``src`` into ``dst`` through the default engine; returns ``dst``.

    Any mix of pageable (cpu), pinned (cpu, ``pin_memory()``) and cuda tensors; contiguous, same
    dtype, same size. A cuda<->cpu copy runs on the cuda tensor's device, ordered on its current
    stream like ``dst.copy_(src, non_blocking=...)``. Two CPU tensors go through the host
    backend's staging pipeline; two cuda tensors through torch.
    """
    torch = _torch()
    dk, sk, _ = _check_pair(torch, dst, src)
    if dk == "device" or sk == "device":
        if dk == "device" and sk == "device":
            dst.copy_(src, non_blocking=non_blocking)
            return dst
        t = dst if dk == "device" else src
        dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return engine("cuda", dev).copy_(dst, src, non_blocking)
    return engine("host", 0).copy_(dst, src, non_blocking)


def copy_raw(dst_ptr: int, src_ptr: int, nbytes: int, kind: str = "auto", stream: int = 0,
             non_blocking: bool = False, device: int = 0, backend: Optional[str] = None) -> None:
    """Copy ``nbytes`` between raw addresses through the default engine of ``(backend, device)``.

    See :meth:`Engine.copy_raw` for ``kind`` and the ordering rules.
    """
    engine(backend, device).copy_raw(dst_ptr, src_ptr, nbytes, kind, stream, non_blocking)


def synchronize() -> None:
    """Wait for every copy of every default engine."""
    with _engines_lock:
        engines = list(_engines.values())
    for e in engines:
        if not e.closed:
            e.synchronize()


def stats() -> Dict[str, Dict[str, Any]]:
    """Counters of each default engine made so far, keyed ``"cuda:0"``, ``"host:0"``, ..."""
    with _engines_lock:
        items = list(_engines.items())
    return {f"{name}:{dev}": e.stats() for (name, dev), e in items if not e.closed}


def close_all() -> None:
    """Close every default engine (they are made again on next use). Also runs at exit."""
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for e in engines:
        try:
            e.close()
        except Exception as err:  # noqa: BLE001 - at exit a dead device must not mask the real error
            warnings.warn(f"glake.multipath: closing {e!r} failed: {err}", GlakeWarning, stacklevel=2)


atexit.register(close_all)

__all__ = ["Engine", "engine", "copy_", "copy_raw", "synchronize", "stats", "close_all", "parse_conf",
           "default_config", "CONFIG_KEYS", "ENV_VAR"]
