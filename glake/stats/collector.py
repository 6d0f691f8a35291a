"""Gathers this process's figures and memory map as plain data (no grpc, no protobuf here).

Sections (each a dict shaped like the ``Section`` message):

- ``vmm``: the VMM core's counters of the default backend (and of ``host`` when it was used too):
  chunks, physical / reserved-VA / mapped bytes, calls and nanoseconds per driver operation.
- ``allocator``: one per process-wide allocator that exists (``glake.torch``, ``glake.cupy``: asked
  of the C++ registry below; an allocator is never created just to be looked at) and one per live
  ``glake.Allocator`` (each registers itself): torch's key names plus glake's, and figures of the
  map (``largest_free_bytes``, ``free_bytes``, ``lent_bytes``, ``held_bytes``; values
  ``fragmentation``, ``utilization``).
- one per registered source: each live ``KVCache`` (``kvcache``) and multipath engine
  (``multipath``) registers itself, and a program adds its own with
  :func:`glake.stats.register_source`.

This module reads only the registry (:mod:`glake.stats.sources`) and ``glake._C``: a component
that has figures registers itself; nothing here imports or inspects other modules.

Nothing here runs unless a client asks: collecting is pull-only, the alloc path never sees it.
"""

from __future__ import annotations

import os
import sys  # sys.argv only
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from glake.stats import memmap, sources

BUILTIN_SECTIONS = ("vmm", "allocator")
_INT64_MAX = (1 << 63) - 1


class UnknownNameError(LookupError):
    """A request named a section or pool this process does not have."""


def _glake_C():
    from glake import _C

    return _C


def default_backend() -> str:
    """The process's default backend, or ``"host"`` if that cannot be resolved."""
    try:
        return _glake_C().backend_name(None)
    except Exception:  # e.g. GLAKE_BACKEND=cuda on a machine without a GPU
        return "host"


def process_info(listen_addresses: Sequence[str] = (), start_time_ns: int = 0) -> Dict[str, Any]:
    """The ``ProcessInfo`` of this process."""
    import glake

    return {"pid": os.getpid(), "argv": list(sys.argv), "glake_version": glake.__version__,
            "backend": default_backend(), "server": "python", "start_time_unix_ns": int(start_time_ns),
            "listen_addresses": list(listen_addresses)}


def split_figures(figures: Mapping[str, Any], prefix: str = "") -> Tuple[Dict[str, int], Dict[str, float]]:
    """Integers (and booleans) to counters, floats to values; nested mappings flattened with dots.

    Other values (strings, None, ...) are not figures and are left out.
    """
    counters: Dict[str, int] = {}
    values: Dict[str, float] = {}
    for key, v in figures.items():
        name = f"{prefix}{key}"
        if isinstance(v, Mapping):
            c, f = split_figures(v, name + ".")
            counters.update(c)
            values.update(f)
        elif isinstance(v, bool):
            counters[name] = int(v)
        elif isinstance(v, int):
            if -_INT64_MAX - 1 <= v <= _INT64_MAX:
                counters[name] = v
            else:
                values[name] = float(v)
        elif isinstance(v, float):
            values[name] = v
        elif hasattr(v, "__index__"):  # numpy integers
            counters[name] = int(v)
        elif hasattr(v, "__float__") and not isinstance(v, (str, bytes)):
            try:
                values[name] = float(v)
            except (TypeError, ValueError):
                pass
    return counters, values


def _section(name: str, device: int = -1, labels: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    return {"name": name, "device": int(device), "labels": dict(labels or {}), "counters": {}, "values": {},
            "error": ""}


def _fill(section: Dict[str, Any], fn) -> Dict[str, Any]:
    try:
        figures = fn()
        section["counters"], section["values"] = split_figures(figures)
    except Exception as e:  # a failing source must not take the others down
        section["counters"], section["values"] = {}, {}
        section["error"] = f"{type(e).__name__}: {e}"
    return section


def _vmm_sections() -> List[Dict[str, Any]]:
    C = _glake_C()
    default = default_backend()
    out = [_fill(_section("vmm", labels={"backend": default}), lambda: C.stats(default))]
    if default != "host":
        host = C.stats("host")
        if host.get("chunks_created", 0) or host.get("ranges_live", 0):
            out.append(_fill(_section("vmm", labels={"backend": "host"}), lambda: host))
    return out


def global_allocators() -> List[Tuple[str, Any]]:
    """``(pool name, allocator)`` of the process-wide allocators that exist (none is created)."""
    C = _glake_C()
    backend = default_backend()
    try:
        count = C.device_count(backend)
    except Exception:
        return []
    out = []
    for device in range(count):
        if C.gmlake_global_exists(device):
            out.append((f"{backend}:{device}", C.gmlake_global(device)))
    return out


def _allocators() -> List[Tuple[str, Any]]:
    pairs = global_allocators()
    for src in sources.registered():
        if src.kind == "allocator":
            alloc = src.allocator()
            if alloc is not None:
                pairs.append((src.name, alloc))
    return pairs


def pool_of(name: str, allocator: Any) -> Dict[str, Any]:
    """The memory map of one allocator."""
    C = _glake_C()
    backend = str(allocator.backend)
    return memmap.pool_from_snapshot(name, allocator.device, backend, C.granularity(backend, allocator.device),
                                     allocator.snapshot())


def _allocator_section(name: str, allocator: Any) -> Dict[str, Any]:
    sec = _section("allocator", allocator.device, {"pool": name, "backend": str(allocator.backend)})

    def figures() -> Dict[str, Any]:
        stats = dict(allocator.stats())
        m = memmap.summarize([pool_of(name, allocator)])
        stats.update(largest_free_bytes=m["largest_free"], free_bytes=m["free"], lent_bytes=m["lent"],
                     held_bytes=m["held"], fragmentation=float(m["fragmentation"]),
                     utilization=float(m["utilization"]))
        return stats

    return _fill(sec, figures)


def section_names() -> List[str]:
    """Names GetStats can be asked for."""
    names = list(BUILTIN_SECTIONS)
    for src in sources.registered():
        if src.kind == "stats" and src.section_name not in names:
            names.append(src.section_name)
    return names


def collect_sections(names: Optional[Iterable[str]] = None) -> List[Dict[str, Any]]:
    """The sections named (all when ``names`` is empty or None).

    Raises
    ------
    UnknownNameError
        A name is not a section of this process.
    """
    wanted = [n for n in (names or ()) if n]
    known = section_names()
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise UnknownNameError(f"no section {', '.join(map(repr, unknown))} in process {os.getpid()}; "
                               f"sections: {', '.join(known)}")
    want = set(wanted or known)
    out: List[Dict[str, Any]] = []
    if "vmm" in want:
        out.extend(_vmm_sections())
    if "allocator" in want:
        out.extend(_allocator_section(n, a) for n, a in _allocators())
    for src in sources.registered():
        if src.kind == "stats" and src.section_name in want:
            out.append(_fill(_section(src.section_name, src.device, src.labels), src.fn))
    return out


def collect_pools(name: str = "") -> List[Dict[str, Any]]:
    """Memory maps of every allocator, or of the pool ``name``.

    Raises
    ------
    UnknownNameError
        No pool of that name.
    """
    pairs = _allocators()
    if name:
        pairs = [(n, a) for n, a in pairs if n == name]
        if not pairs:
            names = ", ".join(n for n, _ in _allocators()) or "none"
            raise UnknownNameError(f"no pool {name!r} in process {os.getpid()}; pools: {names}")
    return [pool_of(n, a) for n, a in pairs]


__all__ = ["UnknownNameError", "process_info", "split_figures", "global_allocators", "pool_of", "section_names",
           "collect_sections", "collect_pools", "default_backend"]
