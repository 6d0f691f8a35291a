"""The cuda-backend code of the multipath engine against a fake libcuda (no GPU needed).

tests/multipath/fake_cuda/fake_cuda.cpp is built into a libcuda.so.1 that gives the CUDA driver
API's semantics on host memory, with asynchronous streams; each scenario of fake_cuda_scenarios.py
runs in a subprocess that loads it (GLAKE_BACKEND=cuda). This checks the engine's use of streams,
events, contexts, pointer attributes and peer access, and its ordering against the caller's stream.
It is not a GPU test: the GPU tests (test_multipath_gpu.py, marked gpu) check the real thing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CUDA_H_DIRS = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]


def build_fake(out: Path, *flags: str) -> Path:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    include = next((Path(d) / "include" for d in CUDA_H_DIRS if d and (Path(d) / "include" / "cuda.h").exists()), None)
    if not cxx or not include:
        pytest.skip("needs a C++ compiler and cuda.h to build the fake libcuda")
    subprocess.run([cxx, "-shared", "-fPIC", "-O1", "-std=c++17", *flags, f"-I{include}",
                    str(HERE / "fake_cuda" / "fake_cuda.cpp"), "-o", str(out / "libcuda.so.1"), "-lpthread"], check=True)
    return out


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory) -> tuple[Path, str]:
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


def run_scenario(fake: tuple[Path, str], name: str, devices: int = 2, delay_us: int = 0, wait_lag_us: int = 0) -> None:
    lib, preload = fake
    env = dict(os.environ, GLAKE_BACKEND="cuda", FAKE_CUDA_DEVICES=str(devices), FAKE_CUDA_COPY_DELAY_US=str(delay_us),
               FAKE_CUDA_WAIT_LAG_US=str(wait_lag_us),
               LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(lib), os.environ.get("LD_LIBRARY_PATH")])),
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("GLAKE_MULTIPATH_CONF", None)
    if preload:  # Python itself leaks by design at exit: report memory errors only
        env.update(LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0")
    r = subprocess.run([sys.executable, str(HERE / "fake_cuda_scenarios.py"), name], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and f"OK {name}" in r.stdout, f"{name} failed:\n{r.stdout}\n{r.stderr}"


@pytest.mark.parametrize("name", [
    "roundtrip_pageable", "roundtrip_pinned_plain_and_split", "non_blocking_pageable_source_reusable",
    "blocking_returns_after_landing", "pointer_kinds_and_errors", "driver_error_in_pipeline", "peer_paths",
    "concurrent_threads",
])
def test_scenario(fake_libcuda, name):
    run_scenario(fake_libcuda, name)


@pytest.mark.parametrize("delay_us", [0, 2000], ids=["fast_lanes", "slow_lanes"])
@pytest.mark.parametrize("name", ["h2d_ordered_on_caller_stream", "d2h_waits_for_caller_stream", "peer_paths"])
def test_ordering_scenario(fake_libcuda, name, delay_us):
    """With slow lanes (each engine copy delayed 2 ms) the caller's later work would overtake them unordered."""
    run_scenario(fake_libcuda, name, delay_us=delay_us)


@pytest.mark.parametrize("wait_lag_us", [0, 20000], ids=["prompt_caller", "lagging_caller"])
def test_close_frees_everything(fake_libcuda, wait_lag_us):
    """Closing right after a non-blocking copy frees the engine's events while the caller's stream
    may not have reached its waits on them yet (20 ms lag): CUDA allows that, so the fake must too."""
    run_scenario(fake_libcuda, "close_frees_everything", wait_lag_us=wait_lag_us)


def test_peers_detected_not_assumed(fake_libcuda):
    run_scenario(fake_libcuda, "peers_need_access", devices=1)
