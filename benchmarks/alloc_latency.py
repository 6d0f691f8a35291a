"""torch.empty + del latency: torch's native allocator vs glake, plus glake's raw C++ path.

Each allocator runs in its own process (glake must be installed before CUDA's first allocation).
Times the host-side cost of `torch.empty(size, dtype=uint8, device="cuda"); del` in a Python loop,
sizes 512 B .. 1 GiB, after a warm-up that caches the block.

The two processes are measured in lockstep: the parent asks each, in turn, for one batch of --iters
pairs (which one goes first alternates), and both are pinned to the same CPU core. A slow spell of the
machine (a busy neighbour, a frequency change) then lands on both allocators alike instead of on
whichever process happened to run then; earlier runs that measured one process after the other
disagreed by 2x from one run to the next, for native as for glake. The ratio reported is the median
over rounds of glake's batch time over native's batch time in the same round.

    python benchmarks/alloc_latency.py [--iters 2000] [--repeats 15] [--cpu N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LineWorker, print_table, write_json  # noqa: E402

SIZES = [512, 4 << 10, 64 << 10, 1 << 20, 4 << 20, 32 << 20, 256 << 20, 1 << 30]
KINDS = ("native", "glake")


def worker(kind: str) -> None:
    """Serve batch requests on stdin: ``SIZE ITERS`` answers the µs per pair, ``RAW`` glake's C++ path."""
    if kind == "glake":
        import glake.torch

        glake.torch.install()
    import torch

    for _ in range(3):  # warm-up pass over every size: blocks cached, code paths hot
        for size in SIZES:
            for _ in range(200):
                x = torch.empty(size, dtype=torch.uint8, device="cuda")
                del x
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "RAW":
            from glake import _C, _bench

            # The same C++ malloc+free without torch: on a fresh private allocator, and on the global
            # allocator torch used above (same cache state), to tell glake's cost from torch's path.
            raw = _C.Allocator(0, "cuda", "")
            out = {"raw_ns": {s: _bench.measure_alloc_free_ns(raw, s, 20000) for s in SIZES},
                   "raw_global_ns": {s: _bench.measure_alloc_free_ns(_C.gmlake_global(0), s, 20000) for s in SIZES}}
            print("RESULT " + json.dumps(out), flush=True)
            continue
        size, iters = int(cmd[0]), int(cmd[1])
        t0 = time.perf_counter()
        for _ in range(iters):
            x = torch.empty(size, dtype=torch.uint8, device="cuda")
            del x
        print(f"RESULT {(time.perf_counter() - t0) / iters * 1e6}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000, help="pairs per batch")
    ap.add_argument("--repeats", type=int, default=15, help="rounds per size (one batch of each allocator per round)")
    ap.add_argument("--cpu", type=int, default=-1, help="the core both processes run on (default: the last allowed)")
    ap.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    cpu = args.cpu if args.cpu >= 0 else max(os.sched_getaffinity(0))
    workers = {kind: LineWorker(kind, [sys.executable, __file__, "--worker", kind], {cpu}) for kind in KINDS}
    batches = {kind: {size: [] for size in SIZES} for kind in KINDS}
    ratios = {size: [] for size in SIZES}
    for size in SIZES:
        for r in range(args.repeats):
            order = KINDS if r % 2 == 0 else KINDS[::-1]
            got = {kind: workers[kind].ask(f"{size} {args.iters}") for kind in order}
            for kind in KINDS:
                batches[kind][size].append(got[kind])
            ratios[size].append(got["glake"] / got["native"])
    raw = workers["glake"].ask("RAW")
    for w in workers.values():
        w.close()
    rows = []
    for size in SIZES:
        n, g = (statistics.median(batches[k][size]) for k in KINDS)
        ratio = sorted(ratios[size])
        rows.append([f"{size:,}", round(n, 2), round(g, 2), round(statistics.median(ratio), 3),
                     f"{ratio[0]:.2f}-{ratio[-1]:.2f}", round(raw["raw_ns"][str(size)] / 1000, 3),
                     round(raw["raw_global_ns"][str(size)] / 1000, 3)])
    print_table(f"torch.empty + del, microseconds per pair (median of {args.repeats} lockstep rounds, both on CPU {cpu})",
                ["size (B)", "native", "glake", "glake / native (median)", "per-round range", "raw C++ (fresh)",
                 "raw C++ (torch's allocator)"], rows)
    write_json("alloc_latency", {"iters": args.iters, "repeats": args.repeats, "cpu": cpu,
                                 "us_per_pair": {k: {str(s): v for s, v in batches[k].items()} for k in KINDS},
                                 "ratio_per_round": {str(s): v for s, v in ratios.items()}, **raw})


if __name__ == "__main__":
    main()
