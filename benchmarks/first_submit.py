"""Host time of the first submission to the device after a synchronisation, against the number of
kernels the synchronised work launched: what a scheduler's first call of a step (kvcache's
reserve_batch publishing the lengths) pays before its own work. Each round launches N small kernels
behind ~2 ms of device work, waits for the device (cudaDeviceSynchronize, or an event's
synchronize), then times two 4-byte pinned host-to-device copies in a row: the first after the
wait, and the second as the anchor of what a copy costs otherwise. Median over --rounds.

    python3 benchmarks/first_submit.py [--launches 1,64,512,4096] [--rounds 40]
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
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("first_submit.py measures the CUDA driver: it needs a GPU")
    src = torch.zeros(1, dtype=torch.int32).pin_memory()
    dst = torch.zeros(1, dtype=torch.int32, device="cuda")
    x = torch.zeros(256, device="cuda")
    rows, out = [], []
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
            res = {"wait": wait, "launches": n, "first_us": statistics.median(first),
                   "second_us": statistics.median(second), "first_us_max": max(first)}
            out.append(res)
            rows.append([wait, n, round(res["first_us"], 1), round(res["second_us"], 1), round(res["first_us_max"], 1)])
    print_table("the first 4-byte H2D copy after a wait, by kernels launched before it (host us, median)",
                ["wait", "kernels before the wait", "first copy us", "second copy us", "first copy max us"], rows)
    write_json("first_submit", {"args": vars(args), "machine": machine(), "results": out})


if __name__ == "__main__":
    main()
