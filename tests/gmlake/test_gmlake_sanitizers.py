"""The stitched allocator's threading under ThreadSanitizer and AddressSanitizer+UBSan (host backend, C++ only).

Builds tests/gmlake/sanitizer_stress.cpp with the allocator, registry, core and host driver sources
and runs it: workers malloc and free canaried blocks on two streams under a limit that makes them
stitch, hit OOM and retry, while another thread empties the cache and reads stats and snapshots. Any
data race, memory error, undefined behaviour, wrong canary, broken invariant or leftover chunk fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sanitizer_util import ROOT, SANITIZERS, run_under_sanitizer

SOURCES = sorted(str(p) for p in (ROOT / "gmlake").glob("*.cpp")) + [
    str(ROOT / "csrc" / "core" / name)
    for name in ("phys_chunk.cpp", "virtual_range.cpp", "chunk_pool.cpp", "host_copy.cpp")] + [
    str(ROOT / "csrc" / "driver" / "driver.cpp"), str(ROOT / "csrc" / "driver" / "host_driver.cpp"),
    str(ROOT / "csrc" / "common" / "error.cpp")]


@pytest.mark.parametrize("sanitizer", SANITIZERS)
def test_allocator_under_sanitizer(tmp_path, sanitizer):
    r = run_under_sanitizer(tmp_path, sanitizer, Path(__file__).parent / "sanitizer_stress.cpp", SOURCES)
    assert "errors=0" in r.stdout, r.stdout
