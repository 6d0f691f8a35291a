"""KVCache on every backend: growth, views, release/reuse, budget, bad arguments, close."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import torch  # noqa: E402,F401  (a test extra: a missing torch is an error, not a skip)
import torch  # noqa: E402

import glake  # noqa: E402
from glake import core  # noqa: E402
from glake.kvcache import KVCache  # noqa: E402
from kv_util import CHUNK, LLAMA_LIKE, ODD_ROW, get, put, ramp, make_kv_fixture  # noqa: F401,E402  (fixtures)


def test_writes_land_in_the_slot_chunk_that_backs_them(make_kv, backend):
    kv = make_kv(max_seqs=3)
    lay = kv.layout
    assert kv.tokens_per_chunk == 16
    a, b = kv.allocate(), kv.allocate()
    kv.reserve(b, 40)  # 3 chunks
    assert kv.capacity(b) == 48 and kv.reserved(b) == 40
    ids = kv.chunk_ids(b)
    assert len(ids) == 3 and None not in ids and kv.chunk_ids(a) == []
    marker = torch.full((lay.num_kv_heads, lay.head_dim), 3.5, device=kv.torch_device)
    kv.v_cache(1)[b, 33] = marker  # token 33 -> chunk 2 of slot b
    off = lay.token_offset(b, 33) + lay.kv_offset(1, 1)
    raw = core.read(kv.base_ptr + off, 4, backend=backend)
    assert np.frombuffer(raw, np.float32)[0] == 3.5
    rng = kv.range
    assert rng.chunk_at(off).id == ids[2]
    assert rng.chunk_at(lay.slot_offset(b)).id == ids[0]
    assert rng.chunk_at(lay.slot_offset(a)) is None  # nothing mapped for the empty slot
    kv.check_invariants()


def test_data_survives_growth_across_chunk_boundaries(make_kv):
    kv = make_kv()
    s = kv.allocate()
    vals = ramp(1000, 0, 128)
    for t in range(128):  # one token per "decode step", crossing 7 chunk boundaries
        kv.reserve(s, t + 1)
        put(kv, s, t, vals[t:t + 1])
        if t in (15, 16, 17, 63, 64, 127):
            assert np.array_equal(get(kv, s, 0, t + 1), vals[:t + 1])
    assert kv.capacity(s) == 128 and len(kv.chunk_ids(s)) == 8
    st = kv.stats()
    assert st["maps_sync"] == 8 and st["sync_waits"] == 8 and st["chunks_physical"] == 8
    assert st["tokens_reserved"] == 128 and st["utilisation"] == 1.0
    kv.check_invariants()


def test_odd_rows_straddle_chunks_and_keep_their_bytes(make_kv):
    kv = make_kv(**ODD_ROW, max_seq_len=400)
    s = kv.allocate()
    kv.reserve(s, 91)
    assert kv.capacity(s) == 91 and len(kv.chunk_ids(s)) == 1
    kv.reserve(s, 92)  # token 91 straddles chunks 0 and 1
    assert len(kv.chunk_ids(s)) == 2 and kv.capacity(s) == 182
    vals = ramp(5, 0, 182)
    put(kv, s, 0, vals)
    kv.reserve(s, 400)
    assert np.array_equal(get(kv, s, 0, 182), vals)
    lay = kv.layout
    rng = kv.range
    start, end = lay.token_offset(s, 91), lay.token_offset(s, 92) - 1
    assert rng.chunk_at(start).id != rng.chunk_at(end).id
    kv.check_invariants()


def test_reserve_within_capacity_changes_nothing(make_kv, backend):
    kv = make_kv()
    s = kv.allocate()
    kv.reserve(s, 20)
    before_core = core.stats(backend)["calls.map"]
    before = kv.stats()
    for n in (0, 5, 20, 31, 32, 17):
        kv.reserve(s, n)
    after = kv.stats()
    assert core.stats(backend)["calls.map"] == before_core
    assert after["maps"] == before["maps"] and after["sync_waits"] == before["sync_waits"]
    assert kv.reserved(s) == 32 and kv.capacity(s) == 32


def test_release_then_allocate_reuses_the_chunks_without_mapping(make_kv, backend):
    kv = make_kv()
    s = kv.allocate()
    kv.reserve(s, 50)
    ids = kv.chunk_ids(s)
    kv.release(s)
    st = kv.stats()
    assert st["slots_released"] == 1 and st["chunks_released"] == 4 and st["chunks_reclaimable"] == 4
    maps = core.stats(backend)["calls.map"]
    s2 = kv.allocate()
    assert s2 == s and kv.chunk_ids(s2) == ids and kv.capacity(s2) == 64
    kv.reserve(s2, 64)
    assert core.stats(backend)["calls.map"] == maps
    assert kv.reserved(s2) == 64
    kv.check_invariants()


def test_released_chunks_are_reclaimed_when_the_budget_needs_them(make_kv):
    kv = make_kv(memory_budget=4 * CHUNK)
    a, b = kv.allocate(), kv.allocate()
    kv.reserve(a, 64)  # the whole budget
    assert kv.num_free_chunks() == 0
    with pytest.raises(glake.OutOfMemoryError):
        kv.reserve(b, 1)
    kv.release(a)
    assert kv.num_free_chunks() == 4
    kv.reserve(b, 40)  # 3 chunks, taken from the released slot a, highest index first
    st = kv.stats()
    assert st["reclaimed_released"] == 3 and st["chunks_physical"] == 4
    assert kv.chunk_ids(a)[0] is not None and len(kv.chunk_ids(a)) == 1
    assert kv.capacity(b) == 48
    kv.check_invariants()


def test_budget_exhaustion_names_budget_and_usage_and_changes_nothing(make_kv):
    kv = make_kv(memory_budget=5 * CHUNK + 12345)  # rounded down to 5 chunks
    assert kv.memory_budget == 5 * CHUNK
    a, b = kv.allocate(), kv.allocate()
    kv.reserve(a, 48)
    kv.reserve(b, 20)
    before = (kv.chunk_ids(a), kv.chunk_ids(b), kv.capacity(a), kv.capacity(b), kv.stats())
    with pytest.raises(glake.OutOfMemoryError) as e:
        kv.reserve(a, 70)  # needs 2 more chunks, 0 free
    msg = str(e.value)
    assert "memory budget 10485760 B (5 chunks" in msg and "5 physical chunks" in msg and "70 tokens of slot" in msg
    assert isinstance(e.value, MemoryError)
    after = (kv.chunk_ids(a), kv.chunk_ids(b), kv.capacity(a), kv.capacity(b), kv.stats())
    assert after == before
    assert kv.reserved(a) == 48
    kv.check_invariants()
    kv.release(b)
    kv.reserve(a, 80)  # 5 chunks: exactly the budget, the 2 new ones reclaimed from b
    assert kv.num_free_chunks() == 0 and kv.stats()["reclaimed_released"] == 2


def test_running_out_of_slots(make_kv):
    kv = make_kv(max_seqs=2)
    kv.allocate(), kv.allocate()
    with pytest.raises(glake.OutOfMemoryError, match="all 2 slots"):
        kv.allocate()


@pytest.mark.parametrize("call", [
    lambda kv, s: kv.reserve(s + 1, 1),            # not allocated
    lambda kv, s: kv.reserve(-1, 1),
    lambda kv, s: kv.reserve(99, 1),
    lambda kv, s: kv.reserve(s, -1),
    lambda kv, s: kv.reserve(s, 129),            # > max_seq_len
    lambda kv, s: kv.reserve(s, 1.5),
    lambda kv, s: kv.reserve("0", 1),
    lambda kv, s: kv.capacity(s + 1),
    lambda kv, s: kv.release(s + 1),
    lambda kv, s: kv.k_cache(2),
    lambda kv, s: kv.k_cache(-1),
    lambda kv, s: kv.v_cache(2),
    lambda kv, s: kv.v_cache("x"),
    lambda kv, s: kv.fork(s, 11),                # beyond the reserved length
    lambda kv, s: kv.fork(s + 1, 1),
    lambda kv, s: kv.swap_out(s, 11),
    lambda kv, s: kv.swap_in(object()),
], ids=["unallocated", "negative-slot", "slot-too-big", "negative-length", "too-long", "float-length", "str-slot",
        "capacity-unallocated", "release-unallocated", "layer-too-big", "negative-layer", "v-layer", "str-layer",
        "fork-too-long", "fork-unallocated", "swap-too-long", "swap-foreign"])
def test_bad_arguments_are_invalid_argument_errors(make_kv, call):
    kv = make_kv()
    s = kv.allocate()
    kv.reserve(s, 10)
    before = kv.stats()
    with pytest.raises(glake.InvalidArgumentError):
        call(kv, s)
    assert kv.stats() == before
    kv.check_invariants()


def test_numpy_integers_are_accepted(make_kv):
    kv = make_kv()
    s = kv.allocate()
    kv.reserve(np.int64(s), np.int64(17))
    assert kv.capacity(np.int32(s)) == 32
    assert kv.k_cache(np.int64(1)) is kv.k_cache(1)


def test_double_release_is_refused(make_kv):
    kv = make_kv()
    s = kv.allocate()
    kv.release(s)
    with pytest.raises(glake.InvalidArgumentError, match="no live sequence"):
        kv.release(s)


@pytest.mark.parametrize("kw", [dict(num_layers=0), dict(dtype="int7"), dict(memory_budget=CHUNK - 1),
                                dict(max_seq_len=-4), dict(lookahead_tokens=-1), dict(memory_budget=0)])
def test_bad_construction_is_refused(kw, backend):
    args = dict(LLAMA_LIKE, max_seqs=2, max_seq_len=16)
    args.update(kw)
    with pytest.raises(glake.InvalidArgumentError):
        KVCache(backend=backend, **args)


def test_views_are_fixed_strided_tensors(make_kv):
    kv = make_kv()
    k0 = kv.k_cache(0)
    assert kv.k_cache(0) is k0  # the same object every call
    lay = kv.layout
    assert k0.shape == (4, 128, 16, 512) and k0.dtype == torch.float32 and k0.device == kv.torch_device
    assert k0.stride() == (lay.slot_bytes // 4, lay.row_bytes // 4, 512, 1)
    assert k0.data_ptr() == kv.base_ptr
    assert kv.v_cache(1).data_ptr() == kv.base_ptr + lay.kv_offset(1, 1)


def test_stats_keys_and_gauges(make_kv):
    kv = make_kv(memory_budget=8 * CHUNK)
    s = kv.allocate()
    kv.reserve(s, 20)
    st = kv.stats()
    for key in ("chunks_physical", "chunks_mapped", "chunks_shared", "chunks_free", "maps", "sync_waits", "wait_ns",
                "utilisation", "tokens_mapped", "slots_active"):
        assert key in st
    assert st["chunks_free"] == 6 == kv.num_free_chunks() and st["chunks_budget"] == 8
    assert st["tokens_mapped"] == 32 and st["utilisation"] == pytest.approx(20 / 32)
    assert st["wait_ns"] > 0


def test_close_frees_everything_and_is_idempotent(backend):
    base = core.stats(backend)
    kv = KVCache(backend=backend, **LLAMA_LIKE, max_seqs=2, max_seq_len=64)
    s = kv.allocate()
    kv.reserve(s, 40)
    f = kv.fork(s, 20)
    kv.release(s)
    assert core.stats(backend)["chunks_live"] > base["chunks_live"]
    kv.close()
    kv.close()
    assert kv.closed
    gc.collect()
    now = core.stats(backend)
    for key in ("chunks_live", "ranges_live", "mapped_bytes.current"):
        assert now[key] == base[key], key
    with pytest.raises(glake.InvalidArgumentError, match="closed"):
        kv.reserve(f, 1)
    with pytest.raises(glake.InvalidArgumentError, match="closed"):
        kv.allocate()
    with pytest.raises(glake.InvalidArgumentError, match="closed"):
        kv.k_cache(0)


def test_context_manager_closes(backend):
    with KVCache(backend=backend, **LLAMA_LIKE, max_seqs=2, max_seq_len=64, lookahead_tokens=4) as kv:
        kv.reserve(kv.allocate(), 33)
    assert kv.closed and not kv.mapper_alive


def test_trim_returns_released_and_cached_chunks(make_kv, backend):
    kv = make_kv(memory_budget=8 * CHUNK)
    a = kv.allocate()
    kv.reserve(a, 64)
    kv.release(a)
    live = core.stats(backend)["chunks_live"]
    freed = kv.trim()
    assert freed == 4 * CHUNK
    assert core.stats(backend)["chunks_live"] == live - 4
    st = kv.stats()
    assert st["chunks_physical"] == 0 and st["slots_free"] == 4 and st["pool_cached_chunks"] == 0
    kv.check_invariants()
