"""The programs the GPU tests run (and the planted sanitizer error) at least compile: CI has no GPU
to run them, and a syntax error there would only show on the GPU machine."""

from __future__ import annotations

import py_compile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [ROOT / "tests" / "gmlake" / "torch_api_scripts.py", ROOT / "tests" / "gmlake" / "gpu_scripts.py",
           ROOT / "scripts" / "sanitizer_planted.py", *sorted((ROOT / "benchmarks").glob("*.py"))]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
