"""Decode attention over the strided vTensor KV cache: glake's Triton split-K kernel against torch's
bundled FlashAttention-2 (the anchor, same run, same cache), in effective TB/s (K and V bytes read).

The shape of the serving issue: 256 sequences with ShareGPT-like lengths (623 tokens on average),
8 KV heads x 128, 32 query heads, bf16, one layer of a 32-layer [slot][token][layer][k|v][head][dim]
cache (so rows are strided as in glake.kvcache.KVCache). Also sweeps the kernel's tile parameters.

    python3 benchmarks/decode_attention.py [--seqs 256] [--mean-len 623] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--mean-len", type=int, default=623)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--sweep", action="store_true", help="also sweep block_n x num_warps x num_stages")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    import triton.testing

    from glake.serve.kernels.decode_attention import decode_attention

    torch.manual_seed(args.seed)
    dev, dt = "cuda", torch.bfloat16
    b, hkv, hq, d = args.seqs, args.kv_heads, args.heads, args.head_dim
    # lengths: exponential around the mean, clipped to [1, max_len] (ShareGPT contexts are skewed)
    lens = torch.empty(b).exponential_(1.0 / args.mean_len).clamp(1, args.max_len).round().long()
    lens = (lens * args.mean_len / lens.float().mean()).round().clamp(1, args.max_len).long()
    cache = torch.empty(b, args.max_len, args.layers, 2, hkv, d, device=dev, dtype=dt)  # 32 layers: 69 GB
    layer = args.layers // 2
    k, v = cache[:, :, layer, 0], cache[:, :, layer, 1]
    k.normal_()
    v.normal_()
    slots = torch.randperm(b, device=dev)
    lens_d = lens.to(dev)
    q = torch.randn(b, hq, d, device=dev, dtype=dt)
    max_len = int(lens.max())
    nbytes = int(lens.sum()) * hkv * d * 2 * cache.element_size()

    # the anchor: FA2 varlen over the same strided cache (cu_seqlens_k = slot * max_tokens, seqused_k)
    st = k.stride()
    kf = k.as_strided((b * args.max_len, hkv, d), (st[1], st[2], st[3]))
    vf = v.as_strided((b * args.max_len, hkv, d), (st[1], st[2], st[3]))
    cu_q = torch.arange(b + 1, device=dev, dtype=torch.int32)
    # cu_seqlens_k must rise: order the batch by slot for FA2 (the kernel does not care)
    order = torch.argsort(slots)
    q_fa, slots_fa, lens_fa = q[order], slots[order].int(), lens_d[order].int()
    cu_k = torch.cat([slots_fa, slots_fa.new_tensor([slots_fa.max().item() + 1])]) * args.max_len

    def fa2():
        return torch.ops.aten._flash_attention_forward(q_fa, kf, vf, cu_q, cu_k, 1, max_len, 0.0, False, False,
                                                       scale=d ** -0.5, seqused_k=lens_fa)[0]

    def glake(**kw):
        return decode_attention(q, k, v, slots.int(), lens_d.int(), max_len, **kw)

    ref = glake()
    err = (fa2().float() - ref[order].float()).abs().max().item()
    rows = []
    ms = triton.testing.do_bench(fa2, warmup=25, rep=200)
    rows.append(["FA2 (torch bundled)", "-", ms * 1e3, nbytes / ms / 1e9])
    ms = triton.testing.do_bench(glake, warmup=25, rep=200)
    rows.append(["glake triton (default)", "-", ms * 1e3, nbytes / ms / 1e9])
    if args.sweep:
        for bn, w, s in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3)):
            try:
                ms = triton.testing.do_bench(lambda: glake(block_n=bn, num_warps=w, num_stages=s), warmup=10, rep=100)
            except Exception as e:  # a config that does not fit (shared memory)
                print(f"block_n={bn} warps={w} stages={s}: {type(e).__name__}")
                continue
            rows.append(["glake triton", f"bn={bn} w={w} s={s}", ms * 1e3, nbytes / ms / 1e9])
    rows = [[r[0], r[1], round(r[2], 1), round(r[3], 3)] for r in rows]
    print(f"{b} sequences, mean {float(lens.float().mean()):.0f} tokens (max {max_len}), {hkv} KV heads x {d}, "
          f"{hq} query heads, bf16; K+V bytes read {nbytes / 1e6:.0f} MB; max |glake - FA2| {err:.4f}")
    print_table("Decode attention over the strided cache", ["kernel", "config", "us", "TB/s"], rows)
    write_json("decode_attention", {"args": vars(args), "max_abs_diff_vs_fa2": err, "bytes": nbytes,
                                    "rows": [dict(zip(["kernel", "config", "us", "tb_s"], r)) for r in rows]})


if __name__ == "__main__":
    main()
