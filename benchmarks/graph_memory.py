"""Memory held by CUDA graphs of a decode-like step: torch's allocator vs glake, same run.

Captures 32 graphs of one decode step of a small Llama-shaped model (embedding, --layers blocks of
attention-free projections and a SiLU MLP, lm_head), at the batch sizes a serving engine captures
(1, 2, 4, 8, 16, ..., 256), largest first, as vLLM and nano-vllm do. Two ways of capturing:
  shared    every graph in one pool (torch.cuda.graph(g, pool=...)): what engines do;
  separate  each graph in its own pool.
Columns: bytes reserved for the graphs (reserved after capturing all, minus before), and the same
normalised by native. Each allocator runs in its own process.

    python benchmarks/graph_memory.py [--dim 4096] [--ffn 14336] [--layers 4] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

ALLOCATORS = ["native", "glake"]
MODES = ["shared", "separate"]
BATCHES = [1, 2, 4] + [8 * i for i in range(1, 29)] + [256]  # 32 sizes
MiB = 1 << 20


def worker(kind: str, mode: str, args) -> dict:
    if kind == "glake":
        import glake.torch

        glake.torch.install()
    import torch

    torch.manual_seed(0)
    dt = torch.bfloat16
    dev = "cuda"
    embed = torch.randn(args.vocab, args.dim, dtype=dt, device=dev) * 0.02
    layers = [(torch.randn(args.dim, args.dim, dtype=dt, device=dev) * 0.02,
               torch.randn(2 * args.ffn, args.dim, dtype=dt, device=dev) * 0.02,
               torch.randn(args.dim, args.ffn, dtype=dt, device=dev) * 0.02) for _ in range(args.layers)]
    head = torch.randn(args.vocab, args.dim, dtype=dt, device=dev) * 0.02

    def step(tokens):
        x = embed[tokens]
        for attn, gate_up, down in layers:
            x = x + x @ attn.t()
            g, u = (x @ gate_up.t()).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(g) * u) @ down.t()
        logits = x @ head.t()
        return torch.argmax(logits.float(), dim=-1)

    max_b = max(BATCHES)
    tokens = torch.randint(0, args.vocab, (max_b,), device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(tokens)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    graphs, outs, pool = [], [], None
    for b in sorted(BATCHES, reverse=True):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool if mode == "shared" else None):
            outs.append(step(tokens[:b]))
        if mode == "shared" and pool is None:
            pool = g.pool()
        graphs.append(g)
    torch.cuda.synchronize()
    held = torch.cuda.memory_reserved() - before
    for g in graphs:  # the graphs still compute what eager does
        g.replay()
    torch.cuda.synchronize()
    ok = bool(torch.equal(outs[0], step(tokens)))
    return {"held_bytes": held, "graphs": len(graphs), "replay_matches_eager": ok,
            "weights_bytes": before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--worker", choices=ALLOCATORS, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, default="shared", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.mode, args)))
        return
    results: dict = {}
    for mode in MODES:
        for kind in ALLOCATORS:
            cmd = [sys.executable, __file__, "--worker", kind, "--mode", mode, "--dim", str(args.dim),
                   "--ffn", str(args.ffn), "--layers", str(args.layers), "--vocab", str(args.vocab)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"{kind}/{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            results[f"{mode}/{kind}"] = json.loads(line[0][7:])
    rows = []
    for mode in MODES:
        base = results[f"{mode}/native"]["held_bytes"]
        for kind in ALLOCATORS:
            r = results[f"{mode}/{kind}"]
            rows.append([mode, kind, r["graphs"], round(r["held_bytes"] / MiB, 1),
                         round(r["held_bytes"] / base, 3) if base else "", r["replay_matches_eager"]])
    print_table(f"Memory held by {len(BATCHES)} decode-step graphs, batch 1..{max(BATCHES)} "
                f"(dim {args.dim}, ffn {args.ffn}, {args.layers} layers, vocab {args.vocab})",
                ["pools", "allocator", "graphs", "held MiB", "held / native", "replay == eager"], rows)
    write_json("graph_memory", {"args": vars(args), "batches": BATCHES, "results": results})


if __name__ == "__main__":
    main()
