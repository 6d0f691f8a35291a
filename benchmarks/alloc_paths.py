"""Where an allocation's time goes: the same cached alloc+free through each layer, per frontend.

For torch's allocator and for glake's cpp and pluggable torch frontends (each in its own process):
  tensor   torch.empty(size, uint8, device="cuda"); del        (Python, dispatcher, Allocator::allocate)
  raw      torch.cuda.caching_allocator_alloc/delete            (raw_alloc / raw_delete)
  core     glake's StitchAllocator malloc+free timed in C++     (glake only)
Microseconds per pair, median of --repeats batches of --iters.

    python benchmarks/alloc_paths.py [--sizes 512,65536,33554432] [--iters 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

KINDS = ["native", "cpp", "pluggable"]


def timed(fn, iters: int, repeats: int) -> float:
    for _ in range(200):
        fn()
    batches = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        batches.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(batches)


def worker(kind: str, sizes, iters: int, repeats: int) -> dict:
    if kind != "native":
        import glake.torch

        glake.torch.install(frontend=kind)
    import torch

    out: dict = {}
    for size in sizes:
        def tensor():
            x = torch.empty(size, dtype=torch.uint8, device="cuda")
            del x

        def raw():
            torch.cuda.caching_allocator_delete(torch.cuda.caching_allocator_alloc(size))

        row = {"tensor": timed(tensor, iters, repeats), "raw": timed(raw, iters, repeats)}
        if kind != "native":
            from glake import _C, _bench

            row["core"] = _bench.measure_alloc_free_ns(_C.gmlake_global(0), size, 20000) / 1000
        out[size] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,65536,33554432")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", choices=KINDS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, sizes, args.iters, args.repeats)))
        return
    results = {}
    for kind in KINDS:
        env = dict(os.environ)
        env.pop("GLAKE_TORCH_FRONTEND", None)
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--sizes", args.sizes, "--iters",
                               str(args.iters), "--repeats", str(args.repeats)], capture_output=True, text=True,
                              timeout=900, env=env)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            raise SystemExit(f"{kind} worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results[kind] = json.loads(line[0][7:])
    rows = []
    for size in sizes:
        for kind in KINDS:
            r = results[kind][str(size)]
            rows.append([f"{size:,}", kind, round(r["tensor"], 2), round(r["raw"], 2),
                         round(r["core"], 3) if "core" in r else ""])
    print_table("Cached alloc+free, microseconds per pair, by layer", ["size (B)", "allocator", "tensor", "raw", "core"],
                rows)
    write_json("alloc_paths", {"iters": args.iters, "repeats": args.repeats, "us_per_pair": results})


if __name__ == "__main__":
    main()
