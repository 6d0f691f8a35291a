"""Random malloc/free/record_stream/empty_cache sequences, with private pools begun, ended, shared
and released in between, under several configurations, keep every invariant of the stitched
allocator."""

from __future__ import annotations

import os

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import glake
from glake import _C
from tests.gmlake.helpers import BACKEND, MiB, check, fill, rounded
from tests.gmlake.helpers import stream as stream_of

SIZES = st.one_of(
    st.integers(1, 4096),                 # small pool
    st.integers(4097, MiB),               # small pool, large end
    st.integers(MiB + 1, 12 * MiB),       # large pool, often stitched
    st.sampled_from([2 * MiB, 4 * MiB, 8 * MiB]),
)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("malloc"), SIZES, st.sampled_from([0, 0, 0, 1])),
        st.tuples(st.just("free"), st.integers(0, 1 << 30), st.just(0)),
        st.tuples(st.just("empty_cache"), st.just(0), st.just(0)),
        st.tuples(st.just("suspend_resume"), st.integers(0, 1 << 30), st.just(0)),
        st.tuples(st.just("record_stream"), st.integers(0, 1 << 30), st.sampled_from([0, 1, 2])),
        st.tuples(st.just("malloc"), SIZES, st.sampled_from([0, 1])),
        # private pools (1, 0) and (2, 0): begin routing the streams of a bit mask, end, incref, release
        st.tuples(st.sampled_from(["begin_pool", "begin_pool", "end_pool", "incref_pool", "release_pool"]),
                  st.sampled_from([1, 2]), st.integers(1, 7)),
    ),
    min_size=1,
    max_size=60,
)
LIMIT = 96 * MiB
CONFS = st.sampled_from([  # the defaults, then the knobs that change which path a request takes
    {},
    {"stitch_min_bytes": 2 * MiB},
    {"stitch_va_limit": 16 * MiB},   # detached stitches dropped least-recently-used all the time
    {"stitch": False},
    {"chunk_bytes": 2 * MiB},        # GMLake's granule chunks: every free granule stitchable
    {"chunk_bytes": 4 * MiB},        # segments of several chunks, block edges inside chunks
])
CANARY = 4096  # bytes checked at each end of an allocation


class PoolModel:
    """What the test expects of private pools: use counts, routing (in order of begin), and the pool
    each live allocation was routed to."""

    def __init__(self) -> None:
        self.counts: dict = {}
        self.routing: list = []  # [(pool, streams)]
        self.owner: dict = {}    # live ptr -> pool (None: global)
        self.generation: dict = {}  # pool -> times its use count fell to 0
        self.born: dict = {}        # live ptr -> its pool's generation when it was allocated

    def route(self, stream: int):
        return next((pool for pool, streams in self.routing if stream in streams), None)


def assert_pools(a: glake.Allocator, live: dict, model: PoolModel) -> None:
    for (pool, _), n in model.counts.items():
        assert a.pool_use_count((pool, 0)) == n
    for p in live:
        want = model.owner[p]
        got = a.pool_of(p)
        # A pool in use never loses its blocks; a released one gives them to the cache once it is
        # returned (at a release, empty_cache or OOM retry with no pool routing).
        if want is not None and model.counts.get((want, 0), 0) > 0 and model.born[p] == model.generation.get(want, 0):
            assert got == (want, 0), (hex(p), got, want)
        else:
            assert got in (None, (want, 0) if want else None), (hex(p), got, want)
    snap = a.snapshot()
    stitch_pool = {s["address"]: s["blocks"][0]["pool"] for s in snap if s["stitched"]}
    for seg in snap:
        for b in seg["blocks"]:
            if b["pool"] is not None:  # only pools still alive (used, or released and not yet returned)
                assert b["pool"][0] in (1, 2) and b["pool"] in {(q, 0) for q, _ in model.counts}
            if b["state"] == "stitched":  # a stitch and its members belong to the same owner
                assert b["pool"] == stitch_pool[b["lent_to"]], (b, stitch_pool)


def assert_invariants(a: glake.Allocator, live: dict, phys_before: int) -> None:
    st_ = a.stats()
    snap = a.snapshot()
    # Stats match a recount of the live allocations.
    assert st_["allocation.all.current"] == len(live)
    assert st_["allocated_bytes.all.current"] == sum(rounded(s) for s, _ in live.values())
    assert st_["requested_bytes.all.current"] == sum(s for s, _ in live.values())
    # Every chunk is accounted for: reserved = the segments' sizes = what the core holds for us.
    assert st_["reserved_bytes.all.current"] == sum(s["size"] for s in snap if not s["stitched"])
    assert _C.stats(BACKEND)["physical_bytes.current"] - phys_before == st_["reserved_bytes.all.current"]
    assert st_["reserved_bytes.all.current"] <= LIMIT
    for p, (s, _) in live.items():
        assert a.allocation_of(p + s - 1) == (p, s)
    # Allocated blocks in the snapshot are exactly the live allocations.
    allocated = sorted(b["address"] for s in snap for b in s["blocks"] if b["state"] == "allocated")
    assert allocated == sorted(live)
    # Live blocks never overlap, virtually...
    spans = sorted((p, p + rounded(s)) for p, (s, _) in live.items())
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start
    # ...nor physically: every allocation still holds the bytes written into it.
    for p, (s, seed) in live.items():
        n = min(s, CANARY)
        assert check(p, n, seed), f"allocation at {p:#x} lost its contents"
        if s >= 2 * CANARY:
            assert check(p + s - CANARY, CANARY, seed + 1)


@settings(max_examples=int(os.environ.get("GLAKE_FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, conf=CONFS, start=st.sampled_from([None, (1, 3), (1, 1), (2, 7)]))
def test_random_sequences_keep_invariants(ops, conf, start):
    phys_before = _C.stats(BACKEND)["physical_bytes.current"]
    a = glake.Allocator(backend=BACKEND, limit_bytes=LIMIT, **conf)
    live: dict = {}
    model = PoolModel()
    seed = 0
    if start:  # often a pool is being allocated to from the start (short sequences then still use it)
        ops = [("begin_pool", *start)] + ops
    for op, arg, stream in ops:
        if op == "malloc":
            try:
                p = a.malloc(arg, stream=stream_of(stream))
            except glake.OutOfMemoryError:
                # Private pools keep their free memory from everyone else: count it as used.
                held = a.stats()["private_pool_free_bytes"]
                assert sum(rounded(s) for s, _ in live.values()) + held + rounded(arg) > LIMIT - 4 * MiB
                continue
            model.owner[p] = model.route(stream)
            # Routed to a pool already released (use count 0, still allocated to): the pool is
            # returned at an empty_cache or OOM retry the model does not follow, so a pool of the
            # same id taken up later may or may not be it: no generation is certain (born -1).
            in_use = model.counts.get((model.owner[p], 0), 0) > 0
            model.born[p] = model.generation.get(model.owner[p], 0) if in_use else -1
            seed += 2
            fill(p, min(arg, CANARY), seed)
            if arg >= 2 * CANARY:
                fill(p + arg - CANARY, CANARY, seed + 1)
            live[p] = (arg, seed)
        elif op == "free" and live:
            p = sorted(live)[arg % len(live)]
            a.free(p)
            del live[p]
            del model.owner[p]
        elif op == "empty_cache":
            a.empty_cache()
        elif op == "suspend_resume" and not model.routing:  # (refused while a pool is allocated to)
            a.suspend()
            with pytest.raises(glake.GlakeError, match="suspended"):
                a.malloc(4096)
            if live and arg % 2:  # a free while suspended is bookkeeping only
                p = sorted(live)[arg % len(live)]
                a.free(p)
                del live[p]
                del model.owner[p]
            assert _C.stats(BACKEND)["physical_bytes.current"] == phys_before
            a.resume()
        elif op == "record_stream" and live:  # used on another stream too: its free is deferred
            a.record_stream(sorted(live)[arg % len(live)], stream_of(stream))
        elif op == "begin_pool" and all(pool != arg for pool, _ in model.routing):
            streams = {i for i in range(3) if stream & (1 << i)}
            a.begin_allocate_to_pool((arg, 0), [stream_of(i) for i in sorted(streams)])
            model.routing.append((arg, streams))
            model.counts[(arg, 0)] = model.counts.get((arg, 0), 0) + 1
        elif op == "end_pool" and any(pool == arg for pool, _ in model.routing):
            a.end_allocate_to_pool((arg, 0))
            model.routing = [(pool, s) for pool, s in model.routing if pool != arg]
        elif op == "incref_pool":
            a.create_or_incref_pool((arg, 0))
            model.counts[(arg, 0)] = model.counts.get((arg, 0), 0) + 1
        elif op == "release_pool" and model.counts.get((arg, 0), 0) > 0:
            a.release_pool((arg, 0))
            model.counts[(arg, 0)] -= 1
            if model.counts[(arg, 0)] == 0:
                # Its live blocks stay with it until its memory is returned (at this release, an
                # empty_cache or an OOM retry with no pool routing), then belong to the cache; taken
                # up again before that, it is the same pool. Either is right from here on.
                model.generation[arg] = model.generation.get(arg, 0) + 1
        assert_invariants(a, live, phys_before)
        assert_pools(a, live, model)
    for p in list(live):
        a.free(p)
    for pool, _ in model.routing:
        a.end_allocate_to_pool((pool, 0))
    for (pool, _), n in model.counts.items():
        for _ in range(n):
            a.release_pool((pool, 0))
    a.empty_cache()
    assert a.stats()["private_pools"] == 0
    assert a.stats()["reserved_bytes.all.current"] == 0
    del a
    assert _C.stats(BACKEND)["physical_bytes.current"] == phys_before
