"""The multipath engine's threading under ThreadSanitizer and AddressSanitizer (host backend, C++ only).

Builds tests/multipath/sanitizer_stress.cpp with the engine and host driver sources and runs it: any
data race, memory error or undefined behaviour fails the test, as does a wrong byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sanitizer_util import ROOT, SANITIZERS, run_under_sanitizer

SOURCES = sorted(str(p) for p in (ROOT / "multipath").glob("*.cpp")) + [
    str(ROOT / "csrc" / "driver" / "driver.cpp"), str(ROOT / "csrc" / "driver" / "host_driver.cpp"),
    str(ROOT / "csrc" / "common" / "error.cpp")]


@pytest.mark.parametrize("sanitizer", SANITIZERS)
def test_engine_under_sanitizer(tmp_path, sanitizer):
    run_under_sanitizer(tmp_path, sanitizer, Path(__file__).parent / "sanitizer_stress.cpp", SOURCES)
