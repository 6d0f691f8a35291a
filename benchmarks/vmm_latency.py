"""Per-chunk latency of the VMM primitives on the active backend.

Times cuMemCreate / cuMemMap / cuMemSetAccess (first, and again on an accessible range) /
cuMemUnmap / cuMemRelease (or their host-backend equivalents) for --chunks chunks of one
granularity each, in C++ around each driver call, and prints the median and p10/p90 per call.

    python benchmarks/vmm_latency.py [--chunks 512] [--backend cuda|host] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, write_json  # noqa: E402

from glake import _bench, core  # noqa: E402

OPS = ["create", "map", "set_access", "set_access_again", "unmap", "release"]
# Reference ranges from ../shared/ARCHITECTURE.md (H100, driver 580): not measured by this run.
H100_REFERENCE_US = {"create": "13-22", "map": "2-5", "set_access": "36-45", "set_access_again": "~3",
                     "unmap": "~25", "release": "~18"}


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=512, help="chunks per repeat (>= 256 for the issue's median)")
    ap.add_argument("--repeats", type=int, default=3, help="independent repeats; samples are pooled")
    ap.add_argument("--backend", default=None, help="cuda or host (default: auto)")
    ap.add_argument("--device", type=int, default=0)
    args = ap.parse_args()

    backend = core.backend_name(args.backend)
    _bench.measure_vmm_latency(8, args.device, backend)  # warm-up: context, first-call costs
    samples = {op: [] for op in OPS}
    for _ in range(args.repeats):
        for op, us in _bench.measure_vmm_latency(args.chunks, args.device, backend).items():
            samples[op].extend(us)

    rows, result = [], {}
    for op in OPS:
        xs = samples[op]
        med = statistics.median(xs)
        result[op] = {"median_us": med, "p10_us": quantile(xs, 0.1), "p90_us": quantile(xs, 0.9), "n": len(xs)}
        rows.append([op, round(med, 2), round(quantile(xs, 0.1), 2), round(quantile(xs, 0.9), 2), len(xs),
                     H100_REFERENCE_US[op]])
    per_chunk = sum(result[op]["median_us"] for op in ("create", "map", "set_access"))
    rows.append(["create+map+access", round(per_chunk, 2), "", "", "", "~55-70"])
    g = core.granularity(backend, args.device)
    print_table(f"VMM latency per {g >> 20} MiB chunk, backend={backend} (microseconds)",
                ["op", "median", "p10", "p90", "n", "H100 reference (ARCHITECTURE.md)"], rows)
    write_json(f"vmm_latency_{backend}", {"backend": backend, "granularity": g, "chunks": args.chunks,
                                          "repeats": args.repeats, "results": result,
                                          "h100_reference_us": H100_REFERENCE_US})


if __name__ == "__main__":
    main()
