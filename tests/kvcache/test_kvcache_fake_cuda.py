"""The KV-cache manager on the cuda backend against the fake libcuda (no GPU needed): each scenario of
fake_cuda_kvcache.py runs in a subprocess with the fake (tests/fake_cuda_util.py). Not a GPU test."""

from __future__ import annotations

from pathlib import Path

from tests.fake_cuda_util import fake_libcuda, run_scenario  # noqa: F401  (fixture)

SCENARIOS = Path(__file__).resolve().parent / "fake_cuda_kvcache.py"


def test_a_failed_resume_leaves_the_cache_suspended_and_a_later_one_restores_it(fake_libcuda):
    run_scenario(fake_libcuda, SCENARIOS, "suspend_resume_retry", devices=1)


def test_each_publish_of_the_lengths_reaches_its_streams_next_kernel(fake_libcuda):
    run_scenario(fake_libcuda, SCENARIOS, "lengths_published_in_stream_order", devices=1)
