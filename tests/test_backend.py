"""Backend selection: auto-detection, GLAKE_BACKEND, and importing without libcuda."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import glake
from glake import _C

HAS_CUDA = _C.cuda_unavailable_reason() == ""


def run_py(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "GLAKE_BACKEND"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


def test_auto_detection_matches_machine():
    assert glake.backend_name() == ("cuda" if HAS_CUDA else "host")


def test_env_forces_host():
    r = run_py("import glake; print(glake.backend_name())", GLAKE_BACKEND="host")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "host"


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a usable GPU")
def test_forcing_cuda_without_gpu_raises_backend_unavailable():
    code = (
        "import glake\n"
        "try:\n    glake.backend_name()\nexcept glake.BackendUnavailableError as e:\n    print('ERR', e)\n"
    )
    r = run_py(code, GLAKE_BACKEND="cuda")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ERR the cuda backend is unavailable:")
    with pytest.raises(glake.BackendUnavailableError, match="cuda backend is unavailable"):
        glake.core.granularity(backend="cuda")


def test_import_needs_no_libcuda_and_stays_lazy():
    # Importing must not touch the driver: the backend is resolved at first use.
    r = run_py("import glake, glake.core; print('ok')", GLAKE_BACKEND="cuda")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_unknown_backend_is_invalid_argument():
    with pytest.raises(glake.InvalidArgumentError, match="unknown backend 'tpu'"):
        glake.backend_name("tpu")


def test_error_hierarchy():
    assert issubclass(glake.OutOfMemoryError, glake.GlakeError)
    assert issubclass(glake.OutOfMemoryError, MemoryError)
    assert issubclass(glake.InvalidArgumentError, ValueError)
    assert issubclass(glake.BackendUnavailableError, glake.GlakeError)
    assert issubclass(glake.GlakeError, RuntimeError)
