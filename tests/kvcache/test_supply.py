"""Where chunks come from: budget, released slots (deferred reclamation), never a chunk still shared."""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: E402,F401  (a test extra: a missing torch is an error, not a skip)

import glake  # noqa: E402
from glake import core  # noqa: E402
from kv_util import CHUNK, get, put, ramp, make_kv_fixture  # noqa: F401,E402  (fixtures)


def test_shared_chunks_of_a_released_fork_are_not_reclaimable(make_kv):
    kv = make_kv(memory_budget=4 * CHUNK)
    src, b = kv.allocate(), kv.allocate()
    kv.reserve(src, 32)
    vals = ramp(1, 0, 32)
    put(kv, src, 0, vals)
    f = kv.fork(src, 32)  # shares both chunks, no tail
    kv.release(f)         # f keeps its mappings, but they are src's chunks too
    assert kv.num_free_chunks() == 2 and kv.stats()["chunks_reclaimable"] == 0
    with pytest.raises(glake.OutOfMemoryError, match="3 more chunk"):
        kv.reserve(b, 48)
    kv.reserve(b, 32)
    put(kv, b, 0, ramp(-1000, 0, 32))
    assert np.array_equal(get(kv, src, 0, 32), vals)
    kv.check_invariants()


def test_reclaim_takes_the_least_recently_released_slot_first_from_its_end(make_kv):
    kv = make_kv(max_seqs=4, memory_budget=6 * CHUNK)
    a, b, c = kv.allocate(), kv.allocate(), kv.allocate()
    kv.reserve(a, 48)
    kv.reserve(b, 48)
    ids_a, ids_b = kv.chunk_ids(a), kv.chunk_ids(b)
    kv.release(a)  # released first
    kv.release(b)
    kv.reserve(c, 64)  # 4 chunks: all 3 of a (from its last), then b's last
    assert kv.chunk_ids(a) == []
    assert kv.chunk_ids(b) == ids_b[:2]
    assert kv.chunk_ids(c) == [ids_a[2], ids_a[1], ids_a[0], ids_b[2]]
    st = kv.stats()
    assert st["reclaimed_released"] == 4 and st["slots_free"] == 2 and st["slots_released"] == 1
    kv.check_invariants()


def test_released_chunks_never_cause_a_false_out_of_memory(make_kv):
    kv = make_kv(max_seqs=4, memory_budget=8 * CHUNK)
    slots = [kv.allocate() for _ in range(4)]
    for s in slots:
        kv.reserve(s, 32)
    for s in slots[:3]:
        kv.release(s)
    assert kv.num_free_chunks() == 6
    kv.reserve(slots[3], 128)  # 8 chunks: its 2 and all 6 kept by released slots
    assert kv.capacity(slots[3]) == 128
    kv.check_invariants()


def test_allocate_prefers_the_most_recently_released_slot(make_kv):
    kv = make_kv(max_seqs=4)
    a, b = kv.allocate(), kv.allocate()
    kv.reserve(a, 10)
    kv.reserve(b, 40)
    kv.release(b)
    kv.release(a)
    assert kv.allocate() == a and kv.allocate() == b  # b still has its 3 chunks
    assert kv.capacity(b) == 48


def test_without_a_budget_the_device_is_the_limit(make_kv, backend):
    kv = make_kv(memory_budget=None)
    assert kv.memory_budget is None and kv.stats()["chunks_budget"] is None
    free = core.mem_info(backend)[0] // CHUNK
    assert abs(kv.num_free_chunks() - free) <= max(64, free // 10)
    s = kv.allocate()
    kv.reserve(s, 128)
    assert kv.capacity(s) == 128
