"""Random malloc/free/record_stream/empty_cache sequences, under several configurations, keep every
invariant of the stitched allocator."""

from __future__ import annotations

import os

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
        st.tuples(st.just("record_stream"), st.integers(0, 1 << 30), st.sampled_from([0, 1, 2])),
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
])
CANARY = 4096  # bytes checked at each end of an allocation


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
@given(ops=OPS, conf=CONFS)
def test_random_sequences_keep_invariants(ops, conf):
    phys_before = _C.stats(BACKEND)["physical_bytes.current"]
    a = glake.Allocator(backend=BACKEND, limit_bytes=LIMIT, **conf)
    live: dict = {}
    seed = 0
    for op, arg, stream in ops:
        if op == "malloc":
            try:
                p = a.malloc(arg, stream=stream_of(stream))
            except glake.OutOfMemoryError:
                assert sum(rounded(s) for s, _ in live.values()) + rounded(arg) > LIMIT - 4 * MiB
                continue
            seed += 2
            fill(p, min(arg, CANARY), seed)
            if arg >= 2 * CANARY:
                fill(p + arg - CANARY, CANARY, seed + 1)
            live[p] = (arg, seed)
        elif op == "free" and live:
            p = sorted(live)[arg % len(live)]
            a.free(p)
            del live[p]
        elif op == "empty_cache":
            a.empty_cache()
        elif op == "record_stream" and live:  # used on another stream too: its free is deferred
            a.record_stream(sorted(live)[arg % len(live)], stream_of(stream))
        assert_invariants(a, live, phys_before)
    for p in list(live):
        a.free(p)
    a.empty_cache()
    assert a.stats()["reserved_bytes.all.current"] == 0
    del a
    assert _C.stats(BACKEND)["physical_bytes.current"] == phys_before
