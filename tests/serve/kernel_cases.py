"""Cases of the Triton kernels (decode attention, fused RMSNorm, RoPE + cache write, SiLU*mul) against
their torch references, run on CUDA in the test process or, on CPU, under Triton's interpreter in a
child (``python -m tests.serve.kernel_cases DTYPE``). Each case returns the max abs error."""

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


def decode_case(device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, lengths, split, block_n,
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
    err = rel(out, ref)
    return err if out.isfinite().all() else float("inf")


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's largest magnitude."""
    return (out.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-30)


def _rand(g, *shape, dtype, device):
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def rms_norm_case(device: str, dtype: torch.dtype, rows: int, hidden: int, residual: bool) -> float:
    from glake.serve.kernels.fused import rms_norm, rms_norm_reference

    g = torch.Generator().manual_seed(rows * 7 + hidden)
    x, w = _rand(g, rows, hidden, dtype=dtype, device=device), _rand(g, hidden, dtype=dtype, device=device)
    r = _rand(g, rows, hidden, dtype=dtype, device=device) if residual else None
    ref, ref_r = rms_norm_reference(x, w, 1e-5, r)
    out, out_r = rms_norm(x, w, 1e-5, None if r is None else r.clone(), use_triton=True)
    return max(rel(out, ref), rel(out_r, ref_r))


def rope_case(device: str, dtype: torch.dtype, tokens: int, heads: int, kv_heads: int, head_dim: int) -> float:
    """q/k/v as views of one fused projection; the cache strided as KVCache's; positions at random."""
    from glake.serve.kernels.fused import rope_and_cache, rope_and_cache_reference
    from glake.serve.models.llama import RotaryEmbedding

    g = torch.Generator().manual_seed(tokens + heads)
    qkv = _rand(g, tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k, v = (x.reshape(tokens, -1, head_dim) for x in (q, k, v))
    slots = torch.randint(0, 3, (tokens,), generator=g).to(device)
    pos = torch.randperm(64, generator=g)[:tokens].to(device)
    cos, sin = RotaryEmbedding(head_dim, 10000.0, None).to(device).cos_sin(pos, dtype)
    caches = [torch.zeros(3, 64, 2, 2, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2)]
    ref_q = rope_and_cache_reference(q, k, v, cos, sin, caches[0][:, :, 1, 0], caches[0][:, :, 1, 1], slots, pos)
    out_q = rope_and_cache(q, k, v, cos, sin, caches[1][:, :, 1, 0], caches[1][:, :, 1, 1], slots, pos,
                           use_triton=True)
    return max(rel(out_q, ref_q), rel(caches[1], caches[0]))


def silu_case(device: str, dtype: torch.dtype, rows: int, inter: int) -> float:
    from glake.serve.kernels.fused import silu_mul, silu_mul_reference

    g = torch.Generator().manual_seed(rows + inter)
    x = _rand(g, rows, 2 * inter, dtype=dtype, device=device)
    return rel(silu_mul(x, use_triton=True), silu_mul_reference(x))


FUSED_CASES = {
    "rms_norm": [(rms_norm_case, (3, 64, False)), (rms_norm_case, (5, 96, True)), (rms_norm_case, (2, 4096, True))],
    "rope": [(rope_case, (5, 8, 2, 32)), (rope_case, (3, 4, 4, 64)), (rope_case, (2, 32, 8, 128))],
    "silu_mul": [(silu_case, (3, 100)), (silu_case, (2, 1500))],
}


def run_all(device: str, dtype: torch.dtype) -> dict:
    """Every case's error, by kernel name."""
    errors = {"decode": [decode_case(device, dtype, *c) for c in CASES]}
    for name, cases in FUSED_CASES.items():
        errors[name] = [fn(device, dtype, *a) for fn, a in cases]
    return errors


def main() -> None:
    import tests.serve.triton_interp  # noqa: F401  (before triton is used)

    print(json.dumps(run_all("cpu", getattr(torch, sys.argv[1]))))


if __name__ == "__main__":
    main()
