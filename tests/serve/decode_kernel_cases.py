"""Cases of the Triton decode-attention kernel against the torch reference, run on CUDA in the test
process or, on CPU, under Triton's interpreter in a child (``python -m tests.serve.decode_kernel_cases``)."""

from __future__ import annotations

import json
import sys

import torch

# (heads, kv_heads, head_dim, lengths, split, block_n): GQA 1, 4 and 8 (padded to 16 rows), a length of
# 1, lengths inside one split, across several and at a split's edge, head_dim 64 and 128.
CASES = [
    (8, 2, 32, [1, 77, 300, 129], 64, 32),
    (4, 4, 64, [5, 64, 65, 200], 64, 32),
    (16, 2, 32, [130, 3, 256], 32, 16),
    (8, 1, 128, [40, 97], None, 32),
]


def run_case(device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, lengths, split, block_n,
             layers: int = 3, layer: int = 1, seed: int = 0) -> float:
    """Max abs error of the kernel against the reference over a strided ``[slot][token][layer][k|v][head][dim]``
    cache whose rows past each sequence's end hold NaN (read one and the result is NaN)."""
    from glake.kvcache.attention import decode_attention as reference
    from glake.serve.kernels.decode_attention import decode_attention

    g = torch.Generator().manual_seed(seed)
    slots_n, tokens = len(lengths) + 2, max(lengths) + 5
    cache = torch.randn(slots_n, tokens, layers, 2, kv_heads, head_dim, generator=g).to(dtype)
    slots = torch.randperm(slots_n, generator=g)[:len(lengths)]
    for s, n in zip(slots.tolist(), lengths):
        cache[s, n:] = float("nan")
    q = torch.randn(len(lengths), heads, head_dim, generator=g).to(dtype)
    cache, q = cache.to(device), q.to(device)
    k, v = cache[:, :, layer, 0], cache[:, :, layer, 1]
    lens = torch.tensor(lengths, device=device)
    slots = slots.to(device)
    out = decode_attention(q, k, v, slots.int(), lens.int(), max(lengths), split=split, block_n=block_n)
    clean = cache.nan_to_num(0.0)
    ref = reference(q.float(), clean[:, :, layer, 0].float(), clean[:, :, layer, 1].float(), slots, lens, max(lengths))
    err = (out.float() - ref).abs().max().item()
    return err if out.isfinite().all() else float("inf")


def main() -> None:
    import tests.serve.triton_interp  # noqa: F401  (before triton is used)

    dtype = getattr(torch, sys.argv[1])
    print(json.dumps([run_case("cpu", dtype, *c) for c in CASES]))


if __name__ == "__main__":
    main()
