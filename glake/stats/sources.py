"""The registry of extra stats sources: anything in the process that has figures to publish.

A source is a function returning a mapping of names to numbers (``KVCache.stats``,
``glake.multipath.stats``, your own); an allocator source also gives the memory map
(``Allocator.snapshot``). Sources are only called when a client asks (GetStats, WatchStats,
GetMemoryMap, a Prometheus scrape): registering one costs nothing on any hot path.

This module imports nothing heavy (no grpc, no protobuf), so a layer can register itself at import.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

Number = Union[int, float]
StatsFn = Callable[[], Mapping[str, Any]]


@dataclass(frozen=True)
class Source:
    """A registered source of figures (``kind="stats"``) or an allocator (``kind="allocator"``)."""

    name: str
    kind: str
    device: int = -1
    labels: Dict[str, str] = field(default_factory=dict)
    fn: Optional[StatsFn] = None
    allocator_ref: Optional[Callable[[], Any]] = None  # returns the allocator, or None once it is gone

    def allocator(self) -> Any:
        return self.allocator_ref() if self.allocator_ref is not None else None


_lock = threading.Lock()
_sources: Dict[str, Source] = {}


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
    Returns the pool name it is published under (default ``"<backend>:<device>/<id>"``).
    """
    if not (hasattr(allocator, "stats") and hasattr(allocator, "snapshot")):
        raise TypeError(f"register_allocator: {type(allocator).__name__} has no stats()/snapshot()")
    if name is None:
        name = f"{allocator.backend}:{allocator.device}/{id(allocator):x}"
    _check_name(name)
    try:
        ref: Callable[[], Any] = weakref.ref(allocator)
    except TypeError:  # not weak-referenceable: keep it alive while registered
        ref = lambda a=allocator: a  # noqa: E731
    labels = {"pool": name, "backend": str(allocator.backend)}
    _add(Source(name, "allocator", int(allocator.device), labels, allocator_ref=ref), replace)
    return name


def _add(source: Source, replace: bool) -> None:
    with _lock:
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
        dead = [n for n, s in _sources.items() if s.kind == "allocator" and s.allocator() is None]
        for n in dead:
            del _sources[n]
        return list(_sources.values())


__all__ = ["Source", "register_source", "register_allocator", "unregister", "registered"]
