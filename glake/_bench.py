"""Benchmark helpers timed in C++ (used by ``benchmarks/``, not part of glake's API).

The extension is built as ``glake/libglake_bench.so`` from ``csrc/bench/``, linked to the core
library; this module re-exports it under a stable name.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from glake import _C  # noqa: F401  (the allocator type the helpers take)
from glake import libglake_bench as _ext


def measure_alloc_free_ns(allocator: "_C.Allocator", size: int, iters: int) -> float:
    """Median nanoseconds of one cached ``malloc(size)`` + ``free`` pair on ``allocator``, over ``iters``."""
    return _ext.measure_alloc_free_ns(allocator, size, iters)


def measure_vmm_latency(n: int, device: int = 0, backend: Optional[str] = None) -> Dict[str, List[float]]:
    """Microseconds per call of create/map/set_access/set_access_again/unmap/release over ``n`` chunks."""
    return _ext.measure_vmm_latency(n, device, backend)


__all__ = ["measure_alloc_free_ns", "measure_vmm_latency"]
