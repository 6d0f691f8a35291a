"""Bucketing of the decode graphs, and the engine's refusal of graphs where they cannot run (CPU)."""

from __future__ import annotations

import pytest

from glake.errors import InvalidArgumentError
from glake.serve.cuda_graphs import bucket_for, default_buckets
from glake.serve.engine import LLMEngine
from tests.serve.serve_util import tiny_llama


def test_default_buckets():
    assert default_buckets(1) == [1]
    assert default_buckets(4) == [1, 2, 4]
    assert default_buckets(16) == [1, 2, 4, 8, 16]
    assert default_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert default_buckets(256)[-3:] == [224, 240, 256] and len(default_buckets(256)) == 20


def test_bucket_for():
    b = default_buckets(40)
    assert [bucket_for(b, n) for n in (1, 3, 5, 9, 17, 33, 40)] == [1, 4, 8, 16, 32, 40, 40]
    assert bucket_for(b, 41) is None


def test_graphs_need_the_decode_kernel():
    with pytest.raises(InvalidArgumentError, match="cuda_graphs=True needs"):
        LLMEngine(tiny_llama(0), device="cpu", cuda_graphs=True)
    with LLMEngine(tiny_llama(0), device="cpu") as engine:
        assert engine.runner.graphs is None and engine.kv.layout.max_seqs == engine.scheduler.num_slots
