"""`glake`, `glake --version` and `glake run`: the real command, run as a process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "glake")
GLAKE = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "glake.cli"]


def glake(*argv: str, env=None, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(GLAKE + list(argv), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})), cwd=cwd)


def test_bare_glake_prints_help():
    out = glake()
    assert out.returncode == 0 and out.stderr == ""
    for word in ("usage: glake", "run", "ps", "stats", "top", "map", "--version"):
        assert word in out.stdout


def test_version_names_the_backends():
    import glake as g
    from glake import _C

    out = glake("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"glake {g.__version__} from ")
    assert ("backends built: host, cuda" if _C.cuda_backend_built() else "backends built: host") in out.stdout
    assert f"backend in use: {g.backend_name()}" in out.stdout


@pytest.mark.parametrize("argv, env, shown", [
    (["--conf", "stitch:maybe"], {}, "stitch:maybe (glake run --conf): not a boolean"),
    (["--conf", "limit_bytes:-5"], {}, "limit_bytes:-5 (glake run --conf): not a byte count"),
    (["--conf", "stich:true"], {}, "unknown allocator option 'stich'"),
    ([], {"GLAKE_ALLOC_CONF": "limit_bytes:lots"}, "limit_bytes:lots (GLAKE_ALLOC_CONF): not a byte count"),
])
def test_run_refuses_a_bad_conf_before_the_program_starts(tmp_path, argv, env, shown):
    marker = tmp_path / "started"
    out = glake("run", *argv, "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')", env=env)
    assert out.returncode == 2 and shown in out.stderr and "the program was not started" in out.stderr
    assert not marker.exists()


def test_run_refuses_a_python_without_glake(tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    if subprocess.run([python, "-c", "import glake"], capture_output=True, cwd=tmp_path).returncode == 0:
        pytest.skip("a bare venv imports glake here (PYTHONPATH names a checkout): no Python without glake to try")
    marker = tmp_path / "started"
    out = glake("run", "--", python, "-c", f"open({str(marker)!r}, 'w')", cwd=tmp_path)
    assert out.returncode == 1, out
    assert f"this Python ({python}) cannot import glake" in out.stderr
    assert "the program was not started" in out.stderr and sys.executable in out.stderr
    assert "Error in sitecustomize" not in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()


def test_run_with_glake_still_runs_the_program():
    out = glake("run", "--conf", "stitch:false,limit_bytes:1GB", "--", sys.executable, "-c",
                "import os; print(os.environ['GLAKE_ALLOC_CONF'])")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "stitch:false,limit_bytes:1GB"
