"""benchmarks/shim_bench's fragmenting trace, replayed on the host backend through glake.Allocator at
several chunk sizes: peak physical memory against peak live bytes (a model of the shim, no GPU).

The trace is shim_bench's (64 live buffers, log-uniform-squared sizes 64 KiB..48 MiB, 2,000 steps of
free one / allocate another), drawn with Python's generator instead of mt19937: the same distribution,
other draws. On the GPU (docs/results.md, issue 14) the driver's own peak over peak live was
1.05-1.08 and the shim's, with 32 MiB chunks, 1.16-1.22; this replay says which chunk size brings
the shim near the driver.

    python3 benchmarks/shim_trace_host.py [--seeds 3] [--steps 2000] [--chunks 2MiB,4MiB,8MiB,32MiB]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

MiB = 1 << 20


def replay(seed: int, steps: int, chunk: str):
    import glake
    from glake import _C

    rng = random.Random(seed)

    def draw() -> int:
        u = rng.random()
        lo, hi = 64 * 1024, 48 * MiB
        return int(lo * (hi / lo) ** (u * u)) // 512 * 512 + 512

    physical = lambda: _C.stats("host")["physical_bytes.current"]  # noqa: E731
    base = physical()
    a = glake.Allocator(backend="host", chunk_bytes=chunk)
    live = [(a.malloc(n), n) for n in (draw() for _ in range(64))]
    peak_live = peak_used = 0
    for _ in range(steps):
        k = rng.randrange(len(live))
        a.free(live[k][0])
        n = draw()
        live[k] = (a.malloc(n), n)
        peak_live = max(peak_live, sum(n for _, n in live))
        peak_used = max(peak_used, physical() - base)
    for p, _ in live:
        a.free(p)
    a.empty_cache()
    return peak_live, peak_used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--chunks", default="2MiB,4MiB,8MiB,32MiB")
    args = ap.parse_args()
    rows, out = [], []
    for chunk in args.chunks.split(","):
        for seed in range(args.seeds):
            live, used = replay(seed, args.steps, chunk)
            rows.append([chunk, seed, round(live / MiB), round(used / MiB), round(used / live, 3)])
            out.append({"chunk_bytes": chunk, "seed": seed, "peak_live_bytes": live, "peak_physical_bytes": used})
    print_table("shim_bench's trace on the host backend: peak physical vs peak live (MiB)",
                ["chunk_bytes", "seed", "peak live", "peak physical", "physical / live"], rows)
    write_json("shim_trace_host", {"args": vars(args), "runs": out})


if __name__ == "__main__":
    main()
