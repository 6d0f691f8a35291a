"""glake allocator demo: a fragmented cache, and what stitching does about it.

Allocates 16 blocks of 64 MiB, frees every other one (512 MiB free, in 64 MiB holes), then asks
for one 512 MiB block: a caching allocator without stitching must reserve 512 MiB more; glake maps
the holes' chunks into one new virtual range and reserves nothing. Runs on the cuda backend when a
GPU is usable, else on the host backend (the same policy over host memory).

    python examples/allocator_demo.py [--backend host|cuda] [--block-mib 64]
"""

from __future__ import annotations

import argparse

import glake
from glake.cli import version_text
from glake.torch import format_summary

MiB = 1 << 20


def scenario(backend: str, stitch: bool, block: int) -> glake.Allocator:
    a = glake.Allocator(backend=backend, stitch=stitch)
    blocks = [a.malloc(block) for _ in range(16)]
    for p in blocks[::2]:
        a.free(p)
    before = a.stats()["reserved_bytes.all.current"]
    big = a.malloc(8 * block)
    after = a.stats()["reserved_bytes.all.current"]
    print(f"  stitch={str(stitch):5s}: reserved {before // MiB:5d} MiB -> {after // MiB:5d} MiB for a "
          f"{8 * block // MiB} MiB request (efficiency {a.stats()['allocated_bytes.all.current'] / after:.2f})")
    a.free(big)
    again = a.malloc(8 * block)
    a.free(again)
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description="what stitching does to a fragmented cache")
    ap.add_argument("--backend", default=None, help="cuda or host (default: auto-detect)")
    ap.add_argument("--block-mib", type=int, default=64)
    args = ap.parse_args()
    backend = glake.backend_name(args.backend)
    block = args.block_mib * MiB
    print(version_text() + "\n")
    print(f"glake {glake.__version__} on the {backend} backend: 16 x {args.block_mib} MiB allocated, every other one "
          f"freed, then one {8 * args.block_mib} MiB request")
    scenario(backend, stitch=False, block=block)
    a = scenario(backend, stitch=True, block=block)
    st = a.stats()
    print(f"  stitched ranges: {st['num_stitches']} created, {st['num_stitch_reuses']} reused "
          f"(the second {8 * args.block_mib} MiB request mapped nothing)\n")
    print("memory map (stitched allocator):")
    for seg in a.snapshot():
        states = "".join({"allocated": "#", "free": ".", "stitched": "s", "held": "h", "pending": "p"}[b["state"]]
                         * max(1, b["size"] // block) for b in seg["blocks"])
        print(f"  {seg['kind']:8s} {seg['address']:#016x} {seg['size'] // MiB:6d} MiB  {states}")
    print("  (# allocated, . free, s lent to a stitched range, h stitched range kept for reuse)\n")
    print(format_summary(st, f"glake memory summary ({backend})"))


if __name__ == "__main__":
    main()
