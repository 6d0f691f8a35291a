"""Fixtures of the libcuda shim's tests: the fake libcuda (without sanitizer: a plain C++ program hosts
it), the driver-API test program, and a private runtime directory for stats pages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_cuda_util import build_fake

import glake

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = Path(__file__).resolve().parent / "programs"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
SHIM = Path(glake.__file__).resolve().parent / "libglake_shim.so"
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "glake")
GLAKE = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "glake.cli"]


@pytest.fixture(scope="session")
def shim() -> Path:
    if not SHIM.exists():
        pytest.skip("glake was built without cuda.h: no libglake_shim.so")
    return SHIM


@pytest.fixture(scope="session")
def fake_dir(tmp_path_factory) -> Path:
    """A directory holding the fake libcuda.so.1."""
    return build_fake(tmp_path_factory.mktemp("fake_cuda_shim"))


def compile_cpp(out: Path, sources: list, *flags: str) -> Path:
    """Builds a C++17 test program from `sources` (skips the test without a compiler)."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if not cxx:
        pytest.skip("needs a C++ compiler")
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{CUDA_INCLUDE}", *map(str, sources), "-o", str(out), *flags],
                   check=True, timeout=300)
    return out


def against_libcuda(fake_dir: Path) -> list:
    """Link flags of a program that NEEDs libcuda.so.1 (the fake at build time; the shim or a real driver
    at run time). libstdc++ NEEDED too: the fake (C++) exports its symbols, the real driver does not."""
    return ["-Wl,--no-as-needed", "-lstdc++", f"-L{fake_dir}", "-l:libcuda.so.1", "-ldl", "-lpthread"]


@pytest.fixture(scope="session")
def driver_program(fake_dir) -> Path:
    """tests/shim/programs/driver_api.cpp."""
    return compile_cpp(fake_dir.parent / "driver_api", [PROGRAMS / "driver_api.cpp"], *against_libcuda(fake_dir))


@pytest.fixture(scope="session")
def dedup_program(fake_dir) -> Path:
    """tests/shim/programs/dedup_weights.cpp (the dedup hint's user)."""
    return compile_cpp(fake_dir.parent / "dedup_weights", [PROGRAMS / "dedup_weights.cpp"],
                       f"-I{ROOT / 'csrc' / 'shim'}", *against_libcuda(fake_dir))


@pytest.fixture(scope="session", params=["static", "shared"])
def runtime_program(request, tmp_path_factory) -> Path:
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    if not nvcc.exists():
        pytest.skip("needs nvcc")
    out = tmp_path_factory.mktemp("runtime") / f"runtime_api_{request.param}"
    subprocess.run([str(nvcc), "-o", str(out), str(Path(__file__).parent / "programs" / "runtime_api.cu"),
                    "-cudart", request.param], check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture
def runtime_dir(tmp_path) -> Path:
    """XDG_RUNTIME_DIR of the test: stats pages land in <it>/glake."""
    d = tmp_path / "xdg"
    d.mkdir(mode=0o700)
    return d


def base_env(fake_dir: Path, runtime_dir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLAKE_ALLOC_CONF", "GLAKE_BACKEND",
                                                            "GLAKE_REAL_LIBCUDA")}
    env.update(FAKE_CUDA_DEVICES="2", FAKE_CUDA_PATH=str(fake_dir / "libcuda.so.1"), XDG_RUNTIME_DIR=str(runtime_dir))
    env.update(extra)
    return env
