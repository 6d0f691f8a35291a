"""Host<->device copy bandwidth: torch ``Tensor.copy_`` against glake.multipath, in the same run.

For each direction (H2D, D2H), host memory kind (pageable, pinned) and size, times blocking copies
(median of --repeats after one warm-up, each bracketed by torch.cuda.synchronize) with torch and with
a glake.multipath Engine, and prints GB/s (1e9 bytes/s) and the ratio. Host buffers are allocated
once, touched, and reused (a pageable destination is not a fresh page-faulting buffer for either).
Every glake copy is spot-checked against the source (16 windows of 64 KiB).

    python3 benchmarks/multipath.py                          # 64 MiB .. 4 GiB, default engine config
    python3 benchmarks/multipath.py --sweep                  # + chunk/buffers/threads/streams sweeps
    python3 benchmarks/multipath.py --peers                  # + pinned copies through peer GPUs (2+ GPUs)
    python3 benchmarks/multipath.py --conf chunk_bytes:16M,threads:12   # engine config for the main table
    python3 benchmarks/multipath.py --host-dry-run --sizes 4M --sweep --sweep-size 8M   # script self-test, no GPU

--host-dry-run runs every step of the script on the host backend ("device" and "pinned" buffers are
plain CPU tensors, the copies go through the host pipeline): it checks the script, it measures
nothing about GPUs and its numbers must not be reported as such.

Targets (issue 5, H100): pageable H2D >= 40 GB/s, pageable D2H >= 35 GB/s, pinned >= 0.97x torch.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, write_json  # noqa: E402

import torch  # noqa: E402

from glake import multipath as mp  # noqa: E402

MIB, GIB = 1 << 20, 1 << 30
HOST_DRY_RUN = False  # set by --host-dry-run


def sync() -> None:
    if not HOST_DRY_RUN:
        torch.cuda.synchronize()


def new_engine(device: int, **conf: Any) -> mp.Engine:
    return mp.Engine("host", 0, **conf) if HOST_DRY_RUN else mp.Engine("cuda", device, **conf)
TARGETS = {("h2d", "pageable"): ("GB/s", 40.0), ("d2h", "pageable"): ("GB/s", 35.0),
           ("h2d", "pinned"): ("ratio", 0.97), ("d2h", "pinned"): ("ratio", 0.97)}


def parse_size(s: str) -> int:
    s = s.strip().upper()
    for suffix, mult in (("G", GIB), ("M", MIB), ("K", 1 << 10)):
        if s.endswith(suffix):
            return int(float(s[:-1]) * mult)
    return int(s)


def fmt_size(n: int) -> str:
    return f"{n // GIB} GiB" if n >= GIB and n % GIB == 0 else f"{n // MIB} MiB" if n >= MIB else f"{n >> 10} KiB"


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of fn() after one warm-up, each run bracketed by device synchronisation."""
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


class Buffers:
    """One pageable and one pinned host buffer and one device buffer of the largest size, touched once."""

    def __init__(self, max_bytes: int, device: int, pinned: bool = True) -> None:
        self.device = device
        self.pageable = torch.empty(max_bytes, dtype=torch.uint8)
        self._fill(self.pageable)
        self.pinned = torch.empty(max_bytes, dtype=torch.uint8, pin_memory=not HOST_DRY_RUN) if pinned else None
        if self.pinned is not None:
            self._fill(self.pinned)
        self.dev = torch.empty(max_bytes, dtype=torch.uint8, device="cpu" if HOST_DRY_RUN else f"cuda:{device}")

    @staticmethod
    def _fill(t: torch.Tensor) -> None:
        # A position-dependent pattern (not constant), so that a misplaced chunk fails the spot check.
        n = t.numel() // 8
        t[: n * 8].view(torch.int64).copy_(torch.arange(n, dtype=torch.int64))

    def pair(self, direction: str, memory: str, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        host = (self.pageable if memory == "pageable" else self.pinned)[:n]
        dev = self.dev[:n]
        return (dev, host) if direction == "h2d" else (host, dev)


def spot_check(dst: torch.Tensor, src: torch.Tensor) -> bool:
    n = dst.numel()
    w = min(64 << 10, n)
    for i in range(16):
        off = (n - w) * i // 15 if n > w else 0
        a, b = dst[off:off + w], src[off:off + w]
        if not torch.equal(a.cpu() if a.is_cuda else a, b.cpu() if b.is_cuda else b):
            return False
    return True


def measure(bufs: Buffers, direction: str, memory: str, n: int, engine: mp.Engine, repeats: int,
            with_torch: bool = True) -> Dict[str, Any]:
    dst, src = bufs.pair(direction, memory, n)
    if dst.numel() != n or src.numel() != n:
        raise SystemExit(f"internal: {fmt_size(n)} does not fit the {fmt_size(bufs.dev.numel())} buffers")
    out: Dict[str, Any] = {"direction": direction, "memory": memory, "bytes": n}
    if with_torch:
        out["torch_gbps"] = n / timed(lambda: dst.copy_(src), repeats) / 1e9
    dst_ptr, src_ptr = dst.data_ptr(), src.data_ptr()
    before = engine.stats()
    out["glake_gbps"] = n / timed(lambda: engine.copy_(dst, src), repeats) / 1e9
    after = engine.stats()
    out["path"] = [p for p in ("plain", "staged_h2d", "staged_d2h", "pinned_split", "peer")
                   if after[f"calls.{p}"] > before[f"calls.{p}"]]
    out["plan"] = engine.plan(dst_ptr, src_ptr, n, direction if HOST_DRY_RUN else "auto")
    calls = after["calls"] - before["calls"]
    out["wait_ms_per_copy"] = (after["wait_ns"] - before["wait_ns"]) / max(calls, 1) / 1e6
    out["cpu_copy_ms_per_copy"] = (after["cpu_copy_ns"] - before["cpu_copy_ns"]) / max(calls, 1) / 1e6
    out["correct"] = spot_check(dst, src)
    if with_torch:
        out["ratio"] = out["glake_gbps"] / out["torch_gbps"]
    return out


def main_table(args, bufs: Buffers, conf: Dict[str, Any]) -> List[Dict[str, Any]]:
    results = []
    with new_engine(args.device, **conf) as engine:
        config = engine.config
        for direction, memory, n in itertools.product(("h2d", "d2h"), ("pageable", "pinned"), args.sizes):
            results.append(measure(bufs, direction, memory, n, engine, args.repeats))
    rows = []
    for r in results:
        unit, goal = TARGETS[(r["direction"], r["memory"])]
        got = r["glake_gbps"] if unit == "GB/s" else r["ratio"]
        rows.append([r["direction"], r["memory"], fmt_size(r["bytes"]), round(r["torch_gbps"], 2),
                     round(r["glake_gbps"], 2), round(r["ratio"], 3), r["plan"],
                     f"{'ok' if got >= goal else 'MISSED'} (>= {goal} {'GB/s' if unit == 'GB/s' else 'x torch'})",
                     "yes" if r["correct"] else "NO"])
    where = "HOST DRY RUN" if HOST_DRY_RUN else f"cuda:{args.device}"
    print_table(f"Host<->device copy bandwidth, {where}, GB/s (1e9 B/s), median of {args.repeats}; "
                f"glake config: {config}",
                ["dir", "host memory", "size", "torch", "glake", "glake/torch", "glake path", "target", "bytes ok"], rows)
    return results


def sweep(args, bufs: Buffers) -> Dict[str, Any]:
    n = args.sweep_size
    out: Dict[str, Any] = {"bytes": n}

    def run(direction: str, memory: str, conf: Dict[str, Any], size: int = n) -> Dict[str, Any]:
        repeats = args.sweep_repeats if size >= 64 * MIB else max(args.sweep_repeats, 20)  # small: timer noise
        with new_engine(args.device, **conf) as e:
            r = measure(bufs, direction, memory, size, e, repeats, with_torch=False)
        r["conf"] = conf
        return r

    # 1. The pageable pipeline: chunk size x buffers x threads, both directions.
    grid = []
    for direction in ("h2d", "d2h"):
        for chunk, buffers, threads in itertools.product(args.sweep_chunks, args.sweep_buffers, args.sweep_threads):
            grid.append(run(direction, "pageable", dict(chunk_bytes=chunk, buffers=buffers, threads=threads,
                                                        small_copy_bytes=0)))
    out["pipeline"] = grid
    rows = [[r["direction"], fmt_size(r["conf"]["chunk_bytes"]), r["conf"]["buffers"], r["conf"]["threads"],
             round(r["glake_gbps"], 2), round(r["cpu_copy_ms_per_copy"], 1), round(r["wait_ms_per_copy"], 1),
             "yes" if r["correct"] else "NO"] for r in grid]
    print_table(f"Sweep 1: pageable pipeline, {fmt_size(n)}, GB/s (cpu/wait: thread-ms per copy)",
                ["dir", "chunk", "buffers", "threads", "GB/s", "cpu ms", "wait ms", "bytes ok"], rows)

    # 2. At each direction's best pipeline: copy streams and piece size.
    best = {d: max((r for r in grid if r["direction"] == d), key=lambda r: r["glake_gbps"])["conf"] for d in ("h2d", "d2h")}
    out["best_pipeline"] = best
    lanes = []
    for direction in ("h2d", "d2h"):
        for streams, piece in itertools.product((1, 2, 3), (0, 256 << 10, 1 * MIB)):
            lanes.append(run(direction, "pageable", {**best[direction], "streams": streams, "piece_bytes": piece}))
    out["streams_pieces"] = lanes
    print_table(f"Sweep 2: copy streams and piece size at the best pipeline, {fmt_size(n)}, GB/s",
                ["dir", "best pipeline", "streams", "piece", "GB/s"],
                [[r["direction"], f"{fmt_size(r['conf']['chunk_bytes'])} x{r['conf']['buffers']} t{r['conf']['threads']}",
                  r["conf"]["streams"], fmt_size(r["conf"]["piece_bytes"]) if r["conf"]["piece_bytes"] else "auto",
                  round(r["glake_gbps"], 2)] for r in lanes])

    # 3. Pinned copies: plain (one stream) against a split over 2 and 3 streams (copy engines).
    pinned = []
    for direction, size, streams in itertools.product(("h2d", "d2h"), sorted({min(256 * MIB, n), n}), (1, 2, 3)):
        pinned.append(run(direction, "pinned", dict(pinned_streams=streams, pinned_split_min_bytes=0), size))
    out["pinned_split"] = pinned
    print_table("Sweep 3: pinned copies, plain (1) vs split over 2-3 streams, GB/s",
                ["dir", "size", "pinned_streams", "GB/s", "path"],
                [[r["direction"], fmt_size(r["bytes"]), r["conf"]["pinned_streams"], round(r["glake_gbps"], 2),
                  ",".join(r["path"])] for r in pinned])

    # 4. Small pageable copies: staged against the driver's plain path (picks small_copy_bytes).
    small = []
    small_sizes = [s for s in (64 << 10, 256 << 10, 1 * MIB, 4 * MIB, 16 * MIB) if s <= n]
    for direction, size in itertools.product(("h2d", "d2h"), small_sizes):
        for label, threshold in (("staged", 0), ("plain", 1 << 40)):
            r = run(direction, "pageable", {**best[direction], "small_copy_bytes": threshold}, size)
            r["label"] = label
            small.append(r)
    out["small_copies"] = small
    print_table("Sweep 4: small pageable copies, staged vs plain driver path, GB/s",
                ["dir", "size", "staged", "plain"],
                [[a["direction"], fmt_size(a["bytes"]), round(a["glake_gbps"], 2), round(b["glake_gbps"], 2)]
                 for a, b in zip(small[0::2], small[1::2])])
    bad = [r for part in ("pipeline", "streams_pieces", "pinned_split", "small_copies") for r in out[part] if not r["correct"]]
    if bad:
        print(f"\nWARNING: {len(bad)} sweep runs copied wrong bytes: {[r['conf'] for r in bad]}")
    return out


def peers(args, bufs: Buffers) -> Dict[str, Any]:
    if HOST_DRY_RUN or torch.cuda.device_count() < 2:
        print("\n--peers: one GPU only, nothing to measure")
        return {"skipped": "one GPU"}
    results = []
    with mp.Engine("cuda", args.device, peers=True) as e:
        print(f"\npeer devices in use: {e.peer_devices}; skipped: {e.peers_skipped()}")
        if not e.peer_devices:
            return {"skipped": e.peers_skipped()}
        for direction, n in itertools.product(("h2d", "d2h"), args.sizes):
            results.append(measure(bufs, direction, "pinned", n, e, args.repeats))
    print_table(f"Pinned copies through peer GPUs into/out of cuda:{args.device}, GB/s",
                ["dir", "size", "torch", "glake (peers)", "glake/torch", "path", "bytes ok"],
                [[r["direction"], fmt_size(r["bytes"]), round(r["torch_gbps"], 2), round(r["glake_gbps"], 2),
                  round(r["ratio"], 3), ",".join(r["path"]), "yes" if r["correct"] else "NO"] for r in results])
    return {"results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64M,256M,1G,4G", help="comma-separated sizes (K/M/G suffixes)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--conf", default="", help="engine config for the main table (GLAKE_MULTIPATH_CONF syntax)")
    ap.add_argument("--sweep", action="store_true", help="also sweep the engine's knobs")
    ap.add_argument("--sweep-size", default="1G")
    ap.add_argument("--sweep-repeats", type=int, default=3)
    ap.add_argument("--sweep-chunks", default="2M,4M,8M,16M,32M")
    ap.add_argument("--sweep-buffers", default="2,3,4,8")
    ap.add_argument("--sweep-threads", default="4,8,12,16")
    ap.add_argument("--peers", action="store_true", help="also measure pinned copies through peer GPUs")
    ap.add_argument("--no-main", action="store_true", help="skip the main table (sweep or peers only)")
    ap.add_argument("--host-dry-run", action="store_true", help="run the script on the host backend (self-test)")
    args = ap.parse_args()
    global HOST_DRY_RUN
    HOST_DRY_RUN = args.host_dry_run
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    args.sweep_size = parse_size(args.sweep_size)
    args.sweep_chunks = [parse_size(s) for s in args.sweep_chunks.split(",")]
    args.sweep_buffers = [int(s) for s in args.sweep_buffers.split(",")]
    args.sweep_threads = [int(s) for s in args.sweep_threads.split(",")]
    if not HOST_DRY_RUN:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/multipath.py needs a CUDA GPU (or --host-dry-run to test the script)")
        torch.cuda.set_device(args.device)
    conf = mp.parse_conf(args.conf)

    max_bytes = max(args.sizes + ([args.sweep_size] if args.sweep else []))
    t0 = time.perf_counter()
    bufs = Buffers(max_bytes, args.device)
    gpu = "HOST DRY RUN (no GPU: not a measurement)" if HOST_DRY_RUN else torch.cuda.get_device_name(args.device)
    print(f"buffers of {fmt_size(max_bytes)} ready in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}, {gpu}")
    payload: Dict[str, Any] = {"torch": torch.__version__, "gpu": gpu,
                               "args": {k: v for k, v in vars(args).items()}, "conf": conf,
                               "default_config": mp.default_config()}
    if not args.no_main:
        payload["main"] = main_table(args, bufs, conf)
    if args.sweep:
        payload["sweep"] = sweep(args, bufs)
    if args.peers:
        payload["peers"] = peers(args, bufs)
    write_json("multipath_host_dry_run" if HOST_DRY_RUN else "multipath", payload)


if __name__ == "__main__":
    main()
