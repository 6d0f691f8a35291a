"""Attention over the vTensor KV cache (which already holds the step's K/V: the layer wrote them).

Layer ``l``'s cache is ``kv.k_cache(l)`` / ``kv.v_cache(l)``, strided tensors ``[max_seqs, max_tokens,
kv_heads, head_dim]``: a token's K/V is at ``[slot, position]``, no block table. The reference path
(CPU, and the tests) is plain torch: a batch of pure decodes goes through
:func:`glake.kvcache.attend` (one gather of each slot's cached rows, never an unbacked one), a batch
with prefill chunks attends per sequence: the chunk's queries over the slot's rows ``[0, end)``
(its cached prefix plus itself), causally. On CUDA, with ``use_flash=True``, the whole batch is one
``torch.ops.aten._flash_attention_forward`` call over the cache viewed as one column of rows
``[rows, kv_heads, head_dim]`` with ``cu_seqlens_k = slot * rows_per_slot`` (the slot stride in rows:
``max_tokens`` rounded up to whole chunks, so it must be a whole number of rows) and ``seqused_k`` = each sequence's
end (see ARCHITECTURE.md, "Facts measured on an H200"); a batch of pure decodes goes instead through
glake's Triton split-K kernel (:mod:`glake.serve.kernels.decode_attention`) when ``decode_kernel`` is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from glake.kvcache import GatherIndex, attend, gather_index
from glake.serve.kernels.decode_attention import decode_attention
from glake.serve.layers.staging import tensor_to_device, to_device


@dataclass
class AttentionMetadata:
    """Where a step's tokens go and what they attend to (built once per step by the model runner).

    Attributes
    ----------
    token_slots, positions
        ``[T]`` int64: each token's slot and position (where its K/V is written).
    seq_slots
        ``[B]`` int64: each scheduled sequence's slot (``slot_list``: the same, host ints).
    query_start
        Host ints, ``B + 1``: sequence ``i``'s tokens are ``[query_start[i], query_start[i+1])`` of the batch.
    context_start, context_end
        Host ints, ``B``: sequence ``i`` computes positions ``[context_start[i], context_end[i])``
        and attends to ``[0, context_end[i])``.
    decode_only
        Every sequence computes one token (then ``decode_index`` is set).
    decode_index
        The gather index of a decode-only batch (shared by every layer).
    cu_seqlens_q, seqused_k, cu_seqlens_k
        Device int32 tensors for the flash path (None on the reference path).
    decode_kernel
        A decode-only batch on the flash path goes through the Triton decode kernel (``seq_slots``,
        ``seqused_k`` and ``max_context``).
    """

    token_slots: torch.Tensor
    positions: torch.Tensor
    seq_slots: torch.Tensor
    slot_list: List[int]
    query_start: List[int]
    context_start: List[int]
    context_end: List[int]
    decode_only: bool
    decode_index: Optional[GatherIndex] = None
    cu_seqlens_q: Optional[torch.Tensor] = None
    seqused_k: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    decode_kernel: bool = False
    max_context: int = 0
    rows_per_slot: int = 0  # flash path: the caches' slot stride in rows (cu_seqlens_k's unit)

    @property
    def max_query_len(self) -> int:
        """The longest query chunk of the batch."""
        return max(b - a for a, b in zip(self.query_start, self.query_start[1:]))


def build_metadata(slots: List[int], starts: List[int], ends: List[int], device: torch.device,
                   rows_per_slot: int, flash: bool = False, decode_kernel: bool = False) -> AttentionMetadata:
    """The metadata of a batch where sequence ``i`` (in ``slots[i]``) computes positions ``[starts[i], ends[i])``.

    ``rows_per_slot``: the caches' slot stride over their row stride (the flash path's key offsets);
    ``decode_kernel`` (with ``flash``): a decode-only batch uses the Triton decode kernel."""
    lens = [e - s for s, e in zip(starts, ends)]
    qs = [0]
    for n in lens:
        qs.append(qs[-1] + n)
    token_slots = torch.tensor([s for s, n in zip(slots, lens) for _ in range(n)], dtype=torch.int64)
    positions = torch.cat([torch.arange(s, e, dtype=torch.int64) for s, e in zip(starts, ends)])
    seq_slots = torch.tensor(slots, dtype=torch.int64)
    decode_only = all(n == 1 for n in lens)
    meta = AttentionMetadata(tensor_to_device(token_slots, device), tensor_to_device(positions, device),
                             tensor_to_device(seq_slots, device), list(slots), qs,
                             list(starts), list(ends), decode_only)
    if decode_only and not flash:
        meta.decode_index = gather_index(meta.seq_slots, to_device(ends, torch.int64, device), max(ends))
    if flash:
        meta.cu_seqlens_q = to_device(qs, torch.int32, device)
        meta.seqused_k = to_device(ends, torch.int32, device)
        # sequence i's keys start at its slot's first row; only seqused_k of them are read
        meta.cu_seqlens_k = to_device([s * rows_per_slot for s in slots + [max(slots) + 1]], torch.int32, device)
        meta.rows_per_slot = rows_per_slot
        meta.decode_kernel = decode_kernel and decode_only
        meta.max_context = max(ends)
    return meta


class CacheAttention(torch.nn.Module):
    """Scaled dot-product attention of one layer over its slice of the KV cache (GQA included).

    Parameters
    ----------
    num_heads, num_kv_heads, head_dim
        Query heads, KV heads (a divisor of ``num_heads``), and their width.
    scale
        Softmax scale (``head_dim ** -0.5`` by default).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: Optional[float] = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """``q`` ``[T, heads, D]`` of the step's tokens -> ``[T, heads, D]``, over the caches, which already
        hold this step's K/V (:func:`glake.serve.kernels.fused.rope_and_cache` wrote them)."""
        if meta.decode_kernel:
            return decode_attention(q, k_cache, v_cache, meta.seq_slots, meta.seqused_k, meta.max_context, self.scale)
        if meta.cu_seqlens_q is not None:
            return self._flash(q, k_cache, v_cache, meta)
        if meta.decode_only:
            return attend(q, k_cache, v_cache, meta.decode_index, self.scale)
        out = torch.empty_like(q)
        groups = self.num_heads // self.num_kv_heads
        for i, slot in enumerate(meta.slot_list):  # host ints: no device sync
            a, b = meta.query_start[i], meta.query_start[i + 1]
            start, end = meta.context_start[i], meta.context_end[i]
            kc = k_cache[slot, :end].transpose(0, 1)  # [kv_heads, end, D]: backed rows only
            vc = v_cache[slot, :end].transpose(0, 1)
            if groups > 1:
                kc = kc.repeat_interleave(groups, dim=0)
                vc = vc.repeat_interleave(groups, dim=0)
            qi = q[a:b].transpose(0, 1)               # [heads, n, D]
            qpos = torch.arange(start, end, device=q.device)
            mask = torch.arange(end, device=q.device)[None, :] <= qpos[:, None]  # causal over prefix + chunk
            o = F.scaled_dot_product_attention(qi, kc.to(q.dtype), vc.to(q.dtype), attn_mask=mask, scale=self.scale)
            out[a:b] = o.transpose(0, 1)
        return out

    def _flash(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
        # K/V of this layer as one column of rows [rows, kv_heads, D] with the cache's row stride: slot s starts
        # at row s * rows_per_slot (the slot stride is max_tokens rounded up to whole chunks, not max_tokens),
        # and seqused_k says how many of its rows are real (CUDA only, fp16/bf16)
        s, t, h, d = k_cache.shape
        stride = k_cache.stride()
        rows = (s - 1) * meta.rows_per_slot + t
        kf = k_cache.as_strided((rows, h, d), (stride[1], stride[2], stride[3]))
        vf = v_cache.as_strided((rows, h, d), (stride[1], stride[2], stride[3]))
        out = torch.ops.aten._flash_attention_forward(
            q, kf, vf, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_query_len, max(meta.context_end), 0.0, True,
            False, scale=self.scale, seqused_k=meta.seqused_k)[0]
        return out
