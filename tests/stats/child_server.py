"""A glake process serving stats, for the tests (and for trying the CLI by hand).

    python tests/stats/child_server.py [--tcp 127.0.0.1:0] [--lifetime 120]

Builds a fragmented layout in a private host-backend allocator (every block state: allocated,
free, lent, held, pending; a detached stitched range too), registers it and two sources (one that
fails), serves, prints one JSON line ``{"pid", "addresses", "pool", "expect"}`` and then waits
until stdin closes or ``--lifetime`` seconds pass (bounded: it never outlives a test run).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

M = 1 << 20


def fragmented_layout(alloc) -> dict:
    """Allocate and free so the map shows every state; returns the live allocations to keep.

    Its stitches join holes a granule wide: `alloc` needs chunk_bytes of 2 MiB."""
    whole = alloc.malloc(32 * M)  # a 32 MiB segment, kept busy while the stitches form
    segs = [alloc.malloc(16 * M) for _ in range(3)]
    for p in segs:
        alloc.free(p)  # three 16 MiB segments, cached
    pieces = [alloc.malloc(n * M) for n in (6, 4, 6, 2, 8, 6, 4, 4, 8)]  # the 16 MiB segments split in pieces
    for i in (1, 4):
        alloc.free(pieces[i])  # 4 MiB and 8 MiB free blocks in different segments
    first = alloc.malloc(10 * M)  # no free block fits: stitched from both (S_a)
    alloc.free(first)  # S_a held
    alloc.free(pieces[6])  # a third free block (4 MiB)
    second = alloc.malloc(14 * M)  # more than S_a maps: S_a is detached, S_b stitched
    alloc.free(second)  # S_b held: its members stay lent
    alloc.free(whole)
    big = alloc.malloc(20 * M)  # too big for S_b: split from the 32 MiB segment, 12 MiB stay free
    smalls = [alloc.malloc(n) for n in (512, 4096, 100_000, 20_000, 700, 3000)]
    alloc.free(smalls[1])
    alloc.free(smalls[3])
    alloc.record_stream(pieces[2], 7)  # used on another stream too: freeing it leaves it pending
    alloc.free(pieces[2])  # (until the next allocation looks at its events: keep this last)
    return {"pieces": pieces, "big": big, "smalls": smalls}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tcp", default=None)
    ap.add_argument("--lifetime", type=float, default=120.0)
    ap.add_argument("--no-layout", action="store_true")
    args = ap.parse_args()

    import glake
    import glake.stats

    alloc = glake.Allocator(backend="host", chunk_bytes="2MiB")  # the layout stitches holes of single granules
    keep = {} if args.no_layout else fragmented_layout(alloc)
    pool = glake.stats.register_allocator(alloc, "fragmented")
    glake.stats.register_source("demo", lambda: {"requests": 42, "hit_rate": 0.75, "nested": {"ok": True}},
                                device=0, labels={"kind": "test"})

    def broken():
        raise RuntimeError("this source always fails")

    glake.stats.register_source("broken", broken)
    server = glake.stats.serve(args.tcp)
    stats = alloc.stats()
    print(json.dumps({"pid": __import__("os").getpid(), "addresses": server.addresses, "pool": pool,
                      "expect": {"allocated": stats["allocated_bytes.all.current"],
                                 "reserved": stats["reserved_bytes.all.current"],
                                 "num_stitches": stats["num_stitches"]}}), flush=True)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait(args.lifetime)
    server.stop()
    del keep
    return 0


if __name__ == "__main__":
    sys.exit(main())
