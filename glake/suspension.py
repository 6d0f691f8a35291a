"""Suspend and resume the process's glake-managed device memory (``glake.suspend`` / ``glake.resume``).

Covers, device by device, the process-wide allocators (the ones ``glake.torch``, ``glake.cupy`` and the
C ABI use) and every component that registered itself here (:func:`register`: each
``glake.kvcache.KVCache`` does). Their live data goes to host memory, their physical memory back to
the driver, and every address stays reserved, so tensors, KV views and CUDA graphs stay valid across
a resume. The copies go through the device's multipath engine (``glake.multipath.engine``: pageable
host memory staged through pinned buffers by several threads, a component's runs in one pipeline).
Private ``glake.Allocator`` objects have their own ``suspend``/``resume``.

With ``GLAKE_SUSPEND_KEEP_HOST=1`` each allocator's and KV cache's resume keeps its host buffers
mapped, and that object's next suspend reuses those of the sizes it needs: its copies land in memory
already faulted in (on an H200 host 45.8 GB/s against 7.8-15.7 GB/s into fresh memory), at the price
of that much host RAM held while awake. A suspend unmaps the kept buffers it does not reuse before it
makes new ones; ``stats()["kept_host_bytes"]`` says what an object keeps, and
``glake._C.host_reserve_bytes()`` the process's total.

A registered component is any object with ``device_index`` (int), ``backend`` (str), ``suspended``
(bool), ``suspend(discard: bool, engine)`` and ``resume(engine)``; the registry holds it weakly.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Iterable, List, Optional

from glake import _C
from glake.errors import InvalidArgumentError

_components: "weakref.WeakSet[Any]" = weakref.WeakSet()
_lock = threading.Lock()


def register(component: Any) -> None:
    """Makes ``component`` part of :func:`suspend` / :func:`resume` for its device, until it is collected."""
    for name in ("device_index", "backend", "suspended", "suspend", "resume"):
        if not hasattr(component, name):
            raise InvalidArgumentError(f"glake.suspension.register: {type(component).__name__} has no '{name}'")
    with _lock:
        _components.add(component)


def unregister(component: Any) -> None:
    """Takes ``component`` out of the registry (a closed KV cache does)."""
    with _lock:
        _components.discard(component)


def _registered(device: Optional[int]) -> List[Any]:
    with _lock:
        found = list(_components)
    return [c for c in found if device is None or c.device_index == int(device)]


def _devices(device: Optional[int]) -> List[int]:
    if device is not None:
        return [int(device)] if _C.gmlake_global_exists(int(device)) else []
    return [d for d in range(64) if _C.gmlake_global_exists(d)]


def _engine(backend: str, device: int):
    from glake import multipath

    return multipath.engine(backend, device).handle


def suspend(device: Optional[int] = None, *, discard: Iterable[Any] = ()) -> List[int]:
    """Suspend glake's memory on ``device`` (default: every device glake manages memory on).

    Registered components (KV caches) go first, then the process-wide allocator of each device. The
    allocators' free cache is never copied. What ``discard`` names is not copied either: its memory
    is given back and its contents are undefined after the resume. It takes registered components
    (a KV cache whose contents the caller no longer needs) and torch tensors in memory of glake's
    process-wide allocator (an LLM server's weights it reloads from disk; a chunk is skipped only
    when every allocation in it is discarded). Returns the devices on which something was suspended.
    Raises what the components' and :meth:`glake.Allocator.suspend` raise; what was suspended before
    a failure stays suspended (``resume()`` brings it back).
    """
    discard = list(discard)
    tensors = [t for t in discard if hasattr(t, "untyped_storage")]
    drop = {id(c) for c in discard if not hasattr(c, "untyped_storage")}
    parts = _registered(device)
    unknown = drop - {id(c) for c in parts}
    if unknown:
        raise InvalidArgumentError("glake.suspend: discard= names an object that is not a tensor and not registered "
                                   "for suspension on this device (a glake.kvcache.KVCache registers itself)")
    by_device = _storages_by_device(tensors)
    devices = _devices(device)
    elsewhere = sorted(set(by_device) - set(devices))
    if elsewhere:
        raise InvalidArgumentError(f"glake.suspend: discard= names tensors on cuda:{elsewhere[0]}, where this call "
                                   "suspends nothing of glake's allocator")
    done = set()
    for c in parts:
        if not c.suspended:
            c.suspend(discard=id(c) in drop, engine=_engine(c.backend, c.device_index))
            done.add(c.device_index)
    for d in devices:
        a = _C.gmlake_global(d)
        if not a.suspended:
            a.suspend(_engine(a.backend, a.device), sorted(by_device.pop(d, ())))
            done.add(d)
    return sorted(done)


def _storages_by_device(tensors: List[Any]) -> dict:
    """The base addresses of the tensors' storages (each an allocation of glake's allocator), by device."""
    out: dict = {}
    for t in tensors:
        if t.device.type != "cuda":
            raise InvalidArgumentError(f"glake.suspend: discard= names a tensor on {t.device}, not in glake's device memory")
        storage = t.untyped_storage()
        if storage.nbytes():
            out.setdefault(t.device.index, set()).add(storage.data_ptr())
    return out


def resume(device: Optional[int] = None) -> List[int]:
    """Resume what :func:`suspend` suspended on ``device`` (default: everywhere); returns those devices.

    The allocators come back first, then the registered components. Raises
    :class:`glake.OutOfMemoryError` when a device cannot give the memory back yet: what is not resumed
    stays suspended and ``resume()`` can be called again.
    """
    done = set()
    for d in _devices(device):
        a = _C.gmlake_global(d)
        if a.suspended:
            a.resume(_engine(a.backend, a.device))
            done.add(d)
    for c in _registered(device):
        if c.suspended:
            c.resume(engine=_engine(c.backend, c.device_index))
            done.add(c.device_index)
    return sorted(done)


def prepare_suspend(device: Optional[int] = None) -> int:
    """Make the host memory of the next :func:`suspend` ready now, while the process is awake.

    For glake's process-wide allocator of ``device`` (default: every device): host buffers of the
    sizes its suspend would copy at this moment, faulted in and page-locked, kept by the allocator. A
    suspend that then finds the same live data copies into resident, pinned memory with the copy
    engines' DMA alone, and so does its resume back: a first suspend into fresh memory instead waits
    for the kernel to fault in and zero every page (on an H200 host 17-24 GB/s against 47-55 GB/s
    into prepared memory; docs/suspend.md). It takes seconds for tens of GiB (faulting, then
    ``cuMemHostRegister``), without the allocator's lock: call it when the process goes idle, before
    it may sleep. What it makes stays across suspend/resume cycles, as host RAM the process holds
    while awake, until :func:`release_suspend_host`; an allocation made or freed since changes the
    sizes, and a suspend then uses what still fits and makes the rest fresh. KV caches are not
    prepared (a sleeping server discards its KV cache). Returns the bytes made ready.
    """
    return sum(_C.gmlake_global(d).prepare_suspend() for d in _devices(device))


def release_suspend_host(device: Optional[int] = None) -> None:
    """Give back the host memory glake's process-wide allocators keep for their next suspend
    (:func:`prepare_suspend`'s, or ``GLAKE_SUSPEND_KEEP_HOST=1``'s)."""
    for d in _devices(device):
        _C.gmlake_global(d).drop_host_reserve()


def suspended(device: Optional[int] = None) -> bool:
    """Whether anything glake manages on ``device`` (default: anywhere) is suspended now."""
    return any(_C.gmlake_global(d).suspended for d in _devices(device)) or \
        any(c.suspended for c in _registered(device))
