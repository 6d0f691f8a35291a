"""The cuda backend resolves every driver entry point at an explicit version and calls it with that
version's signature, against the fake libcuda, whose cuGetProcAddress hands back versioned variants
as the driver does (cuCtxSynchronize takes a CUcontext from 13000 on and refuses anything else).

Each case runs in a subprocess that loads the fake as libcuda.so.1. Not a GPU test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_cuda_util import CUDA_H_DIRS, fake_env, fake_libcuda  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]

# Allocates, frees, and empties the cache (which synchronises the device through cuCtxSynchronize
# before unmapping), then prints what the driver's call counters saw.
SYNC_SCRIPT = """
import glake
a = glake.Allocator(device=0, backend="cuda")
p = a.malloc(8 << 20)
a.free(p)
a.empty_cache()
s = a.stats()
print("syncs", s["num_sync_all_streams"], "reserved", s["reserved_bytes.all.current"])
"""


def run(fake, code: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = fake_env(fake, devices=1, extra_env=env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("driver", ["13000", "12080"])
def test_device_synchronize_uses_the_drivers_variant(fake_libcuda, driver):
    """At 13000 the old call (no context argument) got CUDA_ERROR_CONTEXT_IS_DESTROYED from
    empty_cache on every GPU; at 12080 the driver only has the (void) variant."""
    r = run(fake_libcuda, SYNC_SCRIPT, FAKE_CUDA_DRIVER_VERSION=driver)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "syncs 1 reserved 0" in r.stdout, r.stdout


def test_a_driver_older_than_an_entry_point_is_a_clear_backend_error(fake_libcuda):
    code = "import glake\ntry:\n    glake.Allocator(backend='cuda')\nexcept glake.BackendUnavailableError as e:\n    print('ERR', e)\n"
    r = run(fake_libcuda, code, FAKE_CUDA_DRIVER_VERSION="10000")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ERR" in r.stdout and "version=10020" in r.stdout and "driver version 10000" in r.stdout, r.stdout


def test_a_device_that_does_not_exist_is_refused_by_every_call(fake_libcuda):
    """ContextGuard used to index its contexts unchecked: memcpy on device 7 of a 1-GPU machine read
    out of bounds."""
    code = """
import glake, glake.core as core
for call in (lambda: core.memcpy(0, 0, 16, device=7), lambda: glake.Allocator(device=7, backend="cuda")):
    try:
        call()
    except glake.InvalidArgumentError as e:
        print("REFUSED", e)
"""
    r = run(fake_libcuda, code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("REFUSED") == 2 and "device 7 does not exist" in r.stdout, r.stdout


def test_every_entry_point_names_a_pfn_typedef_of_its_version():
    """The table in cuda_driver.h lists (name, version) pairs; each must exist in cudaTypedefs.h
    (the build checks the signatures; this checks that nothing is resolved at an implied version)."""
    header = (ROOT / "csrc" / "driver" / "cuda_driver.h").read_text()
    typedefs_path = next((Path(d) / "include" / "cudaTypedefs.h" for d in CUDA_H_DIRS
                          if d and (Path(d) / "include" / "cudaTypedefs.h").exists()), None)
    if typedefs_path is None:
        pytest.skip("needs the CUDA headers (cudaTypedefs.h)")
    typedefs = typedefs_path.read_text()
    table = header[header.index("#define GLAKE_CUDA_FUNCS"):header.index("/// Function pointers into libcuda")]
    pairs = re.findall(r"X\((cu\w+), (\d+)(?:, (\d+))?\)", table)
    assert len(pairs) >= 40
    for name, version, old in pairs:
        for v in filter(None, (version, old)):
            assert f"PFN_{name}_v{v})" in typedefs, f"{name} at {v} has no PFN typedef"
    assert ("cuCtxSynchronize", "13000", "2000") in pairs
