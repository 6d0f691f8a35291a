"""A reference decode attention over the strided cache views, reading only backed tokens.

For an engine (and the benchmark) that has no fused paged kernel: one query token per sequence
attends to its sequence's cached tokens ``[0, length)``. The cache rows are gathered into a dense
``[batch, max_len, kv_heads, head_dim]`` buffer with every position past a sequence's length
*clamped* to its last token, so no unbacked (unmapped) row is ever read, then masked out in torch's
``scaled_dot_product_attention``. Grouped-query attention is handled by folding the query heads of
each KV head into SDPA's query-length dimension (decode has no causal mask, so this is exact).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, max_len: int, scale: Optional[float] = None) -> torch.Tensor:
    """Attention of one new token per sequence over its cached K/V.

    Parameters
    ----------
    q
        ``[batch, num_q_heads, head_dim]``; ``num_q_heads`` a multiple of the cache's KV heads.
    k_cache, v_cache
        ``KVCache.k_cache(layer)`` / ``v_cache(layer)``: ``[max_seqs, max_seq_len, kv_heads, head_dim]``.
    slots, lengths
        ``[batch]`` int64 on the cache's device: each sequence's slot and its number of cached tokens
        (at least 1, all backed).
    max_len
        A Python int >= ``lengths.max()`` (the padded length; keeping it on the host avoids a sync).

    Returns
    -------
    Tensor
        ``[batch, num_q_heads, head_dim]``.
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    pos = torch.arange(max_len, device=q.device)
    valid = pos[None, :] < lengths[:, None]                               # [b, T]
    idx = torch.minimum(pos[None, :], (lengths - 1).clamp_min(0)[:, None])  # never past the last token
    rows = slots[:, None]
    k = k_cache[rows, idx].transpose(1, 2)                                 # [b, hkv, T, d]
    v = v_cache[rows, idx].transpose(1, 2)
    qg = q.view(b, hkv, hq // hkv, d)                                      # query heads of a KV head as "query length"
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(b, hq, d)
