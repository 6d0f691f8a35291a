"""The cuda-backend code of the multipath engine against a fake libcuda (no GPU needed).

tests/fake_cuda/fake_cuda.cpp is built into a libcuda.so.1 that gives the CUDA driver
API's semantics on host memory, with asynchronous streams; each scenario of fake_cuda_scenarios.py
runs in a subprocess that loads it (GLAKE_BACKEND=cuda). This checks the engine's use of streams,
events, contexts, pointer attributes and peer access, and its ordering against the caller's stream.
It is not a GPU test: the GPU tests (test_multipath_gpu.py, marked gpu) check the real thing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fake_cuda_util import fake_libcuda, run_scenario as _run  # noqa: F401  (fixture)

SCENARIOS = Path(__file__).resolve().parent / "fake_cuda_scenarios.py"


def run_scenario(fake, name: str, **kw) -> None:
    _run(fake, SCENARIOS, name, **kw)


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
