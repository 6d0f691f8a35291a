"""Host time of the first submission to the device after a synchronisation, against the number of
kernels the synchronised work launched: what a scheduler's first call of a step (kvcache's
reserve_batch publishing the lengths) pays before its own work. Each round launches N small kernels
behind ~2 ms of device work, waits for the device (cudaDeviceSynchronize, or an event's
synchronize), then times two 4-byte pinned host-to-device copies in a row: the first after the
wait, and the second as the anchor of what a copy costs otherwise. Median over --rounds. With
--mapped-gib, the same again while glake's allocator holds that much device memory mapped in 2 MiB
chunks (a premapped KV cache of 64 GiB is 32,768 mappings).

    python3 benchmarks/first_submit.py [--launches 1,64,512,4096] [--rounds 40] [--mapped-gib 0,64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launches", default="1,64,512,4096", help="kernels launched before each wait")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--mapped-gib", default="0", help="device memory mapped in 2 MiB chunks while measuring")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("first_submit.py measures the CUDA driver: it needs a GPU")
    rows, out = [], []
    import glake

    for gib in (int(v) for v in args.mapped_gib.split(",")):
        held = glake.Allocator(torch.cuda.current_device(), backend="cuda", chunk_bytes="2MiB") if gib else None
        blocks = [held.malloc(1 << 30) for _ in range(gib)] if held else []
        measure(torch, args, gib, rows, out)
        for p in blocks:
            held.free(p)
        del held
    print_table("the first 4-byte H2D copy after a wait, by kernels launched before it (host us, median)",
                ["GiB mapped", "wait", "kernels before the wait", "first copy us", "second copy us", "first copy max us"],
                rows)
    write_json("first_submit", {"args": vars(args), "machine": machine(), "results": out})


def measure(torch, args, gib: int, rows: list, out: list) -> None:
    src = torch.zeros(1, dtype=torch.int32).pin_memory()
    dst = torch.zeros(1, dtype=torch.int32, device="cuda")
    x = torch.zeros(256, device="cuda")
    for wait in ("device", "event"):
        for n in (int(v) for v in args.launches.split(",")):
            first, second = [], []
            for r in range(args.rounds + 5):
                torch.cuda._sleep(3_000_000)  # ~2 ms of device work ahead of the launches
                for _ in range(n):
                    x.add_(1.0)
                if wait == "device":
                    torch.cuda.synchronize()
                else:
                    ev = torch.cuda.Event()
                    ev.record()
                    ev.synchronize()
                t0 = time.perf_counter_ns()
                dst.copy_(src, non_blocking=True)
                t1 = time.perf_counter_ns()
                dst.copy_(src, non_blocking=True)
                t2 = time.perf_counter_ns()
                if r >= 5:  # warm-up rounds dropped
                    first.append((t1 - t0) / 1e3)
                    second.append((t2 - t1) / 1e3)
            torch.cuda.synchronize()
            res = {"mapped_gib": gib, "wait": wait, "launches": n, "first_us": statistics.median(first),
                   "second_us": statistics.median(second), "first_us_max": max(first)}
            out.append(res)
            rows.append([gib, wait, n, round(res["first_us"], 1), round(res["second_us"], 1), round(res["first_us_max"], 1)])


if __name__ == "__main__":
    main()
