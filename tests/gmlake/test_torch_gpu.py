"""glake as torch's (and CuPy's) allocator on a GPU, each case in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
SCRIPT = str(Path(__file__).with_name("gpu_scripts.py"))
ENV = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONPATH=str(Path(__file__).resolve().parents[2]))


def run(*args: str, cmd=None) -> str:
    out = subprocess.run(cmd or [sys.executable, SCRIPT, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_training_losses_bit_identical_to_native():
    native = [l for l in run("train", "native").splitlines() if l.startswith("loss")]
    glake_out = run("train", "glake")
    ours = [l for l in glake_out.splitlines() if l.startswith("loss")]
    assert len(native) == 30 and ours == native
    assert "glake memory summary" in glake_out


def test_cuda_graph_capture_and_replay():
    assert "graph ok" in run("graph")


def test_record_stream_defers_reuse():
    assert "streams ok" in run("streams")


def test_oom_is_readable_and_recoverable():
    assert "oom ok" in run("oom")


def test_cupy_interop():
    pytest.importorskip("cupy")
    assert "cupy ok" in run("cupy")


def test_glake_run():
    out = run(cmd=[sys.executable, "-m", "glake.cli", "run", "--", sys.executable, SCRIPT, "run_cli"])
    assert "run ok" in out
