"""Builds the fake libcuda (tests/fake_cuda/fake_cuda.cpp) and runs scenarios against it.

The fake gives the CUDA driver API's semantics on host memory (see the comment at its top), so
glake's cuda backend runs on a machine without a GPU. Each scenario runs in a subprocess that
loads it (GLAKE_BACKEND=cuda, LD_LIBRARY_PATH pointing at it). Shared by
tests/multipath/test_multipath_fake_cuda.py and tests/gmlake/test_gmlake_fake_cuda.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest

FAKE_SRC = Path(__file__).resolve().parent / "fake_cuda" / "fake_cuda.cpp"
CUDA_H_DIRS = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
Fake = Tuple[Path, str]


def build_fake(out: Path, *flags: str) -> Path:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    include = next((Path(d) / "include" for d in CUDA_H_DIRS if d and (Path(d) / "include" / "cuda.h").exists()), None)
    if not cxx or not include:
        pytest.skip("needs a C++ compiler and cuda.h to build the fake libcuda")
    subprocess.run([cxx, "-shared", "-fPIC", "-O1", "-std=c++17", *flags, f"-I{include}", str(FAKE_SRC),
                    "-o", str(out / "libcuda.so.1"), "-lpthread"], check=True)
    return out


@pytest.fixture(scope="session")
def fake_libcuda(tmp_path_factory) -> Fake:
    """The fake, and what to LD_PRELOAD into the scenario's Python. Built with AddressSanitizer where
    the compiler has it, so a use of freed fake state (an event, a stream) fails the scenario at once
    instead of crashing a later run by chance; the ASan and C++ runtimes are preloaded for that."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or "g++"
    runtimes = [subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
                for lib in ("libasan.so", "libstdc++.so")]
    out = tmp_path_factory.mktemp("fake_cuda")
    if all(os.path.isabs(r) for r in runtimes):
        return build_fake(out, "-g", "-fsanitize=address"), os.pathsep.join(runtimes)
    return build_fake(out), ""


def fake_env(fake: Fake, devices: int = 2, delay_us: int = 0, wait_lag_us: int = 0,
             extra_env: dict | None = None) -> dict:
    """The environment of a subprocess that loads the fake as its libcuda (GLAKE_BACKEND=cuda)."""
    lib, preload = fake
    env = dict(os.environ, GLAKE_BACKEND="cuda", FAKE_CUDA_DEVICES=str(devices), FAKE_CUDA_COPY_DELAY_US=str(delay_us),
               FAKE_CUDA_WAIT_LAG_US=str(wait_lag_us),
               LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(lib), os.environ.get("LD_LIBRARY_PATH")])),
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    for var in ("GLAKE_MULTIPATH_CONF", "GLAKE_ALLOC_CONF"):
        env.pop(var, None)
    env.update(extra_env or {})
    if preload:  # Python itself leaks by design at exit: report memory errors only
        env.update(LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0")
    return env


def run_scenario(fake: Fake, script: Path, name: str, devices: int = 2, delay_us: int = 0, wait_lag_us: int = 0,
                 extra_env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `script NAME` against the fake; it must print "OK NAME" and exit 0."""
    env = fake_env(fake, devices, delay_us, wait_lag_us, extra_env)
    r = subprocess.run([sys.executable, str(script), name], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and f"OK {name}" in r.stdout, f"{name} failed:\n{r.stdout}\n{r.stderr}"
    return r
