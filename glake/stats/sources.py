"""The registry of extra stats sources: anything in the process that has figures to publish.

A source is a function returning a mapping of names to numbers (your own, with
:func:`register_source`); an allocator source also gives the memory map (``Allocator.snapshot``).
Every glake component publishes itself here when it is made, and leaves when it is closed or
collected: each ``glake.Allocator`` (:func:`register_allocator`), each ``KVCache`` and each
multipath engine (:func:`register_section`: many sections of one name, told apart by labels).
The collector only reads this registry and the C++ layer below; it never looks into other modules.
Sources are only called when a client asks (GetStats, WatchStats, GetMemoryMap, a Prometheus
scrape): registering one costs nothing on any hot path.

This module imports nothing heavy (no grpc, no protobuf), so a layer can register itself at import.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

Number = Union[int, float]
StatsFn = Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class Source:
    """A registered source of figures (``kind="stats"``) or an allocator (``kind="allocator"``).

    ``name`` is the registry key; ``section`` the name of the section it publishes (the same as
    ``name`` unless registered with :func:`register_section`). ``owner_ref`` returns the object the
    source belongs to, or None once it is gone (the source is then dropped).
    """

    name: str
    kind: str
    device: int = -1
    labels: Dict[str, str] = field(default_factory=dict)
    fn: Optional[StatsFn] = None
    allocator_ref: Optional[Callable[[], Any]] = None  # returns the allocator, or None once it is gone
    section: str = ""
    owner_ref: Optional[Callable[[], Any]] = None

    def allocator(self) -> Any:
        return self.allocator_ref() if self.allocator_ref is not None else None

    @property
    def section_name(self) -> str:
        return self.section or self.name

    def alive(self) -> bool:
        if self.kind == "allocator":
            return self.allocator() is not None
        return self.owner_ref is None or self.owner_ref() is not None


_lock = threading.Lock()
_sources: Dict[str, Source] = {}
_serial = itertools.count(1)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 128 or any(c.isspace() for c in name):
        raise ValueError(f"stats source name must be a non-empty string without spaces (<= 128 chars), got {name!r}")


def register_source(name: str, fn: StatsFn, *, device: int = -1, labels: Optional[Mapping[str, str]] = None,
                    replace: bool = False) -> None:
    """Publish the figures ``fn()`` returns as the section ``name`` of this process's stats.

    Parameters
    ----------
    name : str
        Section name (``"kvcache"``, ``"multipath"``, ...). Registering a name twice raises unless
        ``replace=True``.
    fn : callable
        Returns a mapping of figure names to numbers. Integers travel as counters, floats as
        values; booleans as 0/1; other values (strings, None) are skipped. It is called from the
        stats server's threads, so it must be thread-safe; if it raises, the section carries the
        error and the other sections are unaffected.
    device : int
        Device the figures belong to (-1: none).
    labels : mapping, optional
        Extra labels of the section (Prometheus labels too).
    """
    _check_name(name)
    if not callable(fn):
        raise TypeError(f"register_source({name!r}): fn must be callable, got {type(fn).__name__}")
    _add(Source(name, "stats", int(device), dict(labels or {}), fn=fn), replace)


def register_allocator(allocator: Any, name: Optional[str] = None, *, replace: bool = False) -> str:
    """Publish a private :class:`glake.Allocator`: its stats (section ``allocator``) and its memory map.

    The registry holds the allocator weakly: when the program drops it, it leaves the stats.
    Returns the pool name it is published under (default ``"<backend>:<device>/<n>"``, n a serial number).
    """
    if not (hasattr(allocator, "stats") and hasattr(allocator, "snapshot")):
        raise TypeError(f"register_allocator: {type(allocator).__name__} has no stats()/snapshot()")
    if name is None:
        name = f"{allocator.backend}:{allocator.device}/{next_serial()}"
    _check_name(name)
    try:
        ref: Callable[[], Any] = weakref.ref(allocator)
    except TypeError:  # not weak-referenceable: keep it alive while registered
        ref = lambda a=allocator: a  # noqa: E731
    labels = {"pool": name, "backend": str(allocator.backend)}
    with _lock:
        _drop_dead_locked()
        if name in _sources and not replace:
            raise ValueError(f"a stats source named {name!r} is already registered (pass replace=True)")
        for key, src in list(_sources.items()):  # published before under another name: it moves
            if src.kind == "allocator" and src.allocator() is allocator:
                del _sources[key]
        _sources[name] = Source(name, "allocator", int(allocator.device), labels, allocator_ref=ref)
    return name


def register_section(section: str, owner: Any, *, method: str = "stats", device: int = -1,
                     labels: Optional[Mapping[str, str]] = None) -> str:
    """Publish ``owner.<method>()`` as one of several sections called ``section`` (one per KV cache,
    per copy engine, ...).

    The sections of one name are told apart by their ``labels``. ``owner`` is held weakly: when it
    is collected the section leaves; :func:`unregister` with the returned key removes it earlier
    (on ``close()``).

    Returns
    -------
    str
        The registry key, ``"<section>#<n>"``.
    """
    _check_name(section)
    if not callable(getattr(owner, method, None)):
        raise TypeError(f"register_section({section!r}): {type(owner).__name__}.{method} is not callable")
    ref = weakref.ref(owner)

    def figures() -> Mapping[str, Any]:
        obj = ref()
        if obj is None:
            raise LookupError(f"the {section} this section published is gone")
        return getattr(obj, method)()

    key = f"{section}#{next(_serial)}"
    _add(Source(key, "stats", int(device), dict(labels or {}), fn=figures, section=section, owner_ref=ref), False)
    return key


def next_serial() -> int:
    """A process-unique number, for default names (ids of dead objects are reused; these are not)."""
    return next(_serial)


def _drop_dead_locked() -> None:
    for n in [n for n, s in _sources.items() if not s.alive()]:
        del _sources[n]


def _add(source: Source, replace: bool) -> None:
    with _lock:
        _drop_dead_locked()
        if source.name in _sources and not replace:
            raise ValueError(f"a stats source named {source.name!r} is already registered (pass replace=True)")
        _sources[source.name] = source


def unregister(name: str) -> bool:
    """Remove a source or allocator by name; returns whether it was registered."""
    with _lock:
        return _sources.pop(name, None) is not None


def registered() -> List[Source]:
    """The registered sources, in registration order (allocators whose object is gone are dropped)."""
    with _lock:
        _drop_dead_locked()
        return list(_sources.values())


__all__ = ["Source", "register_source", "register_allocator", "register_section", "unregister", "registered"]
