"""The README's snippets, run as written: the python blocks, the demo of the first command, the tools."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as _f:
    README = _f.read()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
GPU_ONLY = [code for code in PYTHON if "glake.torch.install()" in code]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, **env))


def test_readme_starts_with_the_two_commands():
    lang, first = BLOCKS[0]
    assert lang == "bash" and README.index("```bash") < README.index("\n\n", README.index("# glake") + 8) + 2
    lines = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert lines == ["pip install -e . && python examples/allocator_demo.py",
                     "pip install -e '.[test]' && python -m pytest -q"]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in README


def test_the_demo_of_the_first_command_runs():
    out = subprocess.run([sys.executable, "examples/allocator_demo.py"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "backends built: host" in out.stdout and "stitch=True" in out.stdout


@pytest.mark.parametrize("code", [c for c in PYTHON if c not in GPU_ONLY], ids=lambda c: c.split("\n")[0][:40])
def test_cpu_python_snippets_run_as_written(code, tmp_path):
    sock = str(tmp_path / "dedup.sock")  # a dedup snippet's broker: this test's own, stopped after
    try:
        out = run_python(code, GLAKE_BACKEND="host", GLAKE_DEDUP_SOCKET=sock)
    finally:
        from tests.dedup.util import stop_broker

        stop_broker(sock)
    assert out.returncode == 0, out.stderr


def test_the_allocator_snippet_stitches():
    (code,) = [c for c in PYTHON if "glake.Allocator(" in c and "stitch" in c]
    out = run_python(code, GLAKE_BACKEND="host")
    assert out.stdout.split()[:4] == ["1", "stitch;", "512", "MiB"], out.stdout  # nothing more reserved


@pytest.mark.gpu
@pytest.mark.parametrize("code", GPU_ONLY, ids=lambda c: c.split("\n")[0][:40])
def test_gpu_python_snippets_run_as_written(code):
    import glake

    if glake.backend_name() != "cuda":
        pytest.skip("needs a CUDA GPU")
    runnable = code.replace("...", "import torch; x = torch.randn(1 << 20, device='cuda'); del x")
    out = run_python(runnable)
    assert out.returncode == 0, out.stderr


def test_the_tools_block_names_real_commands():
    (tools,) = [code for lang, code in BLOCKS if lang == "bash" and "glake ps" in code]
    script = os.path.join(os.path.dirname(sys.executable), "glake")
    glake_cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "glake.cli"]
    for line in tools.strip().splitlines():
        cmd = line.split("#")[0].split()
        if cmd[0] != "glake":
            continue
        sub = [w for w in cmd[1:2] if not w.startswith("-")]
        out = subprocess.run(glake_cmd + sub + ["--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (line, out.stderr)
        for opt in (w for w in cmd[2:] if w.startswith("-")):
            assert opt in out.stdout, (line, opt)
