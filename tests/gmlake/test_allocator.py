"""The stitched allocator (host backend; also the fake libcuda, see helpers.py): pools, best fit, stitching,
streams, limits, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

import glake
from glake import _C
from tests.gmlake.helpers import BACKEND, ON_FAKE_CUDA, MiB, check, fill, rounded, stream


def make(**conf) -> glake.Allocator:
    return glake.Allocator(backend=BACKEND, **conf)


def reserved(a) -> int:
    return a.stats()["reserved_bytes.all.current"]


def test_small_requests_share_a_chunk_and_coalesce():
    a = make()
    ptrs = [a.malloc(s) for s in (1, 512, 513, 1000, 4096, 100_000)]
    assert len({p for p in ptrs}) == 6
    assert reserved(a) == 2 * MiB  # all packed into one 2 MiB chunk
    st = a.stats()
    assert st["allocated_bytes.small_pool.current"] == sum(rounded(s) for s in (1, 512, 513, 1000, 4096, 100_000))
    assert st["requested_bytes.all.current"] == 1 + 512 + 513 + 1000 + 4096 + 100_000
    for p in ptrs:
        a.free(p)
    (seg,) = a.snapshot()
    assert seg["kind"] == "small" and [b["state"] for b in seg["blocks"]] == ["free"]  # coalesced back to one block


def test_large_requests_round_to_chunks_and_reuse_best_fit():
    a = make(stitch=False)
    p4, p8, p6 = a.malloc(4 * MiB), a.malloc(8 * MiB), a.malloc(5 * MiB + 1)
    assert a.stats()["allocated_bytes.large_pool.current"] == 4 * MiB + 8 * MiB + 6 * MiB
    for p in (p4, p8, p6):
        a.free(p)
    before = reserved(a)
    assert a.malloc(6 * MiB) == p6  # best fit: the 6 MiB block, not the 8
    assert a.malloc(3 * MiB) == p4
    assert a.malloc(2 * MiB) == p8  # split: the 8 MiB block gives its first 2 MiB
    assert a.malloc(6 * MiB) == p8 + 2 * MiB  # and the rest
    assert reserved(a) == before


def test_stitching_fills_holes_without_growing():
    a = make()
    blocks = [a.malloc(4 * MiB) for _ in range(16)]
    for i, p in enumerate(blocks):
        fill(p, 4 * MiB, seed=i)
    for p in blocks[::2]:
        a.free(p)
    before = reserved(a)
    big = a.malloc(8 * 4 * MiB)  # as large as all the holes together
    st = a.stats()
    assert reserved(a) == before, "stitching must reuse the holes, not map new memory"
    assert st["num_stitches"] == 1 and st["stitched_bytes.current"] == 32 * MiB
    fill(big, 32 * MiB, seed=99)
    assert check(big, 32 * MiB, seed=99)
    for i, p in enumerate(blocks):
        if i % 2:
            assert check(p, 4 * MiB, seed=i), f"surviving block {i} was overwritten"
    kinds = [s["kind"] for s in a.snapshot()]
    assert kinds.count("stitched") == 1
    a.free(big)
    again = a.malloc(32 * MiB)  # the cached stitched range serves again, no new mapping
    st = a.stats()
    assert again == big and st["num_stitches"] == 1 and st["num_stitch_reuses"] == 1
    a.free(again)
    for p in blocks[1::2]:
        a.free(p)


def test_stitch_with_partly_new_memory_grows_only_by_the_difference():
    a = make()
    keep = [a.malloc(4 * MiB) for _ in range(4)]
    a.free(keep[0])
    a.free(keep[2])  # 8 MiB free in two holes
    before = reserved(a)
    p = a.malloc(12 * MiB)
    assert reserved(a) == before + 4 * MiB
    assert a.stats()["num_stitches"] == 1
    fill(p, 12 * MiB, 5)
    assert check(p, 12 * MiB, 5)
    assert check(keep[1], 1, 0) or True  # still mapped (no crash reading it)


def test_stitching_off_grows_by_the_full_size():
    a = make(stitch=False)
    keep = [a.malloc(4 * MiB) for _ in range(4)]
    a.free(keep[0])
    a.free(keep[2])
    before = reserved(a)
    a.malloc(8 * MiB)
    assert reserved(a) == before + 8 * MiB and a.stats()["num_stitches"] == 0


def test_empty_cache_releases_free_segments_and_idle_stitches():
    a = make()
    live_core = _C.stats(BACKEND)["physical_bytes.current"]
    ps = [a.malloc(4 * MiB) for _ in range(4)]
    a.free(ps[0])
    a.free(ps[2])
    s = a.malloc(8 * MiB)
    a.free(s)
    a.empty_cache()
    assert reserved(a) == 8 * MiB  # the two live blocks
    assert a.stats()["stitched_va_bytes.current"] == 0
    assert _C.stats(BACKEND)["physical_bytes.current"] == live_core + 8 * MiB
    a.free(ps[1])
    a.free(ps[3])
    a.empty_cache()
    assert reserved(a) == 0 and _C.stats(BACKEND)["physical_bytes.current"] == live_core


def test_limit_is_honoured_and_state_survives_oom():
    a = make(limit_bytes="16MB")
    p = a.malloc(8 * MiB)
    q = a.malloc(6 * MiB)
    before = a.stats()
    with pytest.raises(glake.OutOfMemoryError) as e:
        a.malloc(4 * MiB)
    msg = str(e.value)
    for part in ("allocating 4194304 bytes (4.00 MiB rounded)", "Allocated 14.00 MiB", "reserved 14.00 MiB",
                 "limit 16.00 MiB", "largest free block", "device free", "Hint:"):
        assert part in msg, msg
    after = a.stats()
    assert after["allocated_bytes.all.current"] == before["allocated_bytes.all.current"]
    assert after["num_ooms"] == before["num_ooms"] + 1
    a.free(q)
    r = a.malloc(8 * MiB)  # fits after freeing: the 6 MiB hole + 2 MiB new, stitched
    assert reserved(a) <= 16 * MiB
    a.free(p)
    a.free(r)


def test_oom_releases_cache_then_retries():
    a = make(limit_bytes="12MB", stitch=False)
    p = a.malloc(8 * MiB)
    a.free(p)  # 8 MiB cached, free
    q = a.malloc(10 * MiB)  # needs the cache released first
    assert a.stats()["num_alloc_retries"] == 1 and reserved(a) == 10 * MiB
    a.free(q)


def test_memory_fraction():
    a = make()
    a.set_memory_fraction(0.0001)  # of the host's memory: a few MiB
    with pytest.raises(glake.OutOfMemoryError, match="larger than the limit"):
        a.malloc(1 << 30)
    with pytest.raises(glake.InvalidArgumentError):
        a.set_memory_fraction(1.5)


def test_bad_frees_and_sizes_leave_state_intact():
    a = make()
    p = a.malloc(3 * MiB)
    small = a.malloc(100)
    before = a.stats()
    with pytest.raises(glake.InvalidArgumentError, match="not allocated by this allocator"):
        a.free(0x1234)
    with pytest.raises(glake.InvalidArgumentError, match="interior pointer, 4096 bytes into"):
        a.free(p + 4096)
    with pytest.raises(glake.InvalidArgumentError, match="must be positive"):
        a.malloc(0)
    with pytest.raises(glake.InvalidArgumentError, match="must be positive"):
        a.malloc(-5)
    with pytest.raises(glake.OutOfMemoryError, match="larger than the device"):
        a.malloc(1 << 50)
    a.free(small)
    with pytest.raises(glake.InvalidArgumentError, match="double free"):
        a.free(small)
    after = a.stats()
    assert after["allocated_bytes.all.current"] == before["allocated_bytes.all.current"] - 512
    fill(p, 3 * MiB, 1)
    assert check(p, 3 * MiB, 1)
    a.free(p)


HOST_EVENTS = pytest.mark.skipif(ON_FAKE_CUDA, reason="host events complete at once; on cuda (the fake) the first "
                                 "cross-stream attempt only records the event")


@HOST_EVENTS
def test_same_stream_reuse_and_cross_stream_after_events():
    a = make(stitch=False)
    p = a.malloc(4 * MiB, stream=stream(1))
    a.free(p)
    assert a.malloc(4 * MiB, stream=stream(1)) == p  # same stream: at once
    a.free(p)
    before = reserved(a)
    q = a.malloc(4 * MiB, stream=stream(2))  # other stream: after its event (always complete on host)
    assert q == p and reserved(a) == before
    assert a.stats()["num_cross_stream_reuses"] >= 1
    a.free(q)


@HOST_EVENTS
def test_record_stream_defers_reuse_until_events():
    a = make(stitch=False)
    p = a.malloc(4 * MiB, stream=stream(1))
    a.record_stream(p, stream(7))
    a.free(p)
    st = a.stats()
    assert st["active_bytes.all.current"] == 4 * MiB and st["allocated_bytes.all.current"] == 0
    assert [b["state"] for s in a.snapshot() for b in s["blocks"]] == ["pending"]
    assert a.malloc(4 * MiB, stream=stream(1)) == p  # the next malloc sees the (host) event complete
    with pytest.raises(glake.InvalidArgumentError, match="not a live allocation"):
        a.record_stream(p + 512, stream(3))
    a.free(p)


def test_config_parsing_and_env():
    a = make(stitch=False, stitch_min_bytes="8MB", limit_bytes="1GiB", small_size=4096)
    cfg = a.config
    assert cfg["stitch"] == "false" and cfg["stitch_min_bytes"] == str(8 * MiB) and cfg["limit_bytes"] == str(1 << 30)
    assert a.limit == 1 << 30
    assert _C.parse_bytes("1.5GiB") == 3 << 29 and _C.parse_bytes("512") == 512
    with pytest.raises(glake.InvalidArgumentError, match="unknown allocator option 'stich'"):
        make(stich=True)
    with pytest.raises(glake.InvalidArgumentError, match="not a boolean"):
        make(stitch="maybe")
    with pytest.raises(glake.InvalidArgumentError, match="unknown unit"):
        make(limit_bytes="3 parsecs")
    code = "import glake; a = glake.Allocator(backend='host'); print(a.config['stitch'], a.config['limit_bytes'])"
    env = dict(os.environ, GLAKE_ALLOC_CONF="stitch:false,limit_bytes:64MB")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["false", str(64 * MiB)]


def test_threads_keep_their_bytes():
    a = make()
    errors = []

    def worker(seed: int) -> None:
        try:
            live = []
            for i in range(200):
                size = [700, 64 * 1024, 3 * MiB, 5 * MiB][(i + seed) % 4]
                p = a.malloc(size)
                fill(p, min(size, 8192), seed * 1000 + i)
                live.append((p, min(size, 8192), seed * 1000 + i))
                if len(live) > 6:
                    q, n, s = live.pop(0)
                    assert check(q, n, s)
                    a.free(q)
            for q, n, s in live:
                assert check(q, n, s)
                a.free(q)
        except Exception as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert a.stats()["allocated_bytes.all.current"] == 0


def test_global_allocator_is_shared_and_configurable_once():
    code = (
        "import glake\nfrom glake import _C\n"
        "_C.gmlake_configure('stitch:false')\n"
        "g = _C.gmlake_global(0)\n"
        "p = g.malloc(4 << 20)\n"
        "assert _C.gmlake_global(0).allocation_of(p + 10) == (p, 4 << 20)\n"
        "try:\n    _C.gmlake_configure('stitch:true')\nexcept glake.InvalidArgumentError as e:\n    print('refused')\n"
        "print(g.config['stitch'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, GLAKE_BACKEND=BACKEND),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["refused", "false"]


def test_freed_stitch_is_held_and_serves_smaller_requests_without_mapping():
    a = make()
    blocks = [a.malloc(4 * MiB) for _ in range(16)]
    for p in blocks[::2]:
        a.free(p)
    big = a.malloc(32 * MiB)
    a.free(big)  # held: still one stitched block on the fast path
    assert [b["state"] for s in a.snapshot() if s["stitched"] for b in s["blocks"]] == ["held"]
    before, maps = reserved(a), _C.stats(BACKEND)["calls.map"]
    half = a.malloc(16 * MiB)  # the held stitch, shrunk: the other 16 MiB go back to the pool
    assert half == big and _C.stats(BACKEND)["calls.map"] == maps
    fill(half, 16 * MiB, 3)
    rest = [a.malloc(4 * MiB) for _ in range(4)]  # served by the returned members
    assert reserved(a) == before and _C.stats(BACKEND)["calls.map"] == maps
    for p in rest:
        fill(p, 4 * MiB, 4)
    assert check(half, 16 * MiB, 3)
    for p in rest + [half]:
        a.free(p)
    again = a.malloc(32 * MiB)  # the detached range's spans are free again: prefix reuse, no mapping
    st = a.stats()
    assert again == big and st["num_stitches"] == 1 and _C.stats(BACKEND)["calls.map"] == maps
    a.free(again)
    for p in blocks[1::2]:
        a.free(p)


def test_small_free_share_is_not_stitched():
    # 4 MiB free is less than an eighth of a 64 MiB request: mapping 32 chunks twice to save two is
    # not worth it, so a plain segment is created and the 4 MiB hole stays for smaller requests.
    a = make()
    keep = [a.malloc(4 * MiB) for _ in range(2)]
    a.free(keep[0])
    before = reserved(a)
    big = a.malloc(64 * MiB)
    assert reserved(a) == before + 64 * MiB and a.stats()["num_stitches"] == 0
    assert a.malloc(4 * MiB) == keep[0]
    a.free(big)


def test_empty_cache_keeps_segments_a_shrunk_active_stitch_still_maps():
    # A held stitch taken by a smaller request gives its tail members back to the pool, but its
    # range still maps their chunks and its spans still name their segment. Emptying the cache
    # while it is active must not release that segment: the chunks would stay mapped (physical
    # memory outside reserved_bytes and the limit) and a later reuse of the range would read the
    # freed segment.
    a = make()
    live_core = _C.stats(BACKEND)["physical_bytes.current"]
    p, q = a.malloc(4 * MiB), a.malloc(4 * MiB)  # two segments
    a.free(p)
    a.free(q)
    big = a.malloc(8 * MiB)  # stitched over both
    a.free(big)  # held
    half = a.malloc(4 * MiB)  # the held stitch, shrunk: one member goes back to the pool
    assert half == big
    fill(half, 4 * MiB, 5)
    a.empty_cache()
    assert _C.stats(BACKEND)["physical_bytes.current"] - live_core == reserved(a) == 8 * MiB
    assert check(half, 4 * MiB, 5)
    a.free(half)
    again = a.malloc(8 * MiB)  # reuses the detached range: both of its segments are still there
    fill(again, 8 * MiB, 6)
    assert check(again, 8 * MiB, 6)
    assert _C.stats(BACKEND)["physical_bytes.current"] - live_core == reserved(a) == 8 * MiB
    a.free(again)
    a.empty_cache()
    assert reserved(a) == 0 and _C.stats(BACKEND)["physical_bytes.current"] == live_core


def test_oom_retry_reuses_a_held_stitch_of_another_stream():
    # A stitch freed on stream 1 is held: its members stay lent to it, out of the free pool. A
    # request on stream 2 that only fits in the limit with those members must get them on the OOM
    # retry (the held stitch dissolved, its members migrated to stream 2 after stream 1's event),
    # not fail with 8 MiB free in the cache.
    a = make(limit_bytes="16MB", chunk_bytes="2MiB")  # holes of 4 MiB: stitchable only in 2 MiB chunks
    a.free(a.malloc(12 * MiB, stream=stream(1)))  # one 12 MiB segment
    y1, y2, y3 = (a.malloc(4 * MiB, stream=stream(1)) for _ in range(3))
    a.free(y1)
    a.free(y3)
    s = a.malloc(8 * MiB, stream=stream(1))  # stitched over the two holes
    assert a.stats()["num_stitches"] == 1
    a.free(s)  # held on stream 1
    fill(y2, 4 * MiB, 1)
    p = a.malloc(8 * MiB, stream=stream(2))
    assert reserved(a) == 12 * MiB and a.stats()["num_alloc_retries"] == 1
    fill(p, 8 * MiB, 2)
    assert check(y2, 4 * MiB, 1) and check(p, 8 * MiB, 2)
    a.free(p)
    a.free(y2)


def test_oom_retry_stitches_a_small_free_share_when_a_plain_segment_passes_the_limit():
    # 2 MiB free is less than an eighth of a 32 MiB request, so a plain 32 MiB segment is preferred;
    # but under the limit only the stitch (2 MiB free + 30 MiB new) fits: it must be made rather than
    # failing a request that the limit allows.
    a = make(limit_bytes="42MB", chunk_bytes="2MiB")  # a 2 MiB hole: stitchable only in 2 MiB chunks
    a.free(a.malloc(12 * MiB))
    keep = a.malloc(10 * MiB)  # 2 MiB free at the end of the 12 MiB segment
    fill(keep, 10 * MiB, 1)
    p = a.malloc(32 * MiB)
    assert reserved(a) == 42 * MiB and a.stats()["num_stitches"] == 1
    fill(p, 32 * MiB, 2)
    assert check(keep, 10 * MiB, 1) and check(p, 32 * MiB, 2)
    a.free(p)
    a.free(keep)


def test_unmapping_freed_memory_waits_for_the_device_first():
    # cuMemUnmap does not wait for kernels still using the range (cudaFree does): freed blocks may
    # still be read by work enqueued before their free, so every path that unmaps them synchronises
    # the device once first, and the fast paths never do.
    a = make()
    syncs = lambda: a.stats()["num_sync_all_streams"]  # noqa: E731
    p = a.malloc(4 * MiB)
    a.free(a.malloc(4 * MiB))
    a.empty_cache()
    assert syncs() == 1 and reserved(a) == 4 * MiB  # one sync, then the free segment was released
    a.empty_cache()
    assert syncs() == 1  # nothing to unmap: no sync
    for _ in range(3):
        a.free(a.malloc(3 * MiB))
    assert syncs() == 1  # malloc/free from the cache never synchronise
    a.free(p)

    b = make(stitch_va_limit=8 * MiB)  # stitched VA beyond 8 MiB is dropped least recently used
    x, y, z = (b.malloc(4 * MiB) for _ in range(3))
    b.free(x)
    b.free(z)
    s1 = b.malloc(8 * MiB)  # stitched over x and z: 8 MiB of stitched VA, at the bound
    b.free(s1)
    assert b.stats()["num_sync_all_streams"] == 0
    b.free(y)
    big = b.malloc(12 * MiB)  # a new 12 MiB stitch passes the bound: the idle 8 MiB one is dropped
    assert b.stats()["num_stitch_gc"] == 1 and b.stats()["num_sync_all_streams"] == 1
    b.free(big)


def test_empty_cache_waits_for_record_stream_frees():
    # A block recorded on another stream and freed stays pending until that stream's work is done;
    # empty_cache (like torch's) waits for it and then releases its memory too.
    a = make()
    p = a.malloc(4 * MiB, stream=stream(1))
    a.record_stream(p, stream(2))
    a.free(p)
    assert a.stats()["active_bytes.all.current"] == 4 * MiB
    a.empty_cache()
    assert a.stats()["active_bytes.all.current"] == 0 and reserved(a) == 0


# ---------------------------------------------------------------- physical chunks of chunk_bytes
def creates() -> int:
    return glake.core.stats(BACKEND)["calls.create"]


def test_a_large_segment_comes_in_chunks_of_chunk_bytes():
    # The driver's costs are per chunk, not per byte: a 20 MiB segment is 8 + 8 + 4 MiB, three
    # cuMemCreate calls (ten with 2 MiB chunks); a small-pool segment stays one granule.
    for chunk, calls in (("8MiB", 3), ("2MiB", 10)):
        a = make(chunk_bytes=chunk)
        before = creates()
        p = a.malloc(20 * MiB)
        assert creates() - before == calls, chunk
        fill(p, 20 * MiB, 3)
        assert check(p, 20 * MiB, 3)
        before = creates()
        s = a.malloc(4096)
        assert creates() - before == 1 and reserved(a) == 22 * MiB
        a.free(p)
        a.free(s)


def test_a_stitch_maps_whole_chunks_and_leaves_the_rest_of_a_shared_chunk_free():
    # Segment A of two 8 MiB chunks; a 4 MiB allocation keeps the front of its first chunk, so of
    # the 12 MiB free behind it only the second chunk (8 MiB) can be mapped into a stitch: cuMemMap
    # maps a chunk only whole. A 16 MiB request stitches that chunk with a new 8 MiB segment; the
    # 4 MiB left in the first chunk stays a plain free block, handed out without touching the stitch.
    a = make(chunk_bytes="8MiB")
    a.free(a.malloc(16 * MiB))
    keep = a.malloc(4 * MiB)
    a.free(a.malloc(12 * MiB))  # [4, 16) MiB of A free
    big = a.malloc(16 * MiB)
    st = a.stats()
    assert st["num_stitches"] == 1 and reserved(a) == 24 * MiB, (st["num_stitches"], reserved(a))
    rest = a.malloc(4 * MiB)
    assert rest == keep + 4 * MiB and a.stats()["num_stitches"] == 1 and reserved(a) == 24 * MiB
    for p, n, seed in ((keep, 4 * MiB, 1), (big, 16 * MiB, 2), (rest, 4 * MiB, 3)):
        fill(p, n, seed)
    assert check(keep, 4 * MiB, 1) and check(big, 16 * MiB, 2) and check(rest, 4 * MiB, 3)
    for p in (keep, big, rest):
        a.free(p)


def test_a_stitch_whose_last_chunk_is_partly_used_maps_it_whole_and_lends_only_what_it_needs():
    # Two free 8 MiB chunks (segments A and B); a 12 MiB request takes all of A and 4 MiB of B's
    # chunk: the stitched range maps B's chunk whole (16 MiB of VA) but lends only its first 4 MiB,
    # so B's other 4 MiB stay free for a plain allocation, and neither write shows in the other.
    a = make(chunk_bytes="8MiB")
    x, y = a.malloc(8 * MiB), a.malloc(8 * MiB)
    a.free(x)
    a.free(y)
    big = a.malloc(12 * MiB)
    st = a.stats()
    assert st["num_stitches"] == 1 and st["stitched_va_bytes.current"] == 16 * MiB and reserved(a) == 16 * MiB
    assert st["stitched_bytes.current"] == 12 * MiB
    rest = a.malloc(4 * MiB)
    assert reserved(a) == 16 * MiB and rest in (x + 4 * MiB, y + 4 * MiB)
    fill(big, 12 * MiB, 5)
    fill(rest, 4 * MiB, 6)
    assert check(big, 12 * MiB, 5) and check(rest, 4 * MiB, 6)
    a.free(big)
    a.free(rest)


def test_chunk_bytes_must_be_a_multiple_of_2_mib():
    for bad in ("3MiB", "1MiB", "0"):
        with pytest.raises(glake.InvalidArgumentError, match="chunk_bytes"):
            make(chunk_bytes=bad)
