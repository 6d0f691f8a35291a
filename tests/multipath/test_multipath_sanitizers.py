"""The multipath engine's threading under ThreadSanitizer and AddressSanitizer (host backend, C++ only).

Builds tests/multipath/sanitizer_stress.cpp with the engine and host driver sources and runs it: any
data race, memory error or undefined behaviour fails the test, as does a wrong byte.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(str(p) for p in (ROOT / "multipath").glob("*.cpp")) + [
    str(ROOT / "csrc" / "driver" / "driver.cpp"), str(ROOT / "csrc" / "driver" / "host_driver.cpp"),
    str(ROOT / "csrc" / "common" / "error.cpp")]


@pytest.mark.parametrize("sanitizer", ["thread", "address,undefined"])
def test_engine_under_sanitizer(tmp_path, sanitizer):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if not cxx:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "stress"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-g", f"-fsanitize={sanitizer}", "-fno-sanitize-recover=all",
                            f"-I{ROOT}", f"-I{ROOT / 'csrc'}", str(Path(__file__).parent / "sanitizer_stress.cpp"),
                            *SOURCES, "-o", str(exe), "-lpthread"], capture_output=True, text=True)
    if build.returncode != 0 and "sanitizer" in build.stderr.lower() and "cannot find" in build.stderr.lower():
        pytest.skip(f"-fsanitize={sanitizer} runtime missing: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "mismatches=0" in r.stdout, f"{r.stdout}\n{r.stderr[-5000:]}"
    assert "Sanitizer" not in r.stderr, r.stderr[-5000:]
