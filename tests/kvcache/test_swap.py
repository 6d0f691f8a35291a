"""swap_out / swap_in: bytes round-trip through host memory; chunks go back to the pool meanwhile."""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: E402,F401  (a test extra: a missing torch is an error, not a skip)

import glake  # noqa: E402
from kv_util import CHUNK, ODD_ROW, get, put, ramp, make_kv_fixture  # noqa: F401,E402  (fixtures)


def test_swap_round_trips_bytes_and_frees_chunks(make_kv, backend):
    kv = make_kv()
    s = kv.allocate()
    kv.reserve(s, 70)
    vals = ramp(3, 0, 70)
    put(kv, s, 0, vals)
    h = kv.swap_out(s)
    assert h.length == 70 and h.nbytes == 70 * kv.layout.row_bytes and not h.consumed
    assert h.buffer.device.type == "cpu" and h.buffer.is_pinned() == (backend == "cuda")
    st = kv.stats()
    assert st["chunks_physical"] == 0 and st["pool_cached_chunks"] == 5 and st["slots_free"] == 4
    assert st["bytes_swapped_out"] == h.nbytes
    with pytest.raises(glake.InvalidArgumentError):
        kv.reserve(s, 1)  # the slot no longer holds the sequence
    other = kv.allocate()
    kv.reserve(other, 64)  # served from the pool's cache
    put(kv, other, 0, ramp(-900, 0, 64))
    s2 = kv.swap_in(h)
    assert s2 != other and h.consumed and kv.reserved(s2) == 70 and kv.capacity(s2) >= 70
    assert np.array_equal(get(kv, s2, 0, 70), vals)
    assert np.array_equal(get(kv, other, 0, 64), ramp(-900, 0, 64))
    with pytest.raises(glake.InvalidArgumentError, match="already swapped in"):
        kv.swap_in(h)
    kv.check_invariants()


def test_swap_of_a_fork_brings_back_private_chunks(make_kv):
    kv = make_kv(**ODD_ROW, max_seq_len=400)
    src = kv.allocate()
    kv.reserve(src, 250)
    vals = ramp(1, 0, 250)
    put(kv, src, 0, vals)
    f = kv.fork(src, 200)
    kv.reserve(f, 220)
    put(kv, f, 200, ramp(5000, 200, 220))
    h = kv.swap_out(f)
    assert kv.stats()["chunks_shared"] == 0
    f2 = kv.swap_in(h)
    expect = np.concatenate([vals[:200], ramp(5000, 200, 220)])
    assert np.array_equal(get(kv, f2, 0, 220), expect)
    assert not set(kv.chunk_ids(f2)) & set(kv.chunk_ids(src))
    assert np.array_equal(get(kv, src, 0, 250), vals)
    kv.check_invariants()


def test_partial_swap_out(make_kv):
    kv = make_kv()
    s = kv.allocate()
    kv.reserve(s, 40)
    put(kv, s, 0, ramp(0, 0, 40))
    h = kv.swap_out(s, 20)
    assert h.length == 20
    s2 = kv.swap_in(h)
    assert kv.reserved(s2) == 20 and np.array_equal(get(kv, s2, 0, 20), ramp(0, 0, 20))


def test_swap_in_out_of_budget_keeps_the_handle(make_kv):
    kv = make_kv(memory_budget=4 * CHUNK)
    s = kv.allocate()
    kv.reserve(s, 48)
    put(kv, s, 0, ramp(8, 0, 48))
    h = kv.swap_out(s)
    hog = kv.allocate()
    kv.reserve(hog, 40)  # 3 of the 4 chunks
    before = kv.stats()
    with pytest.raises(glake.OutOfMemoryError, match="48 tokens"):
        kv.swap_in(h)
    after = kv.stats()
    assert not h.consumed and after["slots_active"] == before["slots_active"]
    assert after["chunks_physical"] == before["chunks_physical"]
    kv.check_invariants()
    kv.release(hog)
    s2 = kv.swap_in(h)  # the released slot's chunks are reclaimed
    assert np.array_equal(get(kv, s2, 0, 48), ramp(8, 0, 48))


def test_swap_out_of_nothing_and_foreign_handles(make_kv):
    kv = make_kv()
    other = make_kv()
    s = kv.allocate()
    h = kv.swap_out(s)
    assert h.length == 0 and h.nbytes == 0
    with pytest.raises(glake.InvalidArgumentError, match="does not come from this KVCache"):
        other.swap_in(h)
    s2 = kv.swap_in(h)
    assert kv.reserved(s2) == 0
    h2 = kv.swap_out(s2)
    h2.discard()
    with pytest.raises(glake.InvalidArgumentError):
        kv.swap_in(h2)
