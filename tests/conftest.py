"""Shared fixtures: the backend under test and a leak check around every test."""

from __future__ import annotations

import gc

import pytest

from glake import _C

CUDA_REASON = _C.cuda_unavailable_reason()
HAS_CUDA = CUDA_REASON == ""


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=f"no usable CUDA GPU: {CUDA_REASON}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request) -> str:
    """Each core test runs on the host backend, and on the cuda backend where a GPU is present."""
    return request.param


LEAK_KEYS = ("chunks_live", "ranges_live", "mapped_bytes.current", "reserved_va_bytes.current", "physical_bytes.current")


def _live(name: str) -> dict:
    s = _C.stats(name)
    return {k: s[k] for k in LEAK_KEYS}


@pytest.fixture(autouse=True)
def no_leaks():
    """Every chunk, range and mapping a test makes must be gone when it ends."""
    names = ["host"] + (["cuda"] if HAS_CUDA else [])
    gc.collect()
    before = {n: _live(n) for n in names}
    yield
    gc.collect()
    after = {n: _live(n) for n in names}
    assert after == before, f"leaked: before={before} after={after}"
