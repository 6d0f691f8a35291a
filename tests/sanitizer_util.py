"""Builds a C++ stress program with a sanitizer and runs it (shared by the sanitizer tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
SANITIZERS = ["thread", "address,undefined"]


def run_under_sanitizer(tmp_path: Path, sanitizer: str, main: Path, sources: Sequence[str],
                        timeout: int = 300) -> subprocess.CompletedProcess:
    """Compiles `main` with `sources` and -fsanitize=`sanitizer`, runs it and returns its result.

    Skips when there is no C++ compiler or the sanitizer's runtime is missing; fails when the build
    fails, or when the program exits nonzero, does not print ``mismatches=0`` or reports a sanitizer
    finding.
    """
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if not cxx:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "stress"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-g", f"-fsanitize={sanitizer}", "-fno-sanitize-recover=all",
                            f"-I{ROOT}", f"-I{ROOT / 'csrc'}", str(main), *sources, "-o", str(exe), "-lpthread"],
                           capture_output=True, text=True)
    if build.returncode != 0 and "sanitizer" in build.stderr.lower() and "cannot find" in build.stderr.lower():
        pytest.skip(f"-fsanitize={sanitizer} runtime missing: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and "mismatches=0" in r.stdout, f"{r.stdout}\n{r.stderr[-5000:]}"
    assert "Sanitizer" not in r.stderr, r.stderr[-5000:]
    return r
