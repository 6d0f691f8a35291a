"""Cross-process dedup: N processes load the same Llama-3-8B-shaped weights and share them.

Each worker process makes the model's weight tensors (bf16, Llama-3-8B shapes: 32 layers, hidden
4096, FFN 14336, 8 KV heads, vocab 128256; 16.06 GB) with a seeded generator, the same bytes in every
process, and calls ``glake.dedup.share`` on them (packed into one arena, each 2 MiB chunk hashed on the
device, looked up in the broker, compared byte by byte, then mapped read-only in place of the
process's copy). The workers start one after another (a worker holds its weights twice while it
packs them), then all stay alive while the device memory in use is read. Columns: device memory in
use with N processes alive (cudaMemGetInfo, less what was in use before the first worker); the part
that is CUDA contexts (N times what the first worker used before it made any weight: each process
pays one); the rest, weight memory, against one process's; each worker's share time and hash and
compare throughput. Target (issue 15): 4 processes <= 1.1x one process's weight memory; dedup >= 20 GB/s.

    python3 benchmarks/dedup.py [--procs 1,2,4,8] [--layers 32] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

GiB = 1 << 30


def weight_shapes(hidden: int, ffn: int, layers: int, kv_heads: int, heads: int, vocab: int):
    """(name, shape) of a Llama-3-shaped model's weights, in load order."""
    hd = hidden // heads
    out = [("embed", (vocab, hidden))]
    for i in range(layers):
        out += [(f"l{i}.q", (hidden, hidden)), (f"l{i}.k", (kv_heads * hd, hidden)), (f"l{i}.v", (kv_heads * hd, hidden)),
                (f"l{i}.o", (hidden, hidden)), (f"l{i}.gate", (ffn, hidden)), (f"l{i}.up", (ffn, hidden)),
                (f"l{i}.down", (hidden, ffn)), (f"l{i}.n1", (hidden,)), (f"l{i}.n2", (hidden,))]
    return out + [("norm", (hidden,)), ("lm_head", (vocab, hidden))]


def worker(args) -> None:
    import torch

    import glake.dedup

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.zeros(1, device=dev)
        torch.cuda.synchronize()
    print(f"CTX {used_bytes()}", flush=True)  # this process's context, before any weight
    g = torch.Generator(device=dev).manual_seed(0)
    weights = {name: torch.randn(shape, generator=g, device=dev, dtype=torch.bfloat16)
               for name, shape in weight_shapes(args.hidden, args.ffn, args.layers, args.kv_heads, args.heads, args.vocab)}
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    t0 = time.perf_counter()
    shared = glake.dedup.share(weights)
    share_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the generated copies: gone from torch's cache too
    st = glake.dedup.stats()
    print("RESULT " + json.dumps({"weight_bytes": nbytes, "share_s": share_s, **shared.stats(),
                                  "hash_gbps": st["hash_gbps"], "compare_gbps": st["compare_gbps"],
                                  "mismatches": st["mismatches"]}), flush=True)
    sys.stdin.readline()  # stay alive until the parent has read the device memory


def used_bytes() -> int:
    import torch

    if not torch.cuda.is_available():
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free


def settle(sock: str) -> None:
    """Waits until the last run's chunks are gone (the broker closes their fds when their holders exit;
    the driver frees the memory after that)."""
    from glake.dedup.client import BrokerClient
    from glake.errors import GlakeError

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if BrokerClient(sock, autostart=False).stats()["chunks"] == 0:
                break
        except GlakeError:
            break  # no broker yet
        time.sleep(0.1)
    time.sleep(0.5)


def run_n(n: int, args, sock: str) -> dict:
    env = dict(os.environ, GLAKE_DEDUP_SOCKET=sock)
    settle(sock)
    base = used_bytes()
    cmd = [sys.executable, __file__, "--worker"] + [f"--{k}={v}" for k, v in
                                                    (("hidden", args.hidden), ("ffn", args.ffn), ("layers", args.layers),
                                                     ("kv-heads", args.kv_heads), ("heads", args.heads), ("vocab", args.vocab))]
    procs, results, ctx = [], [], 0
    try:
        for _ in range(n):  # one after another: each holds its weights twice while packing
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            procs.append(p)
            first = next((l for l in p.stdout if l.startswith("CTX ")), None)
            line = next((l for l in p.stdout if l.startswith("RESULT ")), None) if first else None
            if line is None:
                raise RuntimeError(f"worker {len(procs)} of {n} failed (exit {p.wait()})")
            if len(procs) == 1:
                ctx = int(first.split()[1]) - base  # the first worker's context, alone on the device
            results.append(json.loads(line[7:]))
        time.sleep(0.5)
        used = used_bytes() - base
    finally:
        for p in procs:
            if p.poll() is None:
                p.stdin.close()
        for p in procs:
            p.wait(60)
    return {"procs": n, "used_bytes": used, "context_bytes": n * ctx, "weight_bytes_held": used - n * ctx,
            "workers": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="1,2,4,8")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tiny", action="store_true", help="a small shape (CPU smoke runs: the host backend)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.hidden, args.ffn, args.layers, args.vocab = 256, 1024, 2, 4096
    if args.worker:
        worker(args)
        return
    sock = os.path.join(tempfile.mkdtemp(prefix="glake-dedup-bench-"), "dedup.sock")
    try:
        runs = []
        for n in args.procs.split(","):
            runs.append(run_n(int(n), args, sock))
            r = runs[-1]
            print(f"{n} processes: {r['used_bytes'] / GiB:.2f} GiB in use, of it {r['weight_bytes_held'] / GiB:.2f} "
                  f"GiB weights; share {max(w['share_s'] for w in r['workers']):.2f} s (slowest)", flush=True)
    finally:
        from glake.dedup.client import stop_broker

        stop_broker(sock)
    one = next((r["weight_bytes_held"] for r in runs if r["procs"] == 1), 0)
    rows = []
    for r in runs:
        ws = r["workers"]
        rows.append([r["procs"], round(r["used_bytes"] / GiB, 2), round(r["context_bytes"] / GiB, 2),
                     round(r["weight_bytes_held"] / GiB, 2), round(r["weight_bytes_held"] / one, 3) if one else "",
                     round(max(w["share_s"] for w in ws), 2),
                     round(ws[0]["weight_bytes"] / 1e9 / max(w["share_s"] for w in ws), 1),
                     round(min(w["hash_gbps"] for w in ws), 1),
                     round(min([w["compare_gbps"] for w in ws if w["compare_gbps"]] or [0.0]), 1),
                     sum(w["saved_bytes"] for w in ws) // (1 << 20), sum(w["mismatches"] for w in ws)])
    weights = runs[0]["workers"][0]["weight_bytes"]
    print_table(f"Dedup: N processes with the same {weights / 1e9:.2f} GB of weights "
                f"({args.layers} layers, hidden {args.hidden}); device memory in use with all N alive",
                ["procs", "device GiB", "contexts GiB", "weights GiB", "weights vs 1 process", "share s (slowest)",
                 "share GB/s (slowest)", "hash GB/s (min)",
                 "compare GB/s (min)", "saved MiB", "mismatches"], rows)
    write_json("dedup", {"args": vars(args), "weight_bytes": weights, "runs": runs})


if __name__ == "__main__":
    main()
