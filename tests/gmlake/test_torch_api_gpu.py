"""torch's own memory API, snapshots, history, OOM type, graph pools, MemPool, trace callbacks, cudnn
and IPC with glake as torch's allocator (the cpp frontend), each scenario in a fresh process, and
the same scenario on torch's own allocator as the reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
SCRIPT = str(Path(__file__).with_name("torch_api_scripts.py"))
ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
SCENARIOS = ["memory_api", "snapshot", "oom", "graphs", "graphed_callables", "mempool", "trace_callbacks",
             "cudnn_benchmark", "ipc"]


def run(name: str, mode: str) -> str:
    out = subprocess.run([sys.executable, SCRIPT, name, mode], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"{name} ok" in out.stdout, out.stdout[-3000:]
    return out.stdout


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("mode", ["native", "glake"])
def test_torch_memory_api(name, mode):
    print(run(name, mode))


def test_cupy_allocates_on_cupys_current_stream():
    pytest.importorskip("cupy")
    run("cupy_stream", "glake")


@pytest.mark.parametrize("scenario", ["suspend_resume", "suspend_resume_prepared"])
def test_suspend_gives_torchs_memory_back_and_resume_restores_tensors_and_graphs(scenario):
    print(run(scenario, "glake"))
