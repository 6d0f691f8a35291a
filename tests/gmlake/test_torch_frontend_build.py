"""The cpp torch frontend compiles and links against the installed torch (in CI: the CPU build of
torch, whose c10/cuda headers carry torch's allocator interface), through the same build function
glake.torch.install() uses on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")


def test_the_frontend_builds_against_this_torch(tmp_path):
    pytest.importorskip("ninja")
    env = dict(os.environ, GLAKE_CACHE_DIR=str(tmp_path))
    code = "from glake import torch_frontend as f; print('BUILT', f.check_build())"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    lib = r.stdout.split("BUILT", 1)[1].strip()
    assert lib.startswith(str(tmp_path)) and os.path.getsize(lib) > 0
    undefined = subprocess.run(["nm", "-D", "--undefined-only", lib], capture_output=True, text=True).stdout
    assert "glake_c_malloc" in undefined  # it reaches glake only through the C ABI
    defined = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True).stdout
    assert "PyInit_glake_torch_frontend_" in defined
    # A second build of the same sources and torch is a cache hit: no message, same library.
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "building the torch frontend" not in again.stderr, again.stderr[-2000:]


def test_install_rejects_an_unknown_frontend():
    import glake.torch
    from glake import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="frontend 'fast' is not one of auto, cpp, pluggable"):
        glake.torch.install(frontend="fast")
