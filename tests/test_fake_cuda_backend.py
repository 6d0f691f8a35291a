"""The core and allocator unit tests once more, on the cuda backend against the fake libcuda.

tests/test_core.py (its cuda-parametrised tests) and the allocator unit, pool and property tests run in a
pytest subprocess that loads the fake (tests/fake_cuda_util.py; with AddressSanitizer where the
compiler has it), so glake's cuda driver code (contexts, VMM calls, events, streams) and the
allocator's event-driven paths run on a machine without a GPU. Not a GPU test: the fake gives CUDA's
semantics on host memory, not its timing or its hardware.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fake_cuda_util import fake_libcuda, fake_env  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_core_and_allocator_suites_on_the_fake(fake_libcuda):
    env = fake_env(fake_libcuda, devices=2)
    env.update(GLAKE_TEST_FAKE_CUDA="1")
    env.pop("GLAKE_BACKEND")  # the suites choose their backends; auto-detection finds the fake
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda or allocator or pools or suspend or shared",
                        "tests/test_core.py", "tests/gmlake/test_allocator.py",
                        "tests/gmlake/test_allocator_properties.py", "tests/gmlake/test_pools.py",
                        "tests/gmlake/test_suspend.py", "tests/gmlake/test_shared_chunks.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = r.stdout[-4000:] + r.stderr[-3000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "failed" not in r.stdout, tail
    assert "no usable CUDA GPU" not in r.stdout, tail  # the cuda tests ran on the fake, none was skipped for it
