"""Scenarios of the stitched allocator on the cuda backend, run against the fake libcuda (no GPU).

The fake (tests/fake_cuda/fake_cuda.cpp) emulates the VMM API on host memory, runs every
stream as a thread, flags unmapping memory that queued stream work will still touch, and emulates
a global-mode stream capture (fake_set_capturing): the calls a capture forbids are refused and
counted. Its counters (fake_violations, fake_live_vmm_handles, ...) are read through ctypes. Usage:

    LD_LIBRARY_PATH=<dir with fake libcuda.so.1> GLAKE_BACKEND=cuda python fake_cuda_gmlake.py NAME

Prints "OK NAME" and exits 0 on success; an assertion error otherwise.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
import time

import numpy as np

import glake
from glake import _C, core

MiB = 1 << 20
DELAY_US = 300_000  # a slow "kernel" queued ahead of a copy
fake = ctypes.CDLL("libcuda.so.1")
for fn in ("fake_stream_create",):
    getattr(fake, fn).restype = ctypes.c_void_p
fake.fake_stream_create.argtypes = [ctypes.c_int]
fake.fake_stream_destroy.argtypes = [ctypes.c_void_p]
fake.fake_stream_sleep.argtypes = [ctypes.c_void_p, ctypes.c_uint]
fake.fake_stream_memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
fake.fake_stream_sync.argtypes = [ctypes.c_void_p]
fake.fake_set_capturing.argtypes = [ctypes.c_void_p, ctypes.c_int]
fake.fake_fail_creates_after.argtypes = [ctypes.c_long]


def view(ptr: int, n: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))


def pattern(n: int, seed: int) -> np.ndarray:
    return (np.arange(n, dtype=np.uint32) * 2654435761 + seed * 97).astype(np.uint8)


def live() -> tuple:
    return fake.fake_live_vmm_handles(), fake.fake_live_reservations(), fake.fake_live_mappings()


def violations() -> int:
    return fake.fake_violations()


_keep: list = []


def slow_copy_into(stream: int, dst: int, src: np.ndarray) -> None:
    """Queues a slow "kernel" then a copy writing dst on stream (src is kept alive for it)."""
    _keep.append(src)
    fake.fake_stream_sleep(stream, DELAY_US)
    fake.fake_stream_memcpy(stream, dst, src.ctypes.data, src.nbytes)


def vmm_core():
    """The fake's VMM through glake.core: map/access/unmap, pointer kinds, fd export and import."""
    base = live()
    g = core.granularity("cuda")
    assert g == 2 * MiB
    with core.VirtualRange(4 * g, backend="cuda") as r:
        chunks = [core.PhysChunk(backend="cuda") for _ in range(2)]
        r.map(0, chunks[0])
        r.map(2 * g, chunks[1])
        assert _C.multipath_pointer_kind(r.ptr + 5, 0, "cuda") == ("device", 0)
        assert _C.multipath_pointer_kind(r.ptr + g, 0, "cuda")[0] == "pageable"  # reserved, not mapped
        view(r.ptr, g)[:] = pattern(g, 1)
        fd = chunks[0].export_fd()
        imported = core.PhysChunk.import_fd(fd, g, backend="cuda")
        import os
        os.close(fd)
        with core.VirtualRange(g, backend="cuda") as r2:
            r2.map(0, imported)
            assert np.array_equal(view(r2.ptr, g), pattern(g, 1)), "an imported chunk shows other bytes"
            view(r2.ptr, 16)[:] = 7
            assert (view(r.ptr, 16) == 7).all(), "export/import does not share the memory"
        imported.release()
        r.unmap(0)
        r.unmap(2 * g)
        for c in chunks:
            c.release()
    assert live() == base, (live(), base)
    assert violations() == 0


def allocator_life():
    """malloc/free/stitch/empty_cache on the cuda backend: stitching does not grow reserved memory,
    survivors keep their bytes, and everything is returned to the driver."""
    base = live()
    a = glake.Allocator(0, backend="cuda")
    assert a.backend == "cuda"
    blocks = [a.malloc(4 * MiB) for _ in range(8)]
    for i, p in enumerate(blocks):
        view(p, 4 * MiB)[:] = pattern(4 * MiB, i)
        assert _C.multipath_pointer_kind(p, 0, "cuda") == ("device", 0)
    for p in blocks[::2]:
        a.free(p)
    reserved = a.stats()["reserved_bytes.all.current"]
    big = a.malloc(16 * MiB)  # as large as the four holes together
    s = a.stats()
    assert s["reserved_bytes.all.current"] == reserved, "stitching reserved more memory"
    assert s["num_stitches"] == 1, s
    assert _C.multipath_pointer_kind(big + 16 * MiB - 1, 0, "cuda") == ("device", 0)
    view(big, 16 * MiB)[:] = pattern(16 * MiB, 99)
    assert np.array_equal(view(big, 16 * MiB), pattern(16 * MiB, 99))
    for i, p in enumerate(blocks):
        if i % 2:
            assert np.array_equal(view(p, 4 * MiB), pattern(4 * MiB, i)), f"block {i} changed"
    a.free(big)
    for p in blocks[1::2]:
        a.free(p)
    a.empty_cache()
    s = a.stats()
    assert s["reserved_bytes.all.current"] == 0 and s["segment.all.current"] == 0, s
    assert s["mapped_va_bytes.current"] == 0 and s["num_stitch_gc"] == 1, s
    assert s["num_sync_all_streams"] >= 1, s
    assert live() == base, (live(), base)
    p = a.malloc(6 * MiB)  # the destructor releases what is still held
    del a, p
    gc.collect()
    assert live() == base, (live(), base)
    assert violations() == 0


def unmap_hazard_empty_cache():
    """A block freed while a slow copy into it is queued: empty_cache waits for the device first."""
    a = glake.Allocator(0, backend="cuda")
    s = fake.fake_stream_create(0)
    p = a.malloc(4 * MiB, s)
    src = pattern(4 * MiB, 3)
    slow_copy_into(s, p, src)
    a.free(p)  # legal: the stream's later work is ordered after the copy
    syncs = a.stats()["num_sync_all_streams"]
    t0 = time.perf_counter()
    a.empty_cache()
    assert time.perf_counter() - t0 >= DELAY_US / 2e6, "empty_cache did not wait for the queued copy"
    st = a.stats()
    assert st["num_sync_all_streams"] == syncs + 1 and st["reserved_bytes.all.current"] == 0, st
    assert violations() == 0
    fake.fake_stream_destroy(s)


def unmap_hazard_stitch_gc():
    """The stitched-VA bound drops an idle stitched range while a copy into it is queued."""
    a = glake.Allocator(0, backend="cuda", stitch_va_limit=4 * MiB)
    s = fake.fake_stream_create(0)
    blocks = [a.malloc(4 * MiB, s) for _ in range(6)]
    a.free(blocks[0])
    a.free(blocks[2])
    s1 = a.malloc(8 * MiB, s)  # stitched from blocks 0 and 2
    assert a.stats()["num_stitches"] == 1
    slow_copy_into(s, s1, pattern(8 * MiB, 4))
    a.free(s1)
    a.free(blocks[4])
    syncs = a.stats()["num_sync_all_streams"]
    s2 = a.malloc(12 * MiB, s)  # a second stitch: over the bound, the idle first one is dropped
    st = a.stats()
    assert st["num_stitches"] == 2 and st["num_stitch_gc"] == 1, st
    assert st["num_sync_all_streams"] == syncs + 1, st
    assert violations() == 0
    # The queued copy ran before the drop: its bytes are in blocks 0 and 2, now s2's first 8 MiB.
    assert np.array_equal(view(s2, 8 * MiB), pattern(8 * MiB, 4))
    a.free(s2)
    for i in (1, 3, 5):
        a.free(blocks[i])
    fake.fake_stream_destroy(s)
    del a
    gc.collect()
    assert violations() == 0


def unmap_hazard_detected():
    """The detector works: unmapping a range with a copy queued into it, with no synchronisation
    (glake.core does not synchronise; the allocator must), is flagged."""
    s = fake.fake_stream_create(0)
    r = core.VirtualRange(2 * MiB, backend="cuda")
    c = core.PhysChunk(backend="cuda")
    r.map(0, c)
    slow_copy_into(s, r.ptr, pattern(2 * MiB, 5))
    r.unmap(0)
    assert violations() == 1, violations()
    fake.fake_stream_sync(s)  # the copy then finds its memory unmapped: counted and skipped
    assert violations() == 2, violations()
    c.release()
    r.free()
    fake.fake_stream_destroy(s)


def capture_rules_detected():
    """The capture emulation refuses what a global-mode capture forbids, unless relaxed."""
    cap = fake.fake_stream_create(0)
    fake.fake_set_capturing(cap, 1)
    a = glake.Allocator(0, backend="cuda")
    before = violations()
    try:
        _C.multipath_pointer_kind(0, 0, "cuda")  # allowed
        core.memset(a.malloc(4 * MiB), 0, 16, backend="cuda")  # a synchronous memset: forbidden
    except glake.GlakeError as err:
        assert "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED" in str(err), str(err)
    else:
        raise AssertionError("a synchronous memset during a global capture was allowed")
    assert violations() == before + 1
    fake.fake_set_capturing(cap, 0)
    fake.fake_stream_destroy(cap)


def graph_setup():
    """The registry allocator of device 0 (the one glake.torch patches CUDA graphs into)."""
    a = _C.gmlake_global(0)
    assert a.backend == "cuda"
    return a


def capture_lifecycle():
    """Graph memory during and after captures: a graph is pool (graph, 0); what its capture frees is
    reused later in the same capture, kept for its replays, never unmapped or synchronised during a
    capture; released during another capture it stays the pool's (not reusable by others) and
    returns to the cache afterwards."""
    a = graph_setup()
    base = live()
    cap1, cap2 = fake.fake_stream_create(0), fake.fake_stream_create(0)
    other = fake.fake_stream_create(0)
    spare = a.malloc(4 * MiB, other)  # a segment that empty_cache could release
    a.free(spare)
    fake.fake_set_capturing(cap1, 1)
    _C.gmlake_begin_graph(0, 1)
    g1 = a.malloc(4 * MiB, cap1)  # slow path on a capturing stream
    assert a.pool_of(g1) == (1, 0)
    a.free(g1)  # kept for graph 1's replays
    eager = a.malloc(4 * MiB, other)
    assert eager != g1, "a graph's free memory went to a stream that does not capture"
    a.free(eager)
    again1 = a.malloc(4 * MiB, cap1)  # later in the same capture: reused
    assert again1 == g1, "memory a capture freed was not reused later in the same capture"
    a.free(again1)
    st = a.stats()
    reserved, syncs = st["reserved_bytes.all.current"], st["num_sync_all_streams"]
    a.empty_cache()  # during the capture: no synchronisation, nothing unmapped
    st = a.stats()
    assert st["num_sync_all_streams"] == syncs and st["reserved_bytes.all.current"] == reserved, st
    assert violations() == 0, "empty_cache during a capture made a forbidden call"
    fake.fake_set_capturing(cap1, 0)
    _C.gmlake_end_graph(0, 1)

    fake.fake_set_capturing(cap2, 1)
    _C.gmlake_begin_graph(0, 2)
    _C.gmlake_release_graph(0, 1)  # during graph 2's capture: retired, not back in the cache
    assert a.stats()["num_sync_all_streams"] == syncs
    again = a.malloc(4 * MiB, cap1)  # cap1 no longer captures
    assert not (g1 <= again < g1 + 4 * MiB), "a released graph's block was reused during another capture"
    g2 = a.malloc(2 * MiB, cap2)
    a.free(g2)
    assert a.malloc(2 * MiB, cap2) == g2  # reused within graph 2's capture
    a.free(g2)
    assert violations() == 0
    fake.fake_set_capturing(cap2, 0)
    _C.gmlake_end_graph(0, 2)

    a.free(again)
    reserved = a.stats()["reserved_bytes.all.current"]
    a.create_or_incref_pool(99, 0)
    a.release_pool(99, 0)  # a release with no pool routed to: graph 1's memory returns (one synchronisation)
    st = a.stats()
    assert st["num_sync_all_streams"] > syncs, st
    assert a.pool_use_count(1, 0) == 0 and st["private_pools"] == 1, st  # graph 2's pool only
    reuse = [a.malloc(4 * MiB, cap1) for _ in range(2)]  # the cache's two free 4 MiB blocks of cap1
    assert sorted(reuse) == sorted([g1, again]), "a released graph's memory did not return to the cache"
    assert a.stats()["reserved_bytes.all.current"] == reserved
    for p in reuse:
        a.free(p)
    _C.gmlake_release_graph(0, 2)
    a.empty_cache()
    st = a.stats()
    assert st["reserved_bytes.all.current"] == 0 and st["active_bytes.all.current"] == 0, st
    assert live() == base, (live(), base)
    assert violations() == 0
    for s in (cap1, cap2, other):
        fake.fake_stream_destroy(s)


def capture_pending_record_stream():
    """A record_stream free is pending (its stream is still busy) when a capture starts: malloc and
    empty_cache during the capture must not query its event (forbidden in global mode)."""
    a = graph_setup()
    s1, s2, cap = (fake.fake_stream_create(0) for _ in range(3))
    q = a.malloc(4 * MiB, s1)
    a.record_stream(q, s2)
    fake.fake_stream_sleep(s2, DELAY_US)
    a.free(q)  # pending on s2's event
    fake.fake_set_capturing(cap, 1)
    _C.gmlake_begin_graph(0, 11)
    p = a.malloc(MiB // 2, cap)
    a.empty_cache()
    assert violations() == 0, "a pending record_stream free was processed during the capture"
    a.free(p)
    fake.fake_set_capturing(cap, 0)
    _C.gmlake_end_graph(0, 11)
    _C.gmlake_release_graph(0, 11)
    fake.fake_stream_sync(s2)
    a.empty_cache()  # after the capture the pending free is processed
    st = a.stats()
    assert st["active_bytes.all.current"] == 0 and st["reserved_bytes.all.current"] == 0, st
    assert violations() == 0
    for s in (s1, s2, cap):
        fake.fake_stream_destroy(s)


def capture_slow_path_other_streams():
    """A slow-path malloc on a capturing stream while other streams hold free blocks (their reuse
    needs an event query), and one on a non-capturing stream during another stream's capture."""
    a = graph_setup()
    s1, s2, cap = (fake.fake_stream_create(0) for _ in range(3))
    a.free(a.malloc(4 * MiB, s1))  # a free block of s1
    fake.fake_set_capturing(cap, 1)
    _C.gmlake_begin_graph(0, 21)
    p = a.malloc(8 * MiB, cap)
    assert violations() == 0, "the slow path on a capturing stream made a forbidden call"
    a.free(a.malloc(4 * MiB, s2))
    q = a.malloc(8 * MiB, s2)  # s2 does not capture; cap does, in global mode
    assert violations() == 0, "the slow path during another stream's capture made a forbidden call"
    a.free(q)
    a.free(p)
    fake.fake_set_capturing(cap, 0)
    _C.gmlake_end_graph(0, 21)
    _C.gmlake_release_graph(0, 21)
    a.empty_cache()
    assert a.stats()["reserved_bytes.all.current"] == 0
    assert violations() == 0
    for s in (s1, s2, cap):
        fake.fake_stream_destroy(s)


def capture_shared_pool():
    """Two graphs captured into one shared pool (torch.cuda.graph(pool=...)) through the pool API:
    the second capture reuses what the first freed; a stream outside the pool's filter never gets
    it; nothing a capture forbids is called; release returns everything."""
    a = glake.Allocator(0, backend="cuda")
    base = live()
    cap, eager = fake.fake_stream_create(0), fake.fake_stream_create(0)
    pool = (42, 7)
    a.create_or_incref_pool(pool)  # the handle, as torch.cuda.graph_pool_handle()
    outputs = []
    for graph in range(2):
        fake.fake_set_capturing(cap, 1)
        a.begin_allocate_to_pool(pool, [cap])
        tmp = a.malloc(6 * MiB, cap)
        if graph == 0:
            first_tmp = tmp
        else:
            assert tmp == first_tmp, "the second graph did not reuse what the first freed"
        outputs.append(a.malloc(2 * MiB, cap))
        a.free(tmp)
        assert a.malloc(6 * MiB, eager) != tmp  # eager work on another stream: the cache, not the pool
        a.end_allocate_to_pool(pool)
        fake.fake_set_capturing(cap, 0)
    assert violations() == 0
    assert a.pool_use_count(pool) == 3
    for _ in range(3):
        a.release_pool(pool)
    for p in outputs:
        assert a.pool_of(p) is None  # the pool was returned: live blocks go to the cache when freed
        a.free(p)
    a.empty_cache()
    st = a.stats()
    assert st["private_pools"] == 0 and st["active_bytes.all.current"] == 12 * MiB, st  # the two eager blocks
    del a
    gc.collect()
    assert live() == base and violations() == 0
    for s in (cap, eager):
        fake.fake_stream_destroy(s)


def capture_record_stream_free():
    """A graph's block used on a second capturing stream (record_stream) and freed during the
    capture: its event is recorded only after the capture (one recorded inside would be a graph
    node, never completing, and querying it is CUDA_ERROR_CAPTURED_EVENT); then it returns to the pool."""
    a = glake.Allocator(0, backend="cuda")
    cap, side = fake.fake_stream_create(0), fake.fake_stream_create(0)
    fake.fake_set_capturing(cap, 1)
    fake.fake_set_capturing(side, 1)  # forked into the capture, as torch's side streams are
    a.begin_allocate_to_pool((5, 0), [cap, side])
    p = a.malloc(4 * MiB, cap)
    a.record_stream(p, side)
    a.free(p)
    assert a.stats()["active_bytes.all.current"] == 4 * MiB  # pending
    q = a.malloc(4 * MiB, cap)
    assert q != p, "a pending record_stream block was reused before its streams were done"
    a.free(q)
    a.empty_cache()
    a.end_allocate_to_pool((5, 0))
    fake.fake_set_capturing(side, 0)
    fake.fake_set_capturing(cap, 0)
    assert violations() == 0
    a.empty_cache()  # no capture: the event is recorded and waited for; the block goes to the pool
    st = a.stats()
    assert st["active_bytes.all.current"] == 0 and st["private_pool_free_bytes"] == 8 * MiB, st
    assert violations() == 0
    a.release_pool((5, 0))
    a.empty_cache()
    assert a.stats()["reserved_bytes.all.current"] == 0
    for s in (cap, side):
        fake.fake_stream_destroy(s)


def gil_released_in_slow_path():
    """A thread inside a slow allocator call (a stitch past the stitched-VA bound waits for the device
    while the stream runs a slow "kernel") does not hold the GIL: this thread runs Python meanwhile.

    Proof without timing: the call has made its stitched range (one reservation more than before)
    and cannot have returned before the stream wrote `marker` (the device synchronisation waits for
    it); so reading the reservation count, then `marker` still 0 while holding the GIL, means Python
    ran while the other thread was inside the call. If the binding kept the GIL, this thread could
    only run before the call or after it returned (when the range is dropped again, or marker is 1):
    the state is never seen and the scenario fails. Retried if this thread was starved throughout.
    """
    slow_us = 500_000
    for attempt in range(3):
        a = glake.Allocator(0, backend="cuda", stitch_va_limit=4 * MiB)
        s = fake.fake_stream_create(0)
        blocks = [a.malloc(4 * MiB, s) for _ in range(6)]
        a.free(blocks[0])
        a.free(blocks[2])
        s1 = a.malloc(8 * MiB, s)  # stitched from blocks 0 and 2
        a.free(s1)
        a.free(blocks[4])
        marker, one = np.zeros(8, np.uint8), np.ones(8, np.uint8)
        fake.fake_stream_sleep(s, slow_us)
        fake.fake_stream_memcpy(s, marker.ctypes.data, one.ctypes.data, 8)
        before = fake.fake_live_reservations()
        out: dict = {}
        # A second stitch (blocks 0, 2, 4): over the bound, the idle first one is dropped after a
        # device synchronisation, which waits for the slow stream.
        t = threading.Thread(target=lambda: out.setdefault("p", a.malloc(12 * MiB, s)))
        t.start()
        seen = False
        while t.is_alive() and not seen:
            inside = fake.fake_live_reservations() > before  # the call has reserved its range...
            seen = inside and marker[0] == 0                 # ...and cannot have returned yet
            time.sleep(0.001)
        t.join()
        assert "p" in out and marker[0] == 1
        st = a.stats()
        assert st["num_stitches"] == 2 and st["num_stitch_gc"] == 1, st
        assert violations() == 0
        a.free(out["p"])
        for i in (1, 3, 5):
            a.free(blocks[i])
        del a
        gc.collect()
        fake.fake_stream_destroy(s)
        if seen:
            return
    raise AssertionError("no Python ran while another thread was inside malloc: the binding holds the GIL")


def chunk_fallback():
    """Run with FAKE_CUDA_MAX_CHUNK=2 MiB: a chunk of chunk_bytes cannot be had, granules can; the
    segment comes in granules instead of failing."""
    a = glake.Allocator(0, backend="cuda", chunk_bytes="32MiB")
    before = live()[0]
    p = a.malloc(20 * MiB)
    assert live()[0] - before == 10, live()
    view(p, 20 * MiB)[:] = pattern(20 * MiB, 4)
    assert np.array_equal(view(p, 20 * MiB), pattern(20 * MiB, 4))
    a.free(p)
    assert violations() == 0


def resume_fails_while(a, starve, restore) -> None:
    """With the device starved (``starve()``, undone by ``restore()`` afterwards), ``a.resume()`` raises
    OutOfMemoryError saying the allocator is still suspended, and it is."""
    starve()
    try:
        a.resume()
        raise AssertionError("resume succeeded without memory")
    except glake.OutOfMemoryError as e:
        assert "still suspended" in str(e), e
    finally:
        restore()
    assert a.suspended


def resume_and_check(a, p: int, n: int, seed: int) -> None:
    """A resume that succeeds and brings back the ``n`` bytes of ``pattern(n, seed)`` at ``p``."""
    a.resume()
    assert not a.suspended
    assert np.array_equal(view(p, n), pattern(n, seed))
    a.free(p)
    assert violations() == 0


def suspend_resume_retry():
    """A resume that cannot get its chunks fails cleanly (still suspended, nothing leaked) and a later
    one restores the data; while suspended the allocator holds no VMM handle."""
    import os

    a = glake.Allocator(0, backend="cuda", chunk_bytes="32MiB")
    base = live()[0]
    p = a.malloc(20 * MiB)  # one 20 MiB chunk
    view(p, 20 * MiB)[:] = pattern(20 * MiB, 6)
    a.suspend()
    held = live()[0]
    assert held == base, (held, base)  # the chunk went back to the driver
    resume_fails_while(  # no 20 MiB chunk to be had while starved
        a, lambda: os.environ.__setitem__("FAKE_CUDA_MAX_CHUNK", str(2 * MiB)),
        lambda: os.environ.pop("FAKE_CUDA_MAX_CHUNK"))
    assert live()[0] == held, live()
    resume_and_check(a, p, 20 * MiB, 6)


def resume_runs_out_midway():
    """Resume maps a slice of chunks at a time while the slices before are copied back: a device that
    runs out after some slices were mapped (and perhaps copied into) undoes them (still suspended, no
    handle or mapping left over), and a later resume restores every byte."""
    a = glake.Allocator(0, backend="cuda", chunk_bytes="2MiB")
    base = live()
    n = 256 * MiB  # 128 chunks: four 64 MiB slices
    p = a.malloc(n)
    view(p, n)[:] = pattern(n, 7)
    a.suspend()
    held = live()
    assert held[0] == base[0] and held[2] == base[2], (held, base)
    creates, maps = fake.fake_calls(b"cuMemCreate"), fake.fake_calls(b"cuMemMap")
    resume_fails_while(a, lambda: fake.fake_fail_creates_after(80),  # two slices and a half
                       lambda: fake.fake_fail_creates_after(-1))
    assert fake.fake_calls(b"cuMemCreate") - creates == 81, "the slices after the failure were not tried"
    assert live() == held, (live(), held)
    assert fake.fake_calls(b"cuMemMap") - maps == 64, "the two slices before the failure were mapped"
    resume_and_check(a, p, n, 7)


if __name__ == "__main__":
    name = sys.argv[1]
    assert _C.backend_name() == "cuda", "run with GLAKE_BACKEND=cuda and the fake libcuda on LD_LIBRARY_PATH"
    globals()[name]()
    print(f"OK {name}")
