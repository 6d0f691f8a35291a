"""torch.empty + del latency: torch's native allocator vs glake, plus glake's raw C++ path.

Each allocator runs in its own process (glake must be installed before CUDA's first allocation).
Times the host-side cost of `torch.empty(size, dtype=uint8, device="cuda"); del` in a Python loop
(median of --repeats batches of --iters), sizes 512 B .. 1 GiB, after a warm-up that caches the block.

    python benchmarks/alloc_latency.py [--iters 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

SIZES = [512, 4 << 10, 64 << 10, 1 << 20, 4 << 20, 32 << 20, 256 << 20, 1 << 30]


def worker(kind: str, iters: int, repeats: int) -> dict:
    if kind == "glake":
        import glake.torch

        glake.torch.install()
    import torch

    out = {}
    for _ in range(3):  # warm-up pass over every size: blocks cached, code paths hot
        for size in SIZES:
            for _ in range(200):
                x = torch.empty(size, dtype=torch.uint8, device="cuda")
                del x
    for size in SIZES:
        batches = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                x = torch.empty(size, dtype=torch.uint8, device="cuda")
                del x
            batches.append((time.perf_counter() - t0) / iters * 1e6)
        out[size] = statistics.median(batches)
    if kind == "glake":
        from glake import _C, _bench

        # The same C++ malloc+free without torch: on a fresh private allocator, and on the global
        # allocator torch used above (same cache state), to tell glake's cost from torch's plugin path.
        raw = _C.Allocator(0, "cuda", "")
        out["raw_ns"] = {s: _bench.measure_alloc_free_ns(raw, s, 20000) for s in SIZES}
        out["raw_global_ns"] = {s: _bench.measure_alloc_free_ns(_C.gmlake_global(0), s, 20000) for s in SIZES}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--worker", choices=["native", "glake"])
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.iters, args.repeats)))
        return
    results = {}
    for kind in ("native", "glake"):
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--iters", str(args.iters),
                               "--repeats", str(args.repeats)], capture_output=True, text=True, timeout=900)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise SystemExit(f"{kind} worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results[kind] = json.loads(line[0][7:])
    rows = []
    for size in SIZES:
        n, g = results["native"][str(size)], results["glake"][str(size)]
        raw = results["glake"]["raw_ns"][str(size)]
        raw_g = results["glake"]["raw_global_ns"][str(size)]
        rows.append([f"{size:,}", round(n, 2), round(g, 2), round(g / n, 3), round(raw / 1000, 3), round(raw_g / 1000, 3)])
    print_table("torch.empty + del, microseconds per pair (median of batches)",
                ["size (B)", "native", "glake", "glake / native", "raw C++ (fresh)", "raw C++ (torch's allocator)"], rows)
    write_json("alloc_latency", {"iters": args.iters, "repeats": args.repeats, "us_per_pair": results})


if __name__ == "__main__":
    main()
