"""Fixtures for the kvcache tests: caches that are always closed before the leak check runs.

glake.kvcache needs torch (not a test extra): without it these tests are not collected.
"""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("torch") is None:
    collect_ignore_glob = ["test_*.py"]


def _maker(backend):
    from glake.kvcache import KVCache
    from kv_util import LLAMA_LIKE

    made = []

    def make(**kw):
        args = dict(LLAMA_LIKE, max_seqs=4, max_seq_len=128, lookahead_tokens=0)
        args.update(kw)
        kv = KVCache(backend=backend, **args)
        made.append(kv)
        return kv

    return make, made


@pytest.fixture
def make_kv(backend):
    """``make_kv(**overrides)``: a KVCache on the test's backend (LLAMA_LIKE shape, 4 slots of 128
    tokens, no mapper thread by default), closed at teardown, before the leak check."""
    make, made = _maker(backend)
    yield make
    for kv in made:
        kv.close()


@pytest.fixture
def make_host_kv():
    """Like make_kv, on the host backend only (for tests whose subject is not the backend)."""
    make, made = _maker("host")
    yield make
    for kv in made:
        kv.close()
