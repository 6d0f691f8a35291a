"""Host time of KVCache.reserve_batch for --seqs already-backed sequences, by part: the C++ loop,
publish_lengths (the pinned copy to kv.lengths), the stream lookup it makes, the whole Python call; and
growing every sequence by one token per call (a decode step), without and with the background mapper.
Median of --iters calls after a warm-up, nothing else running; then the same calls each made right
after waiting for --after-sync-ms of device work (as a scheduler's first call of a step is), beside
calls that do nothing (a trivial binding, an empty lambda) as the anchors of what that wait alone costs.

    python3 benchmarks/kv_reserve_batch.py [--seqs 256] [--backend cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

from glake.kvcache import KVCache  # noqa: E402


def median_us(fn, n: int) -> float:
    for _ in range(50):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        ts.append(time.perf_counter_ns() - t0)
    return float(np.median(ts)) / 1e3


def after_sync_us(fn, n: int, busy_ms: float) -> float:
    """Host µs of one ``fn()`` made right after waiting for ~busy_ms of device work (median of n), as
    a scheduler's first call of a step is; on the host backend a sleep stands in for the work."""
    import torch

    cuda = torch.cuda.is_available()
    ts = []
    for _ in range(n):
        if cuda:
            torch.cuda._sleep(int(busy_ms * 1.5e6))  # ~1.5 GHz cycles per ms: about busy_ms of GPU time
            torch.cuda.synchronize()
        else:
            time.sleep(busy_ms / 1e3)
        t0 = time.perf_counter_ns()
        fn()
        ts.append(time.perf_counter_ns() - t0)
    return float(np.median(ts)) / 1e3


def after_sync_split_us(kv: KVCache, slots: np.ndarray, lens: np.ndarray, n: int, busy_ms: float,
                        publish_first: bool = False) -> Dict[str, float]:
    """The two calls KVCache.reserve_batch makes (the C++ loop, then publish_lengths), made back to back
    right after a device wait, each timed on its own (median of n): which of the pair is slow when they
    follow each other; ``publish_first`` swaps them."""
    import torch

    cuda = torch.cuda.is_available()
    first, second = [], []
    calls = [lambda: kv._m.reserve_batch(slots, lens), kv.publish_lengths]
    if publish_first:
        calls.reverse()
    for _ in range(n):
        if cuda:
            torch.cuda._sleep(int(busy_ms * 1.5e6))
            torch.cuda.synchronize()
        else:
            time.sleep(busy_ms / 1e3)
        t0 = time.perf_counter_ns()
        calls[0]()
        t1 = time.perf_counter_ns()
        calls[1]()
        t2 = time.perf_counter_ns()
        first.append(t1 - t0)
        second.append(t2 - t1)
    names = ("publish_lengths", "C++ reserve_batch") if publish_first else ("C++ reserve_batch", "publish_lengths")
    tag = "publish first" if publish_first else "in order"
    return {f"after a sync, pair {tag}: {names[0]}": float(np.median(first)) / 1e3,
            f"after a sync, pair {tag}: {names[1]}": float(np.median(second)) / 1e3}


def reserve_batch_parts(kv: KVCache, slots: np.ndarray, lens: np.ndarray, iters: int) -> Dict[str, float]:
    """Host µs (median of ``iters`` calls) of ``kv.reserve_batch(slots, lens)`` for sequences already
    backed that far (the C++ fast path), and of its parts: the binding and C++ loop, publish_lengths
    (the pinned copy to kv.lengths) and the stream lookup publish makes."""
    return {"KVCache.reserve_batch": median_us(lambda: kv.reserve_batch(slots, lens), iters),
            "C++ reserve_batch": median_us(lambda: kv._m.reserve_batch(slots, lens), iters),
            "publish_lengths": median_us(kv.publish_lengths, iters),
            "stream lookup": median_us(kv._stream, iters)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=600, help="tokens each sequence holds at the start")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--after-sync-ms", type=float, default=20.0, help="device work waited for before each 'after a sync' call")
    ap.add_argument("--after-sync-iters", type=int, default=40)
    args = ap.parse_args()
    out: Dict[str, Dict[str, float]] = {}
    for lookahead in (0, 2):
        kv = KVCache(args.layers, 8, 128, "bfloat16", max_seqs=args.seqs, max_seq_len=2048, backend=args.backend,
                     lookahead_tokens=lookahead)
        try:
            slots = np.array([kv.allocate() for _ in range(args.seqs)], np.int64)
            lens = np.full(args.seqs, args.tokens, np.int64)
            kv.reserve_batch(slots, lens)
            kv.wait_mapper()
            r = reserve_batch_parts(kv, slots, lens, args.iters)
            cur = lens.copy()

            def grow():
                cur[:] += 1
                kv.reserve_batch(slots, cur)

            r["KVCache.reserve_batch, +1 token each"] = median_us(grow, min(args.iters, 400))
            # the same calls, each the first after a wait for the device (as in kv_growth's step), and
            # calls that do nothing as the anchors of what that wait alone costs a call
            n, ms = args.after_sync_iters, args.after_sync_ms
            r["after a sync: reserve_batch"] = after_sync_us(lambda: kv.reserve_batch(slots, cur), n, ms)
            r["after a sync: C++ reserve_batch"] = after_sync_us(lambda: kv._m.reserve_batch(slots, cur), n, ms)
            r["after a sync: publish_lengths"] = after_sync_us(kv.publish_lengths, n, ms)
            r["after a sync: a binding that does nothing"] = after_sync_us(lambda: kv._m.suspended, n, ms)
            r["after a sync: Python that does nothing"] = after_sync_us(lambda: None, n, ms)
            r.update(after_sync_split_us(kv, slots, cur, n, ms))
            r.update(after_sync_split_us(kv, slots, cur, n, ms, publish_first=True))
            r["after a sync: reserve_batch, measured again last"] = after_sync_us(
                lambda: kv.reserve_batch(slots, cur), n, ms)
        finally:
            kv.close()
        out[f"lookahead={lookahead}"] = r
    modes = list(out)
    rows = [[call, *[round(out[m][call], 1) for m in modes]] for call in out[modes[0]]]
    print_table(f"reserve_batch host time, {args.seqs} sequences, microseconds (median)", ["call", *modes], rows)
    write_json("kv_reserve_batch", {"args": vars(args), "results": out})


if __name__ == "__main__":
    main()
