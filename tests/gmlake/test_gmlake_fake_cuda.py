"""The stitched allocator on the cuda backend against the fake libcuda (no GPU needed).

Each scenario of fake_cuda_gmlake.py runs in a subprocess with the fake (tests/fake_cuda_util.py):
the allocator's VMM calls, its synchronisation before unmapping freed memory, and its behaviour
during (emulated) CUDA graph captures, with the fake counting unmap hazards and calls a capture
forbids. It is not a GPU test: test_torch_gpu.py (marked gpu) checks the real thing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fake_cuda_util import fake_libcuda, run_scenario  # noqa: F401  (fixture)

SCENARIOS = Path(__file__).resolve().parent / "fake_cuda_gmlake.py"


@pytest.mark.parametrize("name", [
    "vmm_core", "allocator_life", "unmap_hazard_empty_cache", "unmap_hazard_stitch_gc", "unmap_hazard_detected",
    "capture_rules_detected", "capture_lifecycle", "capture_pending_record_stream",
    "capture_slow_path_other_streams", "capture_shared_pool", "capture_record_stream_free",
    "gil_released_in_slow_path",
])
def test_scenario(fake_libcuda, name):
    run_scenario(fake_libcuda, SCENARIOS, name, devices=1)


def test_a_chunk_too_large_for_the_memory_left_falls_back_to_granules(fake_libcuda):
    run_scenario(fake_libcuda, SCENARIOS, "chunk_fallback", devices=1, extra_env={"FAKE_CUDA_MAX_CHUNK": str(2 << 20)})


def test_a_failed_resume_leaves_the_allocator_suspended_and_a_later_one_restores_it(fake_libcuda):
    run_scenario(fake_libcuda, SCENARIOS, "suspend_resume_retry", devices=1)


def test_a_resume_that_runs_out_midway_undoes_the_slices_it_mapped(fake_libcuda):
    run_scenario(fake_libcuda, SCENARIOS, "resume_runs_out_midway", devices=1)
