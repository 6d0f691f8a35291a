"""Replay a recorded torch allocation trace through glake for several allocator configurations.

No GPU needed: on the host backend the driver calls are the same as on a GPU (the same policy makes
them), so the counts of cuMemCreate / cuMemMap / cuMemUnmap, the peak reserved memory and the
smallest cap under which the whole trace still replays are exact; only the time is not. The
"modelled driver ms" column prices each call at the per-chunk cost measured on an H200 (driver 580,
2026-12-01: cuMemCreate 13 us, cuMemMap plus its first cuMemSetAccess 37 us, cuMemUnmap 18 us per
chunk, whatever the chunk's size): a model, to choose a configuration before measuring it on a GPU
with benchmarks/fragmentation.py.

    python benchmarks/trace_replay.py [--trace benchmarks/data/trace_full_h200.json.gz]
                                      [--confs "chunk_bytes:2MiB;chunk_bytes:8MiB;"] [--min-cap]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

GiB = 1 << 30
DATA = Path(__file__).resolve().parent / "data" / "trace_full_h200.json.gz"
COST_US = {"create": 13, "map": 37, "unmap": 18}  # per chunk, H200 (see the module docstring)


def replay(events, conf: str, backend: str, cap: int = 0):
    """Replays `events`; returns (stats, driver call deltas, seconds), or None when it ran out of memory."""
    import glake
    import glake.core

    kwargs = dict(kv.split(":", 1) for kv in conf.split(",") if kv)
    if cap:
        kwargs["limit_bytes"] = str(cap)
    before = glake.core.stats(backend)
    alloc = glake.Allocator(backend=backend, **kwargs)
    live = {}
    t0 = time.perf_counter()
    try:
        for action, addr, size in events:
            if action == "alloc":
                live[addr] = alloc.malloc(size)
            elif addr in live:
                alloc.free(live.pop(addr))
    except glake.OutOfMemoryError:
        return None
    finally:
        for p in live.values():
            alloc.free(p)
    elapsed = time.perf_counter() - t0
    stats = alloc.stats()
    after = glake.core.stats(backend)
    calls = {k[6:]: after[k] - before.get(k, 0) for k in after if k.startswith("calls.")}
    return stats, calls, elapsed


def min_cap(events, conf: str, backend: str, lo: int, hi: int) -> int:
    """The smallest cap (to 16 MiB) under which the trace replays, by bisection in [lo, hi]."""
    while hi - lo > 16 << 20:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if replay(events, conf, backend, mid) else (mid, hi)
    return hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=str(DATA))
    ap.add_argument("--confs", default="chunk_bytes:2MiB;chunk_bytes:8MiB;chunk_bytes:16MiB;chunk_bytes:32MiB",
                    help="';'-separated allocator configurations (GLAKE_ALLOC_CONF syntax)")
    ap.add_argument("--backend", default="host")
    ap.add_argument("--min-cap", action="store_true", help="also bisect the smallest cap each configuration survives")
    args = ap.parse_args()

    events = json.loads(gzip.open(args.trace).read())
    rows, results = [], {}
    for conf in args.confs.split(";"):
        out = replay(events, conf, args.backend)
        if out is None:
            raise SystemExit(f"{conf or 'defaults'}: out of memory without a cap")
        stats, calls, elapsed = out
        peak_alloc = stats["allocated_bytes.all.peak"]
        model_ms = sum(calls.get(k, 0) * us for k, us in COST_US.items()) / 1e3
        r = {"reserved_peak": stats["reserved_bytes.all.peak"], "allocated_peak": peak_alloc,
             "num_stitches": stats["num_stitches"], "calls": calls, "modelled_driver_ms": model_ms,
             "replay_s": elapsed}
        if args.min_cap:
            r["min_cap"] = min_cap(events, conf, args.backend, peak_alloc, 2 * stats["reserved_bytes.all.peak"])
        results[conf or "defaults"] = r
        rows.append([conf or "defaults", f"{peak_alloc / GiB:.2f}", f"{r['reserved_peak'] / GiB:.2f}",
                     f"{r['min_cap'] / GiB:.2f}" if args.min_cap else "", r["num_stitches"], calls.get("create", 0),
                     calls.get("map", 0), calls.get("unmap", 0), round(model_ms)])
    print_table(f"{Path(args.trace).name}: {len(events)} events on the {args.backend} backend",
                ["configuration", "peak alloc GiB", "peak reserved GiB", "min cap GiB", "stitches", "cuMemCreate",
                 "cuMemMap", "cuMemUnmap", "modelled driver ms"], rows)
    write_json("trace_replay", {"args": vars(args), "cost_us_per_chunk": COST_US, "results": results})


if __name__ == "__main__":
    main()
