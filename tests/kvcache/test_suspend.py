"""KVCache.suspend / resume: the physical memory goes back to the driver while every address stays,
and comes back with the same bytes and the same sharing structure (a fork prefix: one chunk, two places).
A resume the device cannot serve is tested on the fake libcuda (test_kvcache_fake_cuda.py)."""

from __future__ import annotations

import re
import resource
import sys
import threading

import numpy as np
import pytest

import torch  # noqa: F401  (a test extra: a missing torch is an error, not a skip)

import glake
import glake.multipath
from glake import _C
from kv_util import CHUNK, get, put, ramp, make_host_kv_fixture, make_kv_fixture  # noqa: F401  (fixtures)

SUSPENDED = re.compile("suspended.*call resume")


def physical(backend: str) -> int:
    return _C.stats(backend)["physical_bytes.current"]


def views(kv):
    """Every view's address, and the range's: what must not move across a suspension."""
    n = kv.layout.num_layers
    return [kv.base_ptr] + [kv.k_cache(i).data_ptr() for i in range(n)] + [kv.v_cache(i).data_ptr() for i in range(n)]


def sharing(kv, slots):
    """Which places share a physical chunk, independent of the chunks' ids (new ones after a resume)."""
    first = {}
    return [[first.setdefault(c, (s, j)) if c is not None else None for j, c in enumerate(kv.chunk_ids(s))]
            for s in slots]


def three_sequences(kv):
    """a (70 tokens), b (40), and f: a fork of a's first 50 tokens (3 shared chunks, a copied tail) grown to 60;
    plus a released slot that kept its chunks. Returns (slots, {slot: values})."""
    a, b = kv.allocate(), kv.allocate()
    kv.reserve(a, 70)
    kv.reserve(b, 40)
    put(kv, a, 0, ramp(1, 0, 70))
    put(kv, b, 0, ramp(-500, 0, 40))
    f = kv.fork(a, 50)
    kv.reserve(f, 60)
    put(kv, f, 50, ramp(9000, 50, 60))
    r = kv.allocate()
    kv.reserve(r, 30)
    kv.release(r)
    vals = {a: ramp(1, 0, 70), b: ramp(-500, 0, 40), f: np.concatenate([ramp(1, 0, 50), ramp(9000, 50, 60)])}
    return (a, b, f), vals


def test_suspend_gives_every_chunk_back_and_resume_restores_bytes_addresses_and_sharing(make_kv, backend):
    engine = glake.multipath.engine(backend, 0)  # before `base`: its staging buffers are not the cache's
    base = physical(backend)
    kv = make_kv()
    (a, b, f), vals = three_sequences(kv)
    assert kv.device_index == 0 and kv.chunk_ids(f)[:3] == kv.chunk_ids(a)[:3] and kv.stats()["chunks_shared"] == 3
    live_chunks = len({c for s in (a, b, f) for c in kv.chunk_ids(s)})  # 5 of a, 3 of b, 1 tail of f
    assert live_chunks == 9 and kv.stats()["chunks_physical"] == 11  # and the released slot's 2
    before = dict(views=views(kv), sharing=sharing(kv, (a, b, f)), caps=[kv.capacity(s) for s in (a, b, f)],
                  reserved=[kv.reserved(s) for s in (a, b, f)], lengths=kv.lengths.clone())
    moved = engine.stats()["bytes"]

    kv.suspend(engine=engine)
    st = kv.stats()
    assert kv.suspended and st["suspended"] == 1
    assert st["suspended_host_bytes"] == live_chunks * CHUNK  # the shared prefix copied once, the released slot not
    assert physical(backend) == base, "a suspended KV cache holds no physical memory"
    assert st["chunks_physical"] == st["chunks_mapped"] == st["pool_cached_chunks"] == kv.physical_chunks == 0
    assert st["slots_active"] == 3 and st["slots_released"] == 0 and st["slots_free"] == 1
    assert views(kv) == before["views"] and kv.range.mapped_bytes == 0
    assert [kv.capacity(s) for s in (a, b, f)] == [0, 0, 0]           # nothing is backed now
    assert [kv.reserved(s) for s in (a, b, f)] == before["reserved"]   # but the sequences keep their lengths
    assert kv.chunk_ids(a) == [] and kv.chunk_refs() == {}
    kv.check_invariants()

    kv.resume(engine=engine)
    assert engine.stats()["bytes"] - moved == 2 * st["suspended_host_bytes"]  # out and back through multipath
    st = kv.stats()
    assert not kv.suspended and st["suspended"] == 0 and st["suspended_host_bytes"] == 0
    assert st["chunks_physical"] == live_chunks and st["chunks_shared"] == 3 and st["chunks_mapped"] == 12
    assert physical(backend) - base == live_chunks * CHUNK
    assert views(kv) == before["views"]
    assert sharing(kv, (a, b, f)) == before["sharing"]  # the prefix is one physical chunk mapped twice again
    assert sorted(kv.chunk_refs().values()) == [1] * 6 + [2] * 3
    assert [kv.capacity(s) for s in (a, b, f)] == before["caps"]
    assert torch.equal(kv.lengths, before["lengths"])
    kv.check_invariants()
    for s, v in vals.items():
        assert np.array_equal(get(kv, s, 0, len(v)), v), f"slot {s} lost its contents"

    # and the cache works as before: grow, fork, write, release
    kv.reserve(a, 128)
    put(kv, a, 70, ramp(7000, 70, 128))
    g = kv.fork(b, 32)
    assert kv.chunk_ids(g)[:2] == kv.chunk_ids(b)[:2]
    with pytest.raises(glake.InvalidArgumentError, match="shared"):
        kv.check_writable(f, 0, 1)
    kv.release(f)
    kv.check_invariants()
    assert np.array_equal(get(kv, a, 0, 128), np.concatenate([vals[a], ramp(7000, 70, 128)]))
    assert np.array_equal(get(kv, g, 0, 32), vals[b][:32])


def test_discard_copies_nothing_and_resume_still_maps_every_place(make_kv, backend):
    base = physical(backend)
    kv = make_kv()
    (a, b, f), _ = three_sequences(kv)
    shape = sharing(kv, (a, b, f))
    caps = [kv.capacity(s) for s in (a, b, f)]
    kv.suspend(discard=True)
    st = kv.stats()
    assert st["suspended"] == 1 and st["suspended_host_bytes"] == 0 and physical(backend) == base
    kv.check_invariants()
    kv.resume()
    assert sharing(kv, (a, b, f)) == shape and [kv.capacity(s) for s in (a, b, f)] == caps
    assert [kv.reserved(s) for s in (a, b, f)] == [70, 40, 60] and kv.stats()["chunks_shared"] == 3
    kv.check_invariants()
    put(kv, b, 0, ramp(3, 0, 40))  # the contents are undefined, the memory is there
    assert np.array_equal(get(kv, b, 0, 40), ramp(3, 0, 40))


def test_every_call_that_needs_backing_refuses_while_suspended(make_kv):
    kv = make_kv()
    a, b = kv.allocate(), kv.allocate()
    kv.reserve(a, 40)
    kv.reserve(b, 20)
    put(kv, a, 0, ramp(5, 0, 40))
    swapped = kv.swap_out(b)
    kv.suspend()
    refused = {
        "reserve within the reservation": lambda: kv.reserve(a, 10),
        "reserve beyond it": lambda: kv.reserve(a, 60),
        "reserve_batch": lambda: kv.reserve_batch([a], [50]),
        "prefetch": lambda: kv.prefetch(a, 100),
        "fork": lambda: kv.fork(a, 20),
        "write": lambda: kv.write(0, a, 40, *(2 * [torch.zeros(1, 16, 512)])),
        "check_writable": lambda: kv.check_writable(a, 0, 1),
        "swap_out": lambda: kv.swap_out(a),
        "swap_in": lambda: kv.swap_in(swapped),
    }
    for what, call in refused.items():
        with pytest.raises(glake.GlakeError, match=SUSPENDED):
            call()
            pytest.fail(f"{what} did not refuse")
    assert not kv.can_reserve(a, 1) and not swapped.consumed
    with pytest.raises(glake.InvalidArgumentError, match="already suspended"):
        kv.suspend()
    # what needs no backing works: queries, lengths, trim, the mapper's wait
    assert kv.reserved(a) == 40 and kv.capacity(a) == 0 and kv.first_writable(a) == 0
    assert kv.free_tokens() > 0 and kv.trim() == 0 and kv.wait_mapper(1.0)
    kv.publish_lengths()
    assert kv.lengths.tolist() == [40, 0, 0, 0]
    assert "live" in repr(kv)
    kv.check_invariants()
    kv.resume()
    kv.resume()  # not suspended: a no-op
    assert not kv.suspended
    c = kv.swap_in(swapped)
    kv.reserve(a, 100)
    kv.check_invariants()
    assert np.array_equal(get(kv, a, 0, 40), ramp(5, 0, 40)) and kv.reserved(c) == 20


def test_release_while_suspended_forgets_the_sequence_and_keeps_what_others_share(make_kv, backend):
    base = physical(backend)
    kv = make_kv()
    (a, b, f), vals = three_sequences(kv)
    kv.suspend()
    kv.release(a)  # f's prefix chunks are a's: they come back as f's alone, with a's bytes
    kv.release(b)  # b's chunks are nobody else's: not recreated
    assert kv.stats()["slots_free"] == 3 and kv.stats()["fences_pending"] == 0
    n = kv.allocate()  # a new sequence needs no memory until it reserves
    assert kv.capacity(n) == 0
    with pytest.raises(glake.GlakeError, match=SUSPENDED):
        kv.reserve(n, 1)
    kv.check_invariants()
    kv.resume()
    st = kv.stats()
    assert st["chunks_physical"] == st["chunks_mapped"] == 4 and st["chunks_shared"] == 0  # f's 4 chunks
    assert physical(backend) - base == 4 * CHUNK
    assert kv.chunk_ids(n) == [] and all(kv.chunk_ids(s) == [] for s in {a, b} - {n})
    assert np.array_equal(get(kv, f, 0, 60), vals[f])
    assert kv.first_writable(f) == 0  # nothing shared any more
    kv.reserve(n, 30)
    put(kv, n, 0, ramp(77, 0, 30))
    assert np.array_equal(get(kv, n, 0, 30), ramp(77, 0, 30))
    kv.check_invariants()


def test_the_mapper_maps_nothing_while_suspended_and_tops_up_after_resume(make_kv):
    kv = make_kv(lookahead_tokens=32, memory_budget=6 * CHUNK)  # 16 tokens per chunk
    a = kv.allocate()
    kv.reserve(a, 64)  # 4 chunks, and the mapper adds 2 of lookahead: the whole budget
    assert kv.wait_mapper(10) and kv.capacity(a) == 96
    b = kv.allocate()
    kv.reserve(b, 16)  # takes one of a's lookahead chunks: a and b are both starved now
    assert kv.wait_mapper(10) and kv.capacity(a) == 80 and kv.capacity(b) == 16
    kv.suspend()
    st = kv.stats()
    passes, maps = st["mapper_passes"], st["maps_background"]
    kv.release(b)  # chunks come free: the manager wakes the starved mapper work (a's lookahead)
    assert kv.wait_mapper(10) and kv.mapper_alive
    st = kv.stats()
    assert st["mapper_passes"] > passes, "the mapper was asked to run"
    assert st["maps_background"] == maps and kv.physical_chunks == 0 and st["pool_cached_chunks"] == 0
    kv.check_invariants()
    kv.resume()  # a's 5 chunks (b's went with its release), then the mapper tops a up to 96 again
    assert kv.wait_mapper(10) and kv.capacity(a) == 96 and kv.physical_chunks == 6
    assert kv.stats()["maps_background"] == maps + 1
    kv.check_invariants()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status")
def test_a_suspend_without_host_memory_changes_nothing(make_kv, backend):
    if backend != "host":
        pytest.skip("the address-space limit is a host-process trick; the copy path is the same")
    kv = make_kv()
    (a, b, f), vals = three_sequences(kv)
    shape, st0 = sharing(kv, (a, b, f)), kv.stats()
    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + CHUNK // 2, hard))  # no room for a 2 MiB host buffer
    try:
        with pytest.raises(glake.OutOfMemoryError, match="host memory"):
            kv.suspend()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    st = kv.stats()
    assert not kv.suspended and st["suspended"] == 0 and sharing(kv, (a, b, f)) == shape
    assert {k: st[k] for k in ("chunks_physical", "chunks_mapped", "slots_released")} == \
        {k: st0[k] for k in ("chunks_physical", "chunks_mapped", "slots_released")}
    kv.check_invariants()
    for s, v in vals.items():
        assert np.array_equal(get(kv, s, 0, len(v)), v)
    kv.suspend()  # with the memory there, it goes through
    kv.resume()
    assert np.array_equal(get(kv, f, 0, 60), vals[f])


def test_a_suspended_cache_can_be_closed(make_kv, backend):
    base = physical(backend)
    kv = make_kv(lookahead_tokens=4)
    a = kv.allocate()
    kv.reserve(a, 50)
    kv.suspend()
    kv.close()  # the saved bytes go with it; the leak check (conftest) sees every chunk and range gone
    assert kv.closed and physical(backend) == base
    with pytest.raises(glake.InvalidArgumentError, match="closed"):
        kv.resume()


def test_suspend_waits_for_a_pending_release_fence_without_the_lock(make_host_kv):
    kv = make_host_kv()
    a, r = kv.allocate(), kv.allocate()
    kv.reserve(a, 20)
    kv.reserve(r, 20)
    put(kv, a, 0, ramp(4, 0, 20))
    _C.host_hold_events(True)
    try:
        kv.release(r)  # "a kernel still reads r's chunks": they may not be unmapped yet
        done = threading.Event()
        t = threading.Thread(target=lambda: (kv.suspend(), done.set()))
        t.start()
        assert not done.wait(0.3)  # still waiting for the fence
        assert kv.capacity(a) == 32 and kv.stats()["fences_pending"] == 1 and not kv.suspended  # lock free
        assert _C.host_complete_events() == 1
        t.join(10)
        assert done.is_set() and kv.suspended and kv.stats()["fences_pending"] == 0
    finally:
        _C.host_hold_events(False)
        _C.host_complete_events()
    kv.check_invariants()
    kv.resume()
    assert np.array_equal(get(kv, a, 0, 20), ramp(4, 0, 20))


def test_glake_suspend_takes_every_registered_cache_and_discard_skips_the_copy(make_host_kv):
    kept, dropped = make_host_kv(), make_host_kv()
    for kv in (kept, dropped):
        s = kv.allocate()
        kv.reserve(s, 40)
        kv.k_cache(0)[s, :40] = 3.0
    assert glake.suspend(discard=[dropped]) == [0]
    assert kept.suspended and dropped.suspended
    assert kept.stats()["suspended_host_bytes"] > 0 and dropped.stats()["suspended_host_bytes"] == 0
    assert glake.resume() == [0]
    assert not kept.suspended and not dropped.suspended
    assert bool((kept.k_cache(0)[0, :40] == 3.0).all())
    dropped.close()  # a closed cache leaves the registry
    assert dropped not in glake.suspension._registered(None)


def test_kept_host_buffers_serve_the_caches_next_suspend_and_a_discard_drops_them(make_host_kv, monkeypatch):
    monkeypatch.setenv("GLAKE_SUSPEND_KEEP_HOST", "1")
    kv = make_host_kv()
    (a, b, f), vals = three_sequences(kv)
    for cycle in range(2):
        kv.suspend()
        st = kv.stats()
        assert st["kept_host_bytes"] == 0
        assert st["suspended_reused_bytes"] == (0 if cycle == 0 else st["suspended_host_bytes"])
        kv.resume()
        for s, v in vals.items():
            assert np.array_equal(get(kv, s, 0, len(v)), v)
        assert kv.stats()["kept_host_bytes"] == st["suspended_host_bytes"] > 0
    kv.suspend(discard=True)  # nothing copied: the kept buffers are not needed
    assert kv.stats()["kept_host_bytes"] == 0 and kv.stats()["suspended_host_bytes"] == 0
    kv.resume()
