"""Host time of KVCache.reserve_batch for --seqs already-backed sequences, by part: the C++ loop,
publish_lengths (the pinned copy to kv.lengths), the stream lookup it makes, the whole Python call; and
growing every sequence by one token per call (a decode step), without and with the background mapper.
Median of --iters calls after a warm-up, nothing else running.

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
    args = ap.parse_args()
    rows, out = [], {}
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
        finally:
            kv.close()
        out[f"lookahead={lookahead}"] = r
        rows.append([f"lookahead={lookahead}", *[round(v, 1) for v in r.values()]])
    print_table(f"reserve_batch host time, {args.seqs} sequences, microseconds (median)",
                ["mapper", *out["lookahead=0"].keys()], rows)
    write_json("kv_reserve_batch", {"args": vars(args), "results": out})


if __name__ == "__main__":
    main()
