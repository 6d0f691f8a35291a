"""The scheduler's step API (reserve_batch, can_reserve, free_tokens, lengths) and release fences
that are still pending while the engine allocates and releases (host events held incomplete)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import torch  # noqa: F401  (a test extra: a missing torch is an error, not a skip)

import glake
from glake import _C
from kv_util import CHUNK, get, put, ramp, make_host_kv_fixture  # noqa: F401  (fixtures)


def state(kv, live):
    """Every slot's chunks, and the live ones' capacity and reserved length."""
    return [(kv.chunk_ids(i), kv.capacity(i), kv.reserved(i)) if i in live else kv.chunk_ids(i)
            for i in range(kv.layout.max_seqs)]


def test_reserve_batch_backs_every_slot_and_publishes_lengths(make_host_kv):
    kv = make_host_kv(max_seqs=4, memory_budget=16 * CHUNK)
    slots = [kv.allocate() for _ in range(3)]
    kv.reserve_batch(np.array(slots), np.array([10, 40, 17]))
    assert [kv.reserved(s) for s in slots] == [10, 40, 17]
    assert [kv.capacity(s) for s in slots] == [16, 48, 32]
    assert kv.lengths.dtype == torch.int32 and kv.lengths.tolist() == [10, 40, 17, 0]
    kv.reserve_batch(slots, [11, 41, 18])  # lists too; the already-backed case
    assert kv.lengths.tolist() == [11, 41, 18, 0]
    kv.release(slots[1])
    kv.publish_lengths()
    assert kv.lengths.tolist() == [11, 0, 18, 0]
    kv.reserve_batch([slots[0], slots[0]], [5, 30])  # a slot twice: the longest wins, never shrinks
    assert kv.reserved(slots[0]) == 30 and kv.lengths[slots[0]] == 30
    put(kv, slots[0], 0, ramp(1, 0, 30))
    assert np.array_equal(get(kv, slots[0], 0, 30), ramp(1, 0, 30))
    kv.check_invariants()


def test_reserve_batch_is_all_or_nothing(make_host_kv):
    kv = make_host_kv(max_seqs=4, memory_budget=6 * CHUNK)
    a, b, c = kv.allocate(), kv.allocate(), kv.allocate()
    kv.reserve_batch([a, b, c], [16, 16, 16])  # 3 chunks
    kv.reserve(a, 20)                          # a: 2 chunks, 2 left
    live = {a, b, c}
    before = state(kv, live), kv.lengths.tolist(), kv.stats()["chunks_physical"]
    with pytest.raises(glake.OutOfMemoryError, match="reserve_batch of 3 sequences"):
        kv.reserve_batch([a, b, c], [21, 40, 40])  # a fits (fast path), b and c need 4 chunks: 2 left
    assert (state(kv, live), kv.lengths.tolist(), kv.stats()["chunks_physical"]) == before
    with pytest.raises(glake.InvalidArgumentError):
        kv.reserve_batch([a, 3], [25, 1])  # slot 3 holds no sequence: a's fast reservation is undone
    assert state(kv, live) == before[0] and kv.reserved(a) == 20
    with pytest.raises(glake.InvalidArgumentError, match="ints"):
        kv.reserve_batch([a], [2.5])
    kv.reserve_batch([a, b, c], [21, 32, 17])  # 1 + 1 chunks: exactly what is left
    assert [kv.reserved(s) for s in (a, b, c)] == [21, 32, 17] and kv.num_free_chunks() == 0
    kv.check_invariants()


@pytest.mark.parametrize("budget", [5, 9])
def test_can_reserve_and_free_tokens_agree_with_reserve(make_host_kv, budget):
    kv = make_host_kv(max_seqs=4, max_seq_len=128, memory_budget=budget * CHUNK)
    a, b = kv.allocate(), kv.allocate()
    kv.reserve(a, 40)
    kv.release(a)          # 3 chunks kept by a released slot: reclaimable
    s = kv.allocate()      # the most recently released slot
    assert s == a and kv.capacity(s) == 48
    fresh = b              # no chunk at all
    free = kv.free_tokens()
    assert free == kv.num_free_chunks() * 16
    for n in range(0, 129, 7):
        ok = kv.can_reserve(fresh, n)
        assert ok == (n <= free), n
    n_ok = min(free, 128)
    assert kv.can_reserve(fresh, n_ok)
    if n_ok < 128:
        assert not kv.can_reserve(fresh, n_ok + 1)
        with pytest.raises(glake.OutOfMemoryError):
            kv.reserve(fresh, n_ok + 1)
    kv.reserve(fresh, n_ok)
    assert kv.capacity(fresh) >= n_ok
    kv.check_invariants()


def test_a_pending_fence_defers_unmapping_while_the_engine_goes_on(make_host_kv):
    """A release fence not yet complete (host events held): released chunks are not reclaimed,
    allocate and release still work, a reservation that needs those chunks waits for the fence
    without the lock, and the chunks are taken once it completes."""
    kv = make_host_kv(max_seqs=4, memory_budget=4 * CHUNK)
    a = kv.allocate()
    kv.reserve(a, 64)                 # the whole budget
    put(kv, a, 0, ramp(7, 0, 64))
    _C.host_hold_events(True)
    try:
        kv.release(a)                 # "a kernel still reads a's chunks"
        assert _C.host_held_events() == 1 and kv.stats()["fences_pending"] == 1
        b = kv.allocate()             # a has no shared chunk: handed out again at once
        assert b == a and kv.capacity(b) == 64 and kv.stats()["fences_pending"] == 1
        kv.release(b)                 # a second fence on the same slot, also held
        c = kv.allocate()
        assert kv.trim() == 0 and kv.stats()["chunks_physical"] == 4  # trim leaves fenced chunks
        d = kv.allocate()
        assert d != c
        assert kv.can_reserve(d, 16)  # obtainable once the fence completes
        kv.release(c)
        assert kv.stats()["unmaps"] == 0
        done = threading.Event()

        def reserve():
            kv.reserve(d, 16)         # needs one of c's chunks: waits for the fences, unlocked
            done.set()

        t = threading.Thread(target=reserve)
        t.start()
        assert not done.wait(0.3)     # still waiting: the fences are pending
        assert kv.num_free_chunks() == 4  # ... and the lock is free meanwhile
        assert _C.host_complete_events() == 3  # a, b and c were released
        t.join(10)
        assert done.is_set() and kv.capacity(d) == 16
        st = kv.stats()
        assert st["fence_waits"] >= 1 and st["reclaimed_released"] == 1 and st["fences_pending"] == 0
    finally:
        _C.host_hold_events(False)
        _C.host_complete_events()
    kv.check_invariants()


def test_the_mapper_defers_trimming_behind_a_pending_fence(make_host_kv):
    kv = make_host_kv(max_seqs=2, lookahead_tokens=2)
    s = kv.allocate()
    kv.reserve(s, 128)                # 8 chunks
    _C.host_hold_events(True)
    try:
        kv.release(s)
        s2 = kv.allocate()
        assert s2 == s
        kv.reserve(s2, 10)            # the mapper would trim 7 chunks: not before the fence completes
        assert kv.wait_mapper()
        assert len(kv.chunk_ids(s2)) == 8 and kv.stats()["trimmed"] == 0
        _C.host_complete_events()
        assert kv.wait_mapper()
        assert kv.wait_mapper()       # the retry ran after the fence completed
        assert len(kv.chunk_ids(s2)) == 1 and kv.stats()["trimmed"] == 7
    finally:
        _C.host_hold_events(False)
        _C.host_complete_events()
    kv.check_invariants()
