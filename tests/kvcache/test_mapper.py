"""The background mapper: lookahead keeps reserve() off the driver, errors surface, it stops."""

from __future__ import annotations

import contextlib
import gc
import glob
import random
import threading

import numpy as np
import pytest

import torch  # noqa: E402,F401  (a test extra: a missing torch is an error, not a skip)

import glake  # noqa: E402
from glake import core  # noqa: E402
from glake.kvcache import KVCache  # noqa: E402
from kv_util import CHUNK, LLAMA_LIKE, get, put, ramp, make_kv_fixture  # noqa: F401,E402  (fixtures)


def test_lookahead_maps_before_need_so_decode_never_waits(make_kv):
    kv = make_kv(lookahead_tokens=4, max_seq_len=128)
    s = kv.allocate()  # queues the slot: the mapper backs its first tokens right away
    assert kv.wait_mapper()
    assert kv.capacity(s) == 16
    vals = ramp(0, 0, 128)
    for t in range(128):
        kv.reserve(s, t + 1)      # the decode step
        put(kv, s, t, vals[t:t + 1])
        assert kv.wait_mapper()   # "the step took long enough for the mapper"
    st = kv.stats()
    assert st["sync_waits"] == 0 and st["maps_sync"] == 0 and st["maps_background"] == 8
    assert st["mapper_passes"] >= 8 and st["mapper_errors"] == 0
    assert np.array_equal(get(kv, s, 0, 128), vals)
    kv.check_invariants()


def test_lookahead_stays_within_lookahead(make_kv):
    kv = make_kv(lookahead_tokens=4)
    s = kv.allocate()
    kv.wait_mapper()
    kv.reserve(s, 11)  # 11 + 4 <= 16: nothing queued
    kv.wait_mapper()
    assert len(kv.chunk_ids(s)) == 1
    kv.reserve(s, 13)  # 13 + 4 > 16: the next chunk
    kv.wait_mapper()
    assert len(kv.chunk_ids(s)) == 2 and kv.capacity(s) == 32


@pytest.mark.parametrize("lookahead", [0, 4])
def test_fast_path_takes_no_lock_and_calls_no_driver(make_kv, backend, lookahead):
    kv = make_kv(lookahead_tokens=lookahead)
    s = kv.allocate()
    kv.reserve(s, 40)
    kv.wait_mapper()
    maps = core.stats(backend)["calls.map"]
    locked = kv._m.locked_engine_calls  # engine calls that took the manager's lock (C++ counter)
    for n in range(0, 44 if lookahead else 49):  # below the watermark with a mapper, else up to capacity
        kv.reserve(s, n)
    kv.reserve_batch([s], [43 if lookahead else 48])
    assert kv._m.locked_engine_calls == locked, "the reserve fast path took the lock"
    assert core.stats(backend)["calls.map"] == maps
    kv.reserve(s, 100)  # beyond the capacity: the locked path (the counter can move)
    assert kv._m.locked_engine_calls > locked


def test_reserve_batch_wakes_the_mapper_once_for_the_whole_batch(make_kv):
    """The slots a batch takes past their watermark reach the mapper in one request, after the
    lengths are published: one pass serves them all (one wake-up per slot raced the publish's copy
    with the mapper's driver calls)."""
    kv = make_kv(lookahead_tokens=4, max_seqs=8)
    slots = [kv.allocate() for _ in range(8)]
    kv.reserve_batch(slots, [11] * 8)  # 11 + 4 <= 16: within the first chunk, nothing queued
    assert kv.wait_mapper()
    before = kv.stats()
    kv.reserve_batch(slots, [13] * 8)  # every slot past its watermark
    assert kv.stats()["mapper_wakeups"] == before["mapper_wakeups"] + 1
    assert kv.lengths[slots].tolist() == [13] * 8  # published before the call returned
    assert kv.wait_mapper()
    assert kv.stats()["mapper_passes"] == before["mapper_passes"] + 1
    assert all(kv.capacity(s) == 32 for s in slots)
    kv.check_invariants()


def test_a_mapper_error_surfaces_on_the_next_reserve_once(make_kv):
    kv = make_kv(lookahead_tokens=4)
    s = kv.allocate()
    kv.wait_mapper()
    kv._m.test_fail_background_maps(True)  # the mapper thread's next maps throw (a C++ test hook)
    kv.reserve(s, 14)  # queues the next chunk; the mapper fails
    kv.wait_mapper()
    with pytest.raises(glake.GlakeError, match="background mapper failed: GlakeError: .*INJECTED") as e:
        kv.reserve(s, 14)
    assert isinstance(e.value.__cause__, glake.GlakeError)
    kv.reserve(s, 15)  # raised once; the cache goes on
    kv._m.test_fail_background_maps(False)
    kv.reserve(s, 20)  # beyond capacity: the synchronous path maps
    assert kv.capacity(s) >= 20 and kv.stats()["mapper_errors"] == 1
    kv.check_invariants()


def test_mapper_under_budget_pressure_gives_way_to_synchronous_reservations(make_kv):
    kv = make_kv(lookahead_tokens=8, memory_budget=4 * CHUNK)
    a, b = kv.allocate(), kv.allocate()
    kv.wait_mapper()  # 1 chunk each
    kv.reserve(a, 30)
    kv.wait_mapper()  # a: 30 + 8 -> 3 chunks (the third is lookahead)
    assert len(kv.chunk_ids(a)) == 3 and len(kv.chunk_ids(b)) == 1
    kv.reserve(b, 20)  # needs a second chunk: the budget is full, a's lookahead chunk is reclaimed
    st = kv.stats()
    assert st["reclaimed_lookahead"] == 1 and kv.capacity(a) == 32 and kv.capacity(b) == 32
    kv.wait_mapper()
    kv.check_invariants()
    kv.release(b)  # frees chunks: the starved slot a gets its lookahead back
    kv.wait_mapper()
    assert kv.capacity(a) >= 48
    kv.check_invariants()


def mapper_threads() -> int:
    """Threads of this process named glake-kv-mapper (the C++ mapper names itself)."""
    n = 0
    for comm in glob.glob("/proc/self/task/*/comm"):
        with contextlib.suppress(FileNotFoundError), open(comm) as f:  # a thread may end meanwhile
            n += f.read().strip() == "glake-kv-mapper"
    return n


def test_stop_and_collection(backend):
    base = core.stats(backend)
    threads = mapper_threads()
    kv = KVCache(backend=backend, **LLAMA_LIKE, max_seqs=2, max_seq_len=64, lookahead_tokens=4)
    kv.reserve(kv.allocate(), 20)
    assert kv.mapper_alive and mapper_threads() == threads + 1
    del kv  # forgotten without close(): collection stops and joins the thread, the range frees itself
    gc.collect()
    assert mapper_threads() == threads
    now = core.stats(backend)
    assert now["chunks_live"] == base["chunks_live"] and now["ranges_live"] == base["ranges_live"]


def test_engine_and_mapper_concurrently_keep_data_and_invariants(make_kv):
    """Many sequences growing, ending and forking while the mapper works (no timing assumed)."""
    kv = make_kv(max_seqs=6, max_seq_len=96, lookahead_tokens=3, memory_budget=20 * CHUNK)
    rnd = random.Random(7)
    live = {}  # slot -> values
    base = 0
    for step in range(600):
        if len(live) < 6 and rnd.random() < 0.1:
            s = kv.allocate()
            live[s] = np.zeros(0, np.float32)
        for s in list(live):
            vals = live[s]
            n = len(vals)
            if n == 96 or rnd.random() < 0.02:
                kv.release(s)
                del live[s]
                continue
            try:
                kv.reserve(s, n + 1)
            except glake.OutOfMemoryError:
                kv.release(s)
                del live[s]
                continue
            base += 1
            put(kv, s, n, [float(base)])
            live[s] = np.append(vals, np.float32(base))
        if live and len(live) < 6 and rnd.random() < 0.05:
            src = rnd.choice(list(live))
            p = rnd.randint(0, len(live[src]))
            try:
                f = kv.fork(src, p)
                live[f] = live[src][:p].copy()
            except glake.OutOfMemoryError:
                pass
        if step % 50 == 0:
            for s, vals in live.items():
                assert np.array_equal(get(kv, s, 0, len(vals)), vals)
    kv.wait_mapper()
    kv.check_invariants()
    for s, vals in live.items():
        assert np.array_equal(get(kv, s, 0, len(vals)), vals)
    st = kv.stats()
    assert st["maps_background"] > 0 and st["mapper_errors"] == 0


def test_a_reused_slot_serves_the_prompt_then_the_mapper_trims_its_surplus(make_kv, backend):
    kv = make_kv(lookahead_tokens=4)
    s = kv.allocate()
    kv.reserve(s, 120)  # 8 chunks
    kv.release(s)
    s2 = kv.allocate()
    assert s2 == s and kv.wait_mapper()
    assert len(kv.chunk_ids(s2)) == 8  # kept while the new sequence has reserved nothing
    maps = core.stats(backend)["calls.map"]
    kv.reserve(s2, 30)  # the prompt: served by the kept chunks
    assert kv.sync_waits == 1 and core.stats(backend)["calls.map"] == maps  # (the 1 is the first reserve(120))
    kv.wait_mapper()
    st = kv.stats()
    assert len(kv.chunk_ids(s2)) == 3 and st["trimmed"] == 5  # 30 + 4 tokens -> 3 chunks kept
    assert st["pool_cached_chunks"] == 5 and st["chunks_surplus"] == 1  # chunk 2 is lookahead
    assert st["utilisation"] == pytest.approx(30 / 48)
    bg = st["maps_background"]
    kv.reserve(s2, 46)  # 46 + 4 > 48: the mapper maps chunk 3 (from the pool's cache) ahead of need
    kv.wait_mapper()
    assert kv.stats()["maps_background"] == bg + 1 and kv.sync_waits == 1 and kv.capacity(s2) == 64
    kv.check_invariants()


def test_without_a_mapper_reused_slots_keep_their_chunks_until_needed(make_kv):
    kv = make_kv(lookahead_tokens=0, memory_budget=8 * CHUNK)
    a = kv.allocate()
    kv.reserve(a, 120)
    kv.release(a)
    a2, b = kv.allocate(), kv.allocate()
    kv.reserve(a2, 10)
    assert len(kv.chunk_ids(a2)) == 8 and kv.num_free_chunks() == 7  # 7 of a2's are past its reservation
    kv.reserve(b, 100)  # 7 chunks: all taken from a2's surplus
    assert kv.stats()["reclaimed_lookahead"] == 7 and len(kv.chunk_ids(a2)) == 1
    kv.check_invariants()


def test_prefetch_backs_a_prompt_in_the_background(make_kv, backend):
    kv = make_kv(lookahead_tokens=2)
    s = kv.allocate()
    kv.wait_mapper()
    kv.prefetch(s, 70)  # the prompt of a request admitted next step
    kv.wait_mapper()
    assert kv.capacity(s) == 80 and kv.reserved(s) == 0
    maps = core.stats(backend)["calls.map"]
    kv.reserve(s, 70)
    assert kv.sync_waits == 0 and core.stats(backend)["calls.map"] == maps
    kv.prefetch(s, 10)  # never shrinks anything
    kv.wait_mapper()
    assert kv.capacity(s) == 80
    with pytest.raises(glake.InvalidArgumentError):
        kv.prefetch(s + 1, 5)
    kv.check_invariants()


def test_prefetch_without_a_mapper_is_a_no_op(make_kv):
    kv = make_kv(lookahead_tokens=0)
    s = kv.allocate()
    kv.prefetch(s, 70)
    assert kv.capacity(s) == 0


def test_trimming_never_unmaps_what_reserve_just_guaranteed(make_kv):
    """The mapper trims a reused slot's surplus while the engine's lock-free reserve() jumps past
    the target the mapper saw: no chunk below a length reserve() has returned for may be unmapped.

    The interleaving is forced with C++ test hooks: the mapper is held inside its first trim unmap
    (the manager's lock held) while the engine reserves; a timer lets it go on. Every trim unmap
    is logged, and those after reserve() returned are checked.
    """
    kv = make_kv(lookahead_tokens=1, max_seqs=2, max_seq_len=128)
    lay = kv.layout
    s = kv.allocate()
    kv.reserve(s, 128)  # 8 chunks, kept when released
    kv.release(s)
    s = kv.allocate()   # the same slot, its 8 chunks still mapped
    kv.wait_mapper()
    kv._m.test_unmap_log(True)
    kv._m.test_hold_next_trim()
    kv.reserve(s, 1)    # the mapper trims past chunk 1 (1 + 1 tokens) ...
    assert kv._m.test_wait_trim_held(10)
    timer = threading.Timer(0.3, kv._m.test_release_trim)
    timer.start()
    try:
        kv.reserve(s, 100)  # ... while this reserve runs
        returned = len(kv._m.test_unmaps)
        put(kv, s, 99, [1.0])
    finally:
        kv._m.test_release_trim()
        timer.cancel()
    kv.wait_mapper()
    log = kv._m.test_unmaps
    guaranteed = lay.chunks_for(100)
    late = [j for slot, j in log[returned:] if slot == s and j < guaranteed]
    assert late == [], f"chunks {late} unmapped after reserve(100) returned"
    assert all(j >= lay.chunks_for(1) + 0 for _, j in log) and log, log
    assert kv.stats()["trimmed"] > 0
    kv.check_invariants()
