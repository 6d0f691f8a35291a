"""Suspend and resume of the stitched allocator (host backend; the fake libcuda too, see helpers.py):
the memory goes back to the backend, every address stays, and live data survives."""

from __future__ import annotations

import pytest

import glake
import glake.multipath
from glake import _C
from tests.gmlake.helpers import BACKEND, ON_FAKE_CUDA, MiB, check, fill


def physical() -> int:
    return _C.stats(BACKEND)["physical_bytes.current"]


def test_suspend_gives_the_memory_back_and_resume_restores_every_byte_at_the_same_address():
    base = physical()
    a = glake.Allocator(backend=BACKEND, chunk_bytes="8MiB")
    sizes = [4096, 300_000, 3 * MiB, 20 * MiB, 6 * MiB]
    live = [a.malloc(n) for n in sizes]
    a.free(live.pop(3))              # 20 MiB free: two 8 MiB chunks and a 4 MiB one to stitch from
    big = a.malloc(24 * MiB)         # stitched over the free 20 MiB and a new segment
    assert a.stats()["num_stitches"] == 1
    live.append(big)
    sizes = [4096, 300_000, 3 * MiB, 6 * MiB, 24 * MiB]
    for i, (p, n) in enumerate(zip(live, sizes)):
        fill(p, n, i)
    snap = [(s["address"], s["size"]) for s in a.snapshot()]
    engine = glake.multipath.engine(BACKEND, 0)
    moved = engine.stats()["bytes"]
    a.suspend()
    st = a.stats()
    assert a.suspended and st["suspended"] == 1
    assert physical() == base, "a suspended allocator holds no physical memory"
    assert 0 < st["suspended_host_bytes"] <= st["reserved_bytes.all.current"]
    a.resume()
    assert engine.stats()["bytes"] - moved == 2 * st["suspended_host_bytes"]  # out and back through multipath
    assert not a.suspended and a.stats()["suspended"] == 0 and a.stats()["suspended_host_bytes"] == 0
    assert [(s["address"], s["size"]) for s in a.snapshot()] == snap
    for i, (p, n) in enumerate(zip(live, sizes)):
        assert check(p, n, i), f"allocation {i} ({n} bytes) lost its contents"
    # and it works as before: new allocations, frees, a new stitch
    for p in live:
        a.free(p)
    p = a.malloc(40 * MiB)
    fill(p, 40 * MiB, 9)
    assert check(p, 40 * MiB, 9)
    a.free(p)


@pytest.mark.parametrize("overlap", ["1", "0"])
def test_runs_that_cross_the_resume_slices_come_back_whole(monkeypatch, overlap):
    """Resume maps 64 MiB slices of a segment while the earlier ones copy: live runs that start,
    end and pause inside slices (a free block between them) are cut at the slices and restored
    (and so with GLAKE_RESUME_OVERLAP=0: everything mapped first)."""
    monkeypatch.setenv("GLAKE_RESUME_OVERLAP", overlap)
    a = glake.Allocator(backend=BACKEND, chunk_bytes="2MiB")
    seg = a.malloc(200 * MiB)  # one segment of 100 chunks: slices [0, 64) [64, 128) [128, 192) [192, 200) MiB
    a.free(seg)
    parts = [a.malloc(n) for n in (50 * MiB, 30 * MiB, 90 * MiB)]  # carved from it: 0-50, 50-80, 80-170 MiB
    assert a.stats()["reserved_bytes.all.current"] == 200 * MiB, "the test needs the three in one segment"
    a.free(parts[0])  # a hole at the start: live 50-170 MiB, one run over three slices
    for i, (p, n) in enumerate(zip(parts[1:], (30 * MiB, 90 * MiB))):
        fill(p, n, 20 + i)
    a.suspend()
    a.resume()
    for i, (p, n) in enumerate(zip(parts[1:], (30 * MiB, 90 * MiB))):
        assert check(p, n, 20 + i), f"allocation {i} lost its contents"
    for p in parts[1:]:
        a.free(p)


@pytest.mark.parametrize("with_live", [False, True])
def test_resume_maps_segments_that_hold_no_live_data(with_live):
    """A private pool's free segments survive a suspend (the pool is not released) and hold nothing to
    copy back: resume maps them all the same, with no copy, or after the last copy, waiting for them
    (found by the property test on the fake libcuda: reserved bytes with no physical memory)."""
    base = physical()
    a = glake.Allocator(backend=BACKEND, chunk_bytes="2MiB")
    live = a.malloc(3 * MiB) if with_live else None
    if live:
        fill(live, 3 * MiB, 31)
    a.begin_allocate_to_pool((1, 0), [0])
    blocks = [a.malloc(2 * MiB) for _ in range(64)]  # 64 one-chunk segments of the pool
    for p in blocks:
        a.free(p)
    a.end_allocate_to_pool((1, 0))
    reserved = a.stats()["reserved_bytes.all.current"]
    assert reserved >= 64 * 2 * MiB
    a.suspend()
    a.resume()
    assert a.stats()["reserved_bytes.all.current"] == reserved
    assert physical() - base == reserved, "a segment came back without its chunks"
    if live:
        assert check(live, 3 * MiB, 31)
        a.free(live)
    p = a.malloc(2 * MiB)  # and the pool's memory is usable
    fill(p, 2 * MiB, 32)
    assert check(p, 2 * MiB, 32)
    a.free(p)


def test_the_free_cache_is_dropped_not_copied():
    a = glake.Allocator(backend=BACKEND, chunk_bytes="2MiB")
    keep = a.malloc(2 * MiB)
    a.free(a.malloc(64 * MiB))  # a free 64 MiB segment: released by suspend, not copied
    fill(keep, 2 * MiB, 3)
    a.suspend()
    st = a.stats()
    assert st["suspended_host_bytes"] == 2 * MiB and st["reserved_bytes.all.current"] == 2 * MiB
    a.resume()
    assert check(keep, 2 * MiB, 3)
    a.free(keep)


def test_while_suspended_malloc_fails_clearly_and_free_works():
    a = glake.Allocator(backend=BACKEND)
    p, q = a.malloc(4 * MiB), a.malloc(1000)
    fill(p, 4 * MiB, 1)
    a.suspend()
    with pytest.raises(glake.GlakeError, match="suspended.*glake.resume"):
        a.malloc(100)
    a.free(q)          # bookkeeping only
    a.empty_cache()    # nothing to release while suspended; must not lose the segments
    with pytest.raises(glake.InvalidArgumentError, match="already suspended"):
        a.suspend()
    a.resume()
    a.resume()         # not suspended: no-op
    assert check(p, 4 * MiB, 1)
    a.free(p)


def test_suspend_is_refused_while_a_private_pool_is_allocated_to():
    a = glake.Allocator(backend=BACKEND)
    a.begin_allocate_to_pool((1, 0), [0])
    p = a.malloc(4 * MiB)
    with pytest.raises(glake.InvalidArgumentError, match="private pool"):
        a.suspend()
    a.end_allocate_to_pool((1, 0))
    a.suspend()  # the pool's live block is copied like any other
    a.resume()
    a.free(p)
    a.release_pool((1, 0))


def test_a_suspended_allocator_can_be_destroyed():
    a = glake.Allocator(backend=BACKEND)
    a.malloc(8 * MiB)
    a.suspend()
    del a  # the leak check (conftest) sees every range and chunk gone


def host_global_allocator():
    """The process-wide allocator of device 0, whose memory these tests read and write from the host."""
    g = _C.gmlake_global(0)
    if g.backend != BACKEND:  # a GPU machine: the process-wide allocator is on cuda
        pytest.skip(f"the process-wide allocator is on {g.backend}, not {BACKEND}: its memory is not host-addressable")
    return g


def test_glake_suspend_and_resume_cover_the_process_wide_allocator():
    g = host_global_allocator()
    p = g.malloc(6 * MiB, 0)
    fill(p, 6 * MiB, 7)
    try:
        assert 0 in glake.suspend()
        assert g.suspended and glake.suspend() == []  # already suspended: skipped
        assert glake.resume() == [0] and not g.suspended
        assert check(p, 6 * MiB, 7)
    finally:
        glake.resume()
        g.free(p)
        g.empty_cache()


def test_a_suspend_larger_than_ram_allows_goes_to_a_preallocated_file(tmp_path, monkeypatch):
    # the threshold forced low: every run of live chunks over 4 MiB goes to an unnamed file in tmp_path
    monkeypatch.setenv("GLAKE_SUSPEND_FILE_OVER", str(4 * MiB))
    monkeypatch.setenv("GLAKE_SUSPEND_DIR", str(tmp_path))
    a = glake.Allocator(backend=BACKEND, chunk_bytes="8MiB")
    small, big = a.malloc(4096), a.malloc(16 * MiB)
    fill(small, 4096, 1)
    fill(big, 16 * MiB, 2)
    a.suspend()
    st = a.stats()
    assert st["suspended_file_bytes"] == 16 * MiB, st  # the 2 MiB chunk of the small block stays in RAM
    assert st["suspended_host_bytes"] > st["suspended_file_bytes"]
    assert list(tmp_path.iterdir()) == [], "the file has no name: nothing is left behind"
    a.resume()
    assert a.stats()["suspended_file_bytes"] == 0
    assert check(small, 4096, 1) and check(big, 16 * MiB, 2)
    a.free(small)
    a.free(big)


def test_no_room_for_the_file_fails_cleanly_and_changes_nothing(monkeypatch):
    monkeypatch.setenv("GLAKE_SUSPEND_FILE_OVER", "0")
    monkeypatch.setenv("GLAKE_SUSPEND_DIR", "/nonexistent/glake")
    a = glake.Allocator(backend=BACKEND, chunk_bytes="8MiB")
    p = a.malloc(3 * MiB)
    fill(p, 3 * MiB, 5)
    with pytest.raises(glake.OutOfMemoryError, match="GLAKE_SUSPEND_DIR"):
        a.suspend()
    assert not a.suspended and check(p, 3 * MiB, 5)
    a.free(p)


@pytest.mark.parametrize("threads", ["0", "3", "16"])
def test_prefaulted_host_buffers_hold_the_same_bytes(monkeypatch, threads):
    # Threads fault the fresh host buffer in while the copy writes it: 200 MiB are 7 blocks of 32 MiB,
    # the last one short; 16 threads are more than the blocks; 0: the copy faults pages in itself
    monkeypatch.setenv("GLAKE_SUSPEND_PREFAULT_THREADS", threads)
    a = glake.Allocator(backend=BACKEND, chunk_bytes="8MiB")
    p = a.malloc(200 * MiB)
    fill(p, 200 * MiB, 7)
    a.suspend()
    a.resume()
    assert check(p, 200 * MiB, 7)
    a.free(p)


def test_kept_host_buffers_serve_the_next_suspend(monkeypatch):
    # GLAKE_SUSPEND_KEEP_HOST=1: a resume keeps its buffers and the next suspend of the same layout
    # writes into them (suspended_reused_bytes), the first suspend into fresh memory.
    monkeypatch.setenv("GLAKE_SUSPEND_KEEP_HOST", "1")
    a = glake.Allocator(backend=BACKEND, chunk_bytes="8MiB")
    p, q = a.malloc(6 * MiB), a.malloc(20 * MiB)
    try:
        for cycle in range(3):
            fill(p, 6 * MiB, cycle)
            fill(q, 20 * MiB, cycle + 10)
            a.suspend()
            st = a.stats()
            assert st["suspended_host_bytes"] > 0 and st["kept_host_bytes"] == 0
            assert st["suspended_reused_bytes"] == (0 if cycle == 0 else st["suspended_host_bytes"])
            a.resume()
            assert check(p, 6 * MiB, cycle) and check(q, 20 * MiB, cycle + 10)
            assert a.stats()["kept_host_bytes"] == st["suspended_host_bytes"], "the resume kept its buffers"
        assert _C.host_reserve_bytes() >= a.stats()["kept_host_bytes"]
        monkeypatch.delenv("GLAKE_SUSPEND_KEEP_HOST")
        a.suspend()
        a.resume()
        assert a.stats()["kept_host_bytes"] == 0, "not keeping: a resume unmaps its buffers"
    finally:
        a.resume()
        a.free(p)
        a.free(q)


def test_a_suspend_unmaps_the_kept_buffers_it_does_not_take_and_leaves_other_allocators_alone(monkeypatch):
    monkeypatch.setenv("GLAKE_SUSPEND_KEEP_HOST", "1")
    base = _C.host_reserve_bytes()  # what other objects of this process keep
    a = glake.Allocator(backend=BACKEND, chunk_bytes="8MiB")
    b = glake.Allocator(backend=BACKEND, chunk_bytes="8MiB")
    p, other = a.malloc(6 * MiB), b.malloc(4 * MiB)
    fill(other, 4 * MiB, 3)
    b.suspend()
    b.resume()
    b_kept = b.stats()["kept_host_bytes"]
    fill(p, 6 * MiB, 1)
    a.suspend()
    a.resume()
    assert a.stats()["kept_host_bytes"] > 0 and b_kept > 0
    a.free(p)
    a.empty_cache()
    p = a.malloc(40 * MiB)  # another layout: its run has another size, the kept one goes stale
    fill(p, 40 * MiB, 9)
    a.suspend()
    st = a.stats()
    assert st["suspended_reused_bytes"] == 0 and st["kept_host_bytes"] == 0, "the stale buffer is still kept"
    assert b.stats()["kept_host_bytes"] == b_kept, "another allocator's kept buffers went too"
    a.resume()
    assert check(p, 40 * MiB, 9) and a.stats()["kept_host_bytes"] == st["suspended_host_bytes"]
    b.suspend()
    assert b.stats()["suspended_reused_bytes"] == b_kept
    b.resume()
    assert check(other, 4 * MiB, 3)
    a.free(p)
    b.free(other)
    assert _C.host_reserve_bytes() == base + a.stats()["kept_host_bytes"] + b.stats()["kept_host_bytes"]
    del a, b  # an allocator's kept buffers go with it
    assert _C.host_reserve_bytes() == base


def test_glake_suspend_keeps_and_reuses_the_global_allocators_buffers(monkeypatch):
    monkeypatch.setenv("GLAKE_SUSPEND_KEEP_HOST", "1")
    g = host_global_allocator()
    p = g.malloc(6 * MiB, 0)
    try:
        fill(p, 6 * MiB, 1)
        for cycle in range(2):
            glake.suspend()
            st = g.stats()
            assert st["suspended_reused_bytes"] == (0 if cycle == 0 else st["suspended_host_bytes"])
            glake.resume()
            assert check(p, 6 * MiB, 1) and g.stats()["kept_host_bytes"] == st["suspended_host_bytes"]
    finally:
        monkeypatch.delenv("GLAKE_SUSPEND_KEEP_HOST")
        glake.resume()
        glake.suspend()  # not keeping: this cycle gives the kept memory back
        glake.resume()
        assert g.stats()["kept_host_bytes"] == 0
        g.free(p)
        g.empty_cache()


def test_discarded_allocations_are_not_copied_and_the_others_survive():
    a = glake.Allocator(backend=BACKEND, chunk_bytes="8MiB")
    weights, live = a.malloc(16 * MiB), a.malloc(8 * MiB)  # each its own 8 MiB chunks
    fill(weights, 16 * MiB, 1)
    fill(live, 8 * MiB, 2)
    with pytest.raises(glake.InvalidArgumentError, match="not the base of a live allocation"):
        a.suspend(discard=[weights + 4096])
    assert not a.suspended, "a bad discard changes nothing"
    a.suspend()
    everything = a.stats()["suspended_host_bytes"]
    a.resume()
    a.suspend(discard=[weights])
    assert a.stats()["suspended_host_bytes"] == everything - 16 * MiB
    a.resume()
    assert check(live, 8 * MiB, 2)
    a.free(weights)
    a.free(live)


def test_glake_suspend_refuses_to_discard_a_tensor_outside_glakes_device_memory():
    import torch

    with pytest.raises(glake.InvalidArgumentError, match="not in glake's device memory"):
        glake.suspend(discard=[torch.zeros(4)])
    with pytest.raises(glake.InvalidArgumentError, match="not a tensor and not registered"):
        glake.suspend(discard=[object()])


def registered_bytes() -> int:
    """Host memory page-locked with the driver (the fake libcuda counts it; the host backend pins nothing)."""
    if not ON_FAKE_CUDA:
        return 0
    import ctypes

    fake = ctypes.CDLL("libcuda.so.1")
    fake.fake_registered_bytes.restype = ctypes.c_size_t
    return fake.fake_registered_bytes()


def test_a_prepared_suspend_lands_in_the_prepared_pinned_buffers_and_they_stay_for_the_next(monkeypatch):
    monkeypatch.delenv("GLAKE_SUSPEND_KEEP_HOST", raising=False)
    a = glake.Allocator(backend=BACKEND, chunk_bytes="8MiB")
    p, q = a.malloc(6 * MiB), a.malloc(20 * MiB)
    pinned_before = registered_bytes()
    try:
        made = a.prepare_suspend()
        assert made > 0 and a.stats()["kept_host_bytes"] == made
        assert a.prepare_suspend() == 0, "the kept buffers already cover the live data"
        if ON_FAKE_CUDA:
            assert registered_bytes() - pinned_before == made, "prepared buffers are page-locked with the driver"
        engine = glake.multipath.engine(BACKEND, 0)
        for cycle in range(2):  # the buffers serve each cycle, and stay after each resume (no env var)
            fill(p, 6 * MiB, cycle)
            fill(q, 20 * MiB, cycle + 7)
            moved = engine.stats()["bytes"]
            a.suspend()
            st = a.stats()
            assert st["suspended_host_bytes"] == made and st["suspended_reused_bytes"] == made
            a.resume()
            assert engine.stats()["bytes"] - moved == 2 * made
            assert check(p, 6 * MiB, cycle) and check(q, 20 * MiB, cycle + 7)
            assert a.stats()["kept_host_bytes"] == made
        a.drop_host_reserve()
        assert a.stats()["kept_host_bytes"] == 0 and registered_bytes() == pinned_before, "dropped and unregistered"
        a.suspend()  # unprepared again: fresh memory, given back by the resume
        assert a.stats()["suspended_reused_bytes"] == 0
        a.resume()
        assert a.stats()["kept_host_bytes"] == 0 and check(q, 20 * MiB, 8)
    finally:
        a.resume()
        a.free(p)
        a.free(q)
    x = a.malloc(MiB)
    a.suspend()
    with pytest.raises(glake.InvalidArgumentError, match="already suspended"):
        a.prepare_suspend()
    a.resume()
    a.free(x)


def test_glake_prepare_suspend_covers_the_process_wide_allocator(monkeypatch):
    monkeypatch.delenv("GLAKE_SUSPEND_KEEP_HOST", raising=False)
    g = host_global_allocator()
    p = g.malloc(6 * MiB, 0)
    try:
        fill(p, 6 * MiB, 5)
        made = glake.prepare_suspend()
        assert made >= 6 * MiB and g.stats()["kept_host_bytes"] == made
        glake.suspend()
        assert g.stats()["suspended_reused_bytes"] == g.stats()["suspended_host_bytes"] > 0
        glake.resume()
        assert check(p, 6 * MiB, 5) and g.stats()["kept_host_bytes"] == made
    finally:
        glake.resume()
        glake.release_suspend_host()
        assert g.stats()["kept_host_bytes"] == 0
        g.free(p)
        g.empty_cache()
