"""Split-K (flash-decoding) GQA decode attention over the strided vTensor KV cache, in Triton.

One query token per sequence. Layer ``l``'s cache is ``[max_seqs, max_tokens, kv_heads, head_dim]``
with any strides (the ``[slot][token][layer][k|v][head][dim]`` layout of :class:`glake.kvcache.KVCache`):
sequence ``b``'s keys are rows ``[0, lengths[b])`` of slot ``slots[b]``, read in place, no block
table and no copy. Only those rows are touched (masked loads), so unbacked rows past a sequence's
end are never read.

Work is split three ways: (sequence, KV head, token split). A program holds the ``G = heads /
kv_heads`` query heads of its KV head (padded to 16 rows for the tensor cores), streams its split's
K/V tiles once, and keeps an online softmax; a second kernel merges the splits by their
log-sum-exp. The split size is chosen so that the grid covers the GPU several times over whatever
the batch, and its count depends only on ``max_len`` (a host int), so the launch is CUDA-graph safe
when ``max_len`` is fixed (the engine passes the model's length when it captures).

The torch reference is :func:`glake.kvcache.decode_attention` (CPU, and the tests compare against it).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch builds
    triton = None

LOG2E = 1.4426950408889634


def available() -> bool:
    """Whether Triton can be imported (the kernel then runs on CUDA, or in Triton's interpreter)."""
    return triton is not None


if triton is not None:
    @triton.jit
    def _split_kernel(Q, K, V, Slots, Lens, OPart, LPart,
                      sq_b, sq_h, sk_s, sk_t, sk_h, sv_s, sv_t, sv_h,
                      so_b, so_h, so_s, sl_b, sl_h, scale_log2,
                      G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                      SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        length = tl.load(Lens + b)
        start = sp * SPLIT
        if start < length:
            end = min(start + SPLIT, length)
            slot = tl.load(Slots + b).to(tl.int64)
            offs_h = tl.arange(0, BLOCK_H)
            offs_d = tl.arange(0, D)
            offs_n = tl.arange(0, BLOCK_N)
            hmask = offs_h < G
            qh = kvh * G + offs_h
            q = tl.load(Q + b * sq_b + qh[:, None] * sq_h + offs_d[None, :], mask=hmask[:, None], other=0.0)
            kbase = K + slot * sk_s + kvh * sk_h
            vbase = V + slot * sv_s + kvh * sv_h
            m = tl.full([BLOCK_H], float("-inf"), tl.float32)
            l_sum = tl.zeros([BLOCK_H], tl.float32)
            acc = tl.zeros([BLOCK_H, D], tl.float32)
            for n0 in range(start, end, BLOCK_N):
                toks = n0 + offs_n
                nmask = toks < end
                k = tl.load(kbase + toks[:, None].to(tl.int64) * sk_t + offs_d[None, :], mask=nmask[:, None], other=0.0)
                qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
                qk = tl.where(nmask[None, :], qk, float("-inf"))
                m_new = tl.maximum(m, tl.max(qk, 1))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(qk - m_new[:, None])
                l_sum = l_sum * alpha + tl.sum(p, 1)
                v = tl.load(vbase + toks[:, None].to(tl.int64) * sv_t + offs_d[None, :], mask=nmask[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m = m_new
            out = acc / l_sum[:, None]
            tl.store(OPart + b * so_b + qh[:, None] * so_h + sp * so_s + offs_d[None, :], out, mask=hmask[:, None])
            tl.store(LPart + b * sl_b + qh * sl_h + sp, m + tl.log2(l_sum), mask=hmask)

    @triton.jit
    def _merge_kernel(OPart, LPart, Lens, Out, so_b, so_h, so_s, sl_b, sl_h, sout_b, sout_h,
                      D: tl.constexpr, SPLIT: tl.constexpr, MAX_SPLITS: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        length = tl.load(Lens + b)
        n = (length + SPLIT - 1) // SPLIT
        offs_s = tl.arange(0, MAX_SPLITS)
        offs_d = tl.arange(0, D)
        smask = offs_s < n
        lse = tl.load(LPart + b * sl_b + h * sl_h + offs_s, mask=smask, other=float("-inf"))
        w = tl.where(smask, tl.exp2(lse - tl.max(lse, 0)), 0.0)
        o = tl.load(OPart + b * so_b + h * so_h + offs_s[:, None] * so_s + offs_d[None, :], mask=smask[:, None],
                    other=0.0)
        out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
        tl.store(Out + b * sout_b + h * sout_h + offs_d, out.to(Out.dtype.element_ty))


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def choose_split(batch: int, kv_heads: int, max_len: int, block_n: int, num_sms: int = 132,
                 waves: int = 4, max_splits: int = 64) -> int:
    """Tokens per split: enough splits that ``batch * kv_heads * splits`` covers ``waves`` times the SMs,
    a power of two multiple of ``block_n``, at most ``max_splits`` splits of ``max_len``."""
    want = max(1, math.ceil(waves * num_sms / max(1, batch * kv_heads)))
    split = _pow2(max(block_n, math.ceil(max_len / want)))
    while math.ceil(max_len / split) > max_splits:
        split *= 2
    return split


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, max_len: int, scale: Optional[float] = None,
                     out: Optional[torch.Tensor] = None, split: Optional[int] = None, block_n: int = 64,
                     num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Decode attention of ``q`` ``[batch, heads, head_dim]`` over each sequence's cached rows.

    Parameters
    ----------
    k_cache, v_cache
        ``[max_seqs, max_tokens, kv_heads, head_dim]`` (last dimension contiguous), e.g.
        ``KVCache.k_cache(layer)``.
    slots, lengths
        ``[batch]`` int32 or int64 on the cache's device: each sequence's slot and key count
        (at least 1, every row below it backed).
    max_len
        A host int at least every length (it sets the number of splits; keep it fixed under a CUDA graph).
    out
        Optional ``[batch, heads, head_dim]`` result buffer (same dtype as ``q``).
    split, block_n, num_warps, num_stages
        Tuning (``split`` defaults to :func:`choose_split`).
    """
    if triton is None:
        raise RuntimeError("glake.serve.kernels.decode_attention needs triton (pip install triton)")
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim {d}: the kernel needs a power of two >= 16")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("the head dimension of q and of the caches must be contiguous")
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    if split is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        split = choose_split(b, hkv, max_len, block_n, sms)
    n_splits = max(1, math.ceil(max_len / split))
    o_part = torch.empty((b, hq, n_splits, d), dtype=torch.float32, device=q.device)
    l_part = torch.empty((b, hq, n_splits), dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty_like(q)
    if b == 0:
        return out
    _split_kernel[(b, hkv, n_splits)](
        q, k_cache, v_cache, slots, lengths, o_part, l_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), l_part.stride(0), l_part.stride(1),
        scale * LOG2E, G=g, BLOCK_H=max(16, _pow2(g)), BLOCK_N=block_n, D=d, SPLIT=split,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32: no TF32 rounding
        num_warps=num_warps, num_stages=num_stages)
    _merge_kernel[(b, hq)](
        o_part, l_part, lengths, out, o_part.stride(0), o_part.stride(1), o_part.stride(2),
        l_part.stride(0), l_part.stride(1), out.stride(0), out.stride(1),
        D=d, SPLIT=split, MAX_SPLITS=_pow2(n_splits), num_warps=4 if d >= 128 else 2)
    return out


__all__ = ["available", "choose_split", "decode_attention"]
