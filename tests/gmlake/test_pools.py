"""Private pools (torch's MempoolId_t semantics) of the stitched allocator, on the host backend.

A pool is allocated to while begin_allocate_to_pool..end_allocate_to_pool route its streams to it;
what its allocations free stays with it (reused only by the pool) until release_pool brings its use
count to 0, when the free memory returns to the global cache.
"""

from __future__ import annotations

import pytest

import glake
from glake import _C
from tests.gmlake.helpers import BACKEND, MiB, check, fill
from tests.gmlake.helpers import stream as stream_of

P, Q = (7, 1), (8, 2)


@pytest.fixture
def a():
    phys = _C.stats(BACKEND)["physical_bytes.current"]
    alloc = glake.Allocator(backend=BACKEND)
    yield alloc
    alloc._impl = None  # the only reference: its destructor returns everything, pools included
    assert _C.stats(BACKEND)["physical_bytes.current"] == phys


def blocks(a: glake.Allocator):
    return [b for seg in a.snapshot() if not seg["stitched"] for b in seg["blocks"]]


def reserved(a: glake.Allocator) -> int:
    return a.stats()["reserved_bytes.all.current"]


def overlaps(p: int, n: int, q: int, m: int) -> bool:
    return p < q + m and q < p + n


def test_use_counts_and_errors(a):
    assert a.pool_use_count(P) == 0
    a.create_or_incref_pool(P)
    a.create_or_incref_pool(P)
    assert a.pool_use_count(P) == 2
    s = stream_of(1)
    a.begin_allocate_to_pool(P, [s])  # increfs, as torch's
    assert a.pool_use_count(P) == 3
    with pytest.raises(glake.InvalidArgumentError, match="already allocating"):
        a.begin_allocate_to_pool(P, [s])
    assert a.pool_use_count(P) == 3, "a refused begin changed the use count"
    a.end_allocate_to_pool(P)
    with pytest.raises(glake.InvalidArgumentError, match="not allocating"):
        a.end_allocate_to_pool(P)
    with pytest.raises(glake.InvalidArgumentError, match="unknown"):
        a.release_pool(Q)
    with pytest.raises(glake.InvalidArgumentError, match="no pool"):
        a.create_or_incref_pool((0, 0))
    for _ in range(3):
        a.release_pool(P)
    assert a.pool_use_count(P) == 0
    with pytest.raises(glake.InvalidArgumentError):
        a.release_pool(P)
    assert a.stats()["private_pools"] == 0


@pytest.mark.parametrize("size", [3000, 8 * MiB])
def test_memory_freed_in_a_pool_is_reused_by_its_next_allocation(a, size):
    s = stream_of(1)
    a.begin_allocate_to_pool(P, [s])
    p = a.malloc(size, s)
    assert a.pool_of(p) == P and a.pool_of(p + size - 1) == P
    a.free(p)
    r = reserved(a)
    q = a.malloc(size, s)  # the same capture, later: reuses what it freed
    assert q == p and a.pool_of(q) == P
    assert reserved(a) == r
    other = a.malloc(size, stream_of(2))  # a stream the filter refuses: global
    assert a.pool_of(other) is None
    a.free(q)
    a.free(other)
    a.end_allocate_to_pool(P)
    a.release_pool(P)


def test_global_allocations_never_get_a_live_pools_free_memory(a):
    s = stream_of(1)
    a.begin_allocate_to_pool(P, [s])
    pool_blocks = [a.malloc(8 * MiB, s) for _ in range(3)]
    a.end_allocate_to_pool(P)
    for p in pool_blocks:
        a.free(p)
    assert a.stats()["private_pool_free_bytes"] == 24 * MiB
    a.empty_cache()  # a pool's free memory is not the cache's: nothing released
    assert reserved(a) == 24 * MiB
    # Best fit, held stitches and stitching all look only at the global cache.
    mine = [a.malloc(8 * MiB, s), a.malloc(4 * MiB, s), a.malloc(16 * MiB, s)]
    a.free(mine[1])
    mine[1] = a.malloc(12 * MiB, s)  # stitched from the global 4 MiB and new memory, never the pool's
    for p, n in zip(mine, (8 * MiB, 12 * MiB, 16 * MiB)):
        assert a.pool_of(p) is None
        for q in pool_blocks:
            assert not overlaps(p, n, q, 8 * MiB)
    for b in blocks(a):  # no block of the pool is lent to a global stitch
        if b["state"] == "stitched":
            assert b["pool"] is None
    free_pool = [b for b in blocks(a) if b["pool"] == P]
    assert sum(b["size"] for b in free_pool) == 24 * MiB and all(b["state"] == "free" for b in free_pool)
    for p in mine:
        a.free(p)
    a.release_pool(P)
    a.empty_cache()
    assert reserved(a) == 0


def test_two_graphs_sharing_one_pool(a):
    s = stream_of(1)
    a.create_or_incref_pool(P)  # the shared handle (torch.cuda.graph_pool_handle())
    a.begin_allocate_to_pool(P, [s])  # graph 1
    x = a.malloc(6 * MiB, s)
    fill(x, 4096, 1)
    keep = a.malloc(2 * MiB, s)  # an output graph 1 keeps
    a.free(x)
    a.end_allocate_to_pool(P)
    a.begin_allocate_to_pool(P, [s])  # graph 2 reuses what graph 1 freed
    r = reserved(a)
    y = a.malloc(6 * MiB, s)
    assert y == x and reserved(a) == r
    a.free(y)
    a.end_allocate_to_pool(P)
    assert a.pool_use_count(P) == 3
    for _ in range(3):
        a.release_pool(P)
    assert a.pool_of(keep) is None  # released: its live blocks now belong to the global cache
    a.free(keep)
    a.empty_cache()
    assert reserved(a) == 0


def test_release_returns_free_memory_to_the_cache(a):
    s = stream_of(1)
    a.begin_allocate_to_pool(P, [s])
    p = a.malloc(8 * MiB, s)
    a.free(p)
    a.end_allocate_to_pool(P)
    r = reserved(a)
    assert a.malloc(8 * MiB, s) != p  # the pool lives: new memory
    a.release_pool(P)
    assert a.stats()["private_pools"] == 0 and a.stats()["private_pool_free_bytes"] == 0
    assert reserved(a) == r + 8 * MiB, "release changed what is reserved"
    assert all(b["pool"] is None for b in blocks(a))
    q = a.malloc(8 * MiB, s)  # a global allocation now reuses the pool's memory
    assert q == p
    assert reserved(a) == r + 8 * MiB


def test_live_pool_blocks_freed_after_release_go_global(a):
    s = stream_of(1)
    a.begin_allocate_to_pool(P, [s])
    p = a.malloc(8 * MiB, s)
    fill(p, 4096, 3)
    a.end_allocate_to_pool(P)
    a.release_pool(P)
    assert check(p, 4096, 3)
    a.free(p)
    assert a.stats()["private_pool_free_bytes"] == 0
    assert a.malloc(8 * MiB, s) == p


def test_release_while_another_pool_routes_waits(a):
    """Returning memory needs a device synchronisation, refused while a pool is allocated to (a
    capture may be under way): the released pool keeps its memory, blocks freed meanwhile included,
    until the next release or empty_cache with no pool routing."""
    s1, s2 = stream_of(1), stream_of(2)
    a.begin_allocate_to_pool(P, [s1])
    p, live = a.malloc(8 * MiB, s1), a.malloc(4 * MiB, s1)
    a.free(p)
    a.end_allocate_to_pool(P)
    a.begin_allocate_to_pool(Q, [s2])
    syncs = a.stats()["num_sync_all_streams"]
    a.release_pool(P)
    assert a.stats()["num_sync_all_streams"] == syncs
    assert a.pool_use_count(P) == 0 and a.stats()["private_pools"] == 2  # freeable, not yet returned
    a.free(live)  # goes to P's free lists: P's memory may still be in use by a replay
    assert a.stats()["private_pool_free_bytes"] == 12 * MiB
    g = a.malloc(8 * MiB, s1)  # s1 is not routed now: global, and not P's memory
    assert not overlaps(g, 8 * MiB, p, 8 * MiB)
    a.empty_cache()
    assert a.stats()["private_pools"] == 2
    a.end_allocate_to_pool(Q)
    a.empty_cache()  # now: P's memory returns (one synchronisation), Q's stays with Q
    st = a.stats()
    assert st["private_pools"] == 1 and st["num_sync_all_streams"] > syncs
    a.free(g)
    a.release_pool(Q)
    a.empty_cache()
    assert reserved(a) == 0


def test_a_released_pool_can_be_taken_up_again_before_its_memory_returns(a):
    s1, s2 = stream_of(1), stream_of(2)
    a.begin_allocate_to_pool(P, [s1])
    p = a.malloc(8 * MiB, s1)
    a.free(p)
    a.end_allocate_to_pool(P)
    a.begin_allocate_to_pool(Q, [s2])
    a.release_pool(P)  # freeable, waiting
    a.begin_allocate_to_pool(P, [s1])  # re-captured: the same pool, its memory as it was
    assert a.pool_use_count(P) == 1
    assert a.malloc(8 * MiB, s1) == p
    a.end_allocate_to_pool(P)
    a.end_allocate_to_pool(Q)


def test_the_first_pool_begun_whose_filter_accepts_owns_the_allocation(a):
    s1, s2 = stream_of(1), stream_of(2)
    a.begin_allocate_to_pool(P, [s1])
    a.begin_allocate_to_pool(Q, [s1, s2])
    x, y, z = a.malloc(4 * MiB, s1), a.malloc(4 * MiB, s2), a.malloc(4 * MiB, 0)
    assert (a.pool_of(x), a.pool_of(y), a.pool_of(z)) == (P, Q, None)
    snap = {b["address"]: b["pool"] for b in blocks(a) if b["state"] == "allocated"}
    assert snap == {x: P, y: Q, z: None}
    a.end_allocate_to_pool(P)
    assert a.pool_of(a.malloc(4 * MiB, s1)) == Q
    a.end_allocate_to_pool(Q)


def test_pool_free_blocks_coalesce_only_with_the_pools_own(a):
    s = stream_of(1)
    a.free(a.malloc(8 * MiB, s))  # one global free 8 MiB block
    a.begin_allocate_to_pool(P, [s])
    x = a.malloc(2 * MiB, s)  # carved from it: the pool's; the 6 MiB rest stays global
    y = a.malloc(2 * MiB, s)
    a.end_allocate_to_pool(P)
    assert reserved(a) == 8 * MiB and y == x + 2 * MiB
    a.free(x)
    a.free(y)
    free = sorted((b["address"], b["size"], b["pool"]) for b in blocks(a))
    assert free == [(x, 4 * MiB, P), (x + 4 * MiB, 4 * MiB, None)], free  # P's two merged; not with global
    g = a.malloc(4 * MiB, s)  # global best fit: the global 4 MiB, never the pool's
    assert g == x + 4 * MiB
    a.free(g)
    a.release_pool(P)  # the pool's block joins the global cache and coalesces there
    assert [(b["size"], b["pool"]) for b in blocks(a)] == [(8 * MiB, None)]


def test_pool_stitches_stay_with_the_pool(a):
    s = stream_of(1)
    parts = [a.malloc(4 * MiB, s) for _ in range(4)]
    for p in parts[::2]:
        a.free(p)
    a.begin_allocate_to_pool(P, [s])
    big = a.malloc(8 * MiB, s)  # stitched from two global 4 MiB holes: the stitch and its members are P's
    assert a.stats()["num_stitches"] == 1 and a.pool_of(big) == P
    assert [b["pool"] for b in blocks(a) if b["state"] == "stitched"] == [P, P]
    a.free(big)  # a held stitch of the pool
    a.empty_cache()  # neither dropped nor dissolved by the global paths
    assert a.stats()["num_stitch_gc"] == 0
    assert a.malloc(8 * MiB, s) == big and a.stats()["num_stitch_reuses"] == 1
    a.free(big)
    a.end_allocate_to_pool(P)
    a.release_pool(P)
    assert all(b["pool"] is None for b in blocks(a))
    assert a.malloc(8 * MiB, s) == big  # the held stitch is now the cache's
    a.free(big)
    for p in parts[1::2]:
        a.free(p)
    a.empty_cache()
    assert reserved(a) == 0


def test_record_stream_frees_of_a_pool_wait_then_return_to_the_pool(a):
    s1, s2 = stream_of(1), stream_of(2)
    a.begin_allocate_to_pool(P, [s1])
    p = a.malloc(8 * MiB, s1)
    a.record_stream(p, s2)
    a.free(p)  # pending: its event is recorded only once no pool is allocated to
    assert a.stats()["active_bytes.all.current"] == 8 * MiB
    assert a.stats()["num_events_created"] == 0
    a.end_allocate_to_pool(P)
    a.empty_cache()  # waits for the event; the block goes to the pool, not the cache
    st = a.stats()
    assert st["active_bytes.all.current"] == 0 and st["private_pool_free_bytes"] == 8 * MiB
    assert reserved(a) == 8 * MiB
    a.begin_allocate_to_pool(P, [s1])
    assert a.malloc(8 * MiB, s1) == p
    a.end_allocate_to_pool(P)


def test_record_stream_events_are_reused(a):
    s1, s2 = stream_of(1), stream_of(2)
    for _ in range(20):
        p = a.malloc(4 * MiB, s1)
        a.record_stream(p, s2)
        a.free(p)
        a.empty_cache()  # the event completes and goes back to the allocator's event pool
    st = a.stats()
    assert st["num_events_created"] == 1, st["num_events_created"]
    assert st["active_bytes.all.current"] == 0


def test_graph_wrappers_are_pools():
    """gmlake_begin_graph/end_graph/release_graph (glake.torch's fallback) are pool (graph, 0), routed
    to capturing streams (none on the host backend), on the process-wide allocator."""
    g = _C.gmlake_global(0)
    graph = 0xC0FFEE
    _C.gmlake_begin_graph(0, graph)
    assert g.pool_use_count(graph, 0) == 1
    with pytest.raises(glake.InvalidArgumentError):
        _C.gmlake_begin_graph(0, graph)  # already capturing into it
    p = g.malloc(4 * MiB, 0)  # the default stream does not capture: global
    assert g.pool_of(p) is None
    g.free(p)
    _C.gmlake_end_graph(0, graph)
    _C.gmlake_end_graph(0, graph)  # tolerated, as before
    _C.gmlake_release_graph(0, graph)
    assert g.pool_use_count(graph, 0) == 0
    _C.gmlake_release_graph(0, graph)  # unknown now: a no-op
    g.empty_cache()
    with pytest.raises(glake.InvalidArgumentError):
        _C.gmlake_begin_graph(0, 0)
