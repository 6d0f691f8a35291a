"""A reference decode attention over the strided cache views, reading only backed tokens.

For an engine (and the benchmark) that has no fused kernel for this layout: one query token per
sequence attends to its sequence's cached tokens ``[0, length)``. The cache rows are gathered into
a dense ``[batch, max_len, kv_heads, head_dim]`` buffer with every position past a sequence's length
*clamped* to its last token, so no unbacked (unmapped) row is ever read, then masked out in torch's
``scaled_dot_product_attention``. Grouped-query attention is handled by folding the query heads of
each KV head into SDPA's query-length dimension (decode has no causal mask, so this is exact).

The gather index depends only on (slots, lengths), so an engine computes it once per step with
:func:`gather_index` and calls :func:`attend` for every layer.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class GatherIndex(NamedTuple):
    """Where to read each (sequence, position) of a padded batch, and which positions are real."""

    rows: torch.Tensor   # [batch, 1] slot of each sequence
    pos: torch.Tensor    # [batch, max_len] token read for each position (clamped to length - 1)
    valid: torch.Tensor  # [batch, max_len] bool, position < length


def gather_index(slots: torch.Tensor, lengths: torch.Tensor, max_len: int) -> GatherIndex:
    """The gather index of a batch (``slots``, ``lengths``: ``[batch]`` int64 on the cache's device;
    every length at least 1; ``max_len`` a Python int >= every length, kept on the host to avoid a sync)."""
    p = torch.arange(max_len, device=lengths.device)
    valid = p[None, :] < lengths[:, None]
    pos = torch.minimum(p[None, :], (lengths - 1).clamp_min(0)[:, None])
    return GatherIndex(slots[:, None], pos, valid)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, index: GatherIndex,
           scale: Optional[float] = None) -> torch.Tensor:
    """Attention of ``q`` (``[batch, num_q_heads, head_dim]``) over the rows that ``index`` names.

    ``k_cache``/``v_cache`` are ``KVCache.k_cache(layer)``/``v_cache(layer)``; ``num_q_heads`` a
    multiple of their KV heads. Returns ``[batch, num_q_heads, head_dim]``.
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    k = k_cache[index.rows, index.pos].transpose(1, 2)  # [b, hkv, T, d]
    v = v_cache[index.rows, index.pos].transpose(1, 2)
    qg = q.view(b, hkv, hq // hkv, d)                   # the query heads of a KV head as "query length"
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=index.valid[:, None, None, :], scale=scale)
    return out.reshape(b, hq, d)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, max_len: int, scale: Optional[float] = None) -> torch.Tensor:
    """``attend(q, k_cache, v_cache, gather_index(slots, lengths, max_len))``: one layer, one step.

    Parameters
    ----------
    q
        ``[batch, num_q_heads, head_dim]``.
    k_cache, v_cache
        ``[max_seqs, max_seq_len, kv_heads, head_dim]`` views of a KVCache.
    slots, lengths
        ``[batch]`` int64 on the cache's device: each sequence's slot and number of cached tokens
        (at least 1, all backed).
    max_len
        A Python int >= ``lengths.max()``.
    """
    return attend(q, k_cache, v_cache, gather_index(slots, lengths, max_len), scale)
