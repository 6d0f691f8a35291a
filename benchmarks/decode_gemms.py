"""The GEMMs of one decode step of a Llama-3-8B-shaped model (32 layers of fused qkv, o, fused gate_up
and down, then lm_head; 15.0 GiB of bf16 weights, each read once per step as glake.serve does), timed
at each batch size M with torch's default BLAS and with cuBLASLt, as effective weight-read bandwidth;
beside them, the anchor measured in the same run: a device-to-device copy of 4 GiB (bytes read).
What the serve step's GEMM floor is, and whether a library choice moves it.

    python3 benchmarks/decode_gemms.py [--m 1,32,64,128,256,512] [--reps 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 32, 8, 128, 128256


def timed_ms(torch, fn, reps: int) -> float:
    """Mean device ms of ``fn()`` over ``reps`` calls after two warm-ups (CUDA events)."""
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,32,64,128,256,512", help="batch sizes (tokens per step)")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        sys.exit("decode_gemms.py times cuBLAS: it needs a GPU")
    dev, dt = torch.device("cuda"), torch.bfloat16
    qkv_out = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    shapes = [(qkv_out, HIDDEN), (HIDDEN, HEADS * HEAD_DIM), (2 * FFN, HIDDEN), (HIDDEN, FFN)]
    layers = [[torch.randn(o, i, device=dev, dtype=dt) * 0.02 for o, i in shapes] for _ in range(LAYERS)]
    lm_head = torch.randn(VOCAB, HIDDEN, device=dev, dtype=dt) * 0.02
    weight_bytes = sum(w.numel() * 2 for ws in layers for w in ws) + lm_head.numel() * 2

    def step(xs):
        for ws in layers:
            for w in ws:
                F.linear(xs[w.shape[1]], w)
        F.linear(xs[HIDDEN], lm_head)

    src = torch.empty(4 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = timed_ms(torch, lambda: dst.copy_(src), args.reps)
    copy_tbs = src.numel() / copy_ms / 1e9
    del src, dst
    rows, out = [], []
    libs = ["default", "cublaslt"] if hasattr(torch.backends.cuda, "preferred_blas_library") else ["default"]
    for m in (int(v) for v in args.m.split(",")):
        xs = {k: torch.randn(m, k, device=dev, dtype=dt) for k in (HIDDEN, FFN)}
        res = {"m": m}
        for lib in libs:
            before = torch.backends.cuda.preferred_blas_library() if lib != "default" else None
            if lib != "default":
                torch.backends.cuda.preferred_blas_library(lib)
            try:
                ms = timed_ms(torch, lambda: step(xs), args.reps)
            finally:
                if before is not None:
                    torch.backends.cuda.preferred_blas_library(before)
            res[f"{lib}_ms"] = ms
            res[f"{lib}_tbs"] = weight_bytes / ms / 1e9
        out.append(res)
        rows.append([m] + [round(res[f"{lib}_{k}"], 2) for lib in libs for k in ("ms", "tbs")]
                    + [round(res["default_tbs"] / copy_tbs, 2)])
    header = ["M"] + [f"{lib} {k}" for lib in libs for k in ("ms", "TB/s")] + ["default / copy read rate"]
    print_table(f"one decode step's GEMMs ({weight_bytes / 2**30:.1f} GiB of weights); anchor: a 4 GiB "
                f"device copy reads at {copy_tbs:.2f} TB/s", header, rows)
    write_json("decode_gemms", {"args": vars(args), "machine": machine(), "weight_bytes": weight_bytes,
                                "copy_read_tbs": copy_tbs, "results": out})


if __name__ == "__main__":
    main()
