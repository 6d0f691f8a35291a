"""Host time of the first submission to the device after a synchronisation: what a scheduler's first
call of a step (kvcache's reserve_batch publishing the lengths) pays before its own work. Each round
queues --busy-ms of device work and N small kernels, waits for the device (cudaDeviceSynchronize, or an
event's synchronize), then times two 4-byte pinned host-to-device copies in a row (the first after the
wait; the second, the anchor of what a copy costs otherwise) and, in alternate rounds, a fixed piece of
host-only Python instead (right after the wait, then again): whether what is slow after a wait is the
driver or the host's core. Median over --rounds. With --mapped-gib, the same again while glake's
allocator holds that much device memory mapped in 2 MiB chunks (a premapped KV cache of 64 GiB is
32,768 mappings).

    python3 benchmarks/first_submit.py [--launches 1,512] [--busy-ms 2,40] [--rounds 40] [--mapped-gib 0,64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402


def host_work() -> int:
    """A fixed piece of host-only Python (a few µs when warm): no driver, no allocation of note."""
    d = {}
    for i in range(200):
        d[i & 31] = d.get(i & 31, 0) + i
    return len(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launches", default="1,512", help="kernels launched before each wait")
    ap.add_argument("--busy-ms", default="2,40", help="device work queued ahead of the launches, per round")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--mapped-gib", default="0", help="device memory mapped in 2 MiB chunks while measuring")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("first_submit.py measures the CUDA driver: it needs a GPU")
    import glake

    rows, out = [], []
    for gib in (int(v) for v in args.mapped_gib.split(",")):
        held = glake.Allocator(torch.cuda.current_device(), backend="cuda", chunk_bytes="2MiB") if gib else None
        blocks = [held.malloc(1 << 30) for _ in range(gib)] if held else []
        measure(torch, args, gib, rows, out)
        for p in blocks:
            held.free(p)
        del held
    print_table("after a wait for the device: the first 4-byte H2D copy, and host-only Python (host us, median)",
                ["GiB mapped", "busy ms", "wait", "kernels", "first copy", "second copy", "host work after the wait",
                 "host work again"], rows)
    write_json("first_submit", {"args": vars(args), "machine": machine(), "results": out})


def measure(torch, args, gib: int, rows: list, out: list) -> None:
    src = torch.zeros(1, dtype=torch.int32).pin_memory()
    dst = torch.zeros(1, dtype=torch.int32, device="cuda")
    x = torch.zeros(256, device="cuda")
    for busy in (float(v) for v in args.busy_ms.split(",")):
        for wait in ("device", "event"):
            for n in (int(v) for v in args.launches.split(",")):
                t = {"first": [], "second": [], "work": [], "work_again": []}
                for r in range(2 * (args.rounds + 3)):
                    torch.cuda._sleep(int(busy * 1.5e6))  # ~1.5 GHz cycles per ms
                    for _ in range(n):
                        x.add_(1.0)
                    if wait == "device":
                        torch.cuda.synchronize()
                    else:
                        ev = torch.cuda.Event()
                        ev.record()
                        ev.synchronize()
                    t0 = time.perf_counter_ns()
                    if r % 2:
                        host_work()
                    else:
                        dst.copy_(src, non_blocking=True)
                    t1 = time.perf_counter_ns()
                    if r % 2:
                        host_work()
                    else:
                        dst.copy_(src, non_blocking=True)
                    t2 = time.perf_counter_ns()
                    if r >= 6:  # warm-up rounds dropped
                        t["work" if r % 2 else "first"].append((t1 - t0) / 1e3)
                        t["work_again" if r % 2 else "second"].append((t2 - t1) / 1e3)
                torch.cuda.synchronize()
                res = {"mapped_gib": gib, "busy_ms": busy, "wait": wait, "launches": n,
                       **{f"{k}_us": statistics.median(v) for k, v in t.items()}}
                out.append(res)
                rows.append([gib, busy, wait, n] + [round(res[f"{k}_us"], 1) for k in t])


if __name__ == "__main__":
    main()
