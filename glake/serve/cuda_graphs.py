"""CUDA graphs of the decode step at bucketed batch sizes, captured into one shared memory pool.

A decode step of ``b`` sequences replays the graph of the smallest bucket ``>= b``: the step's token
ids, positions, slots and key counts are copied (one host-to-device copy) into static buffers that
every graph reads, and rows past ``b`` are padding that computes on a slot of its own (the engine
keeps one KV slot with one backed row for it), so they never touch a real sequence's cache. The
graphs read the KV cache at fixed virtual addresses: chunks mapped between replays (vTensor) are
simply there, nothing is re-captured. The Triton decode kernel's split count depends only on the
model length, fixed at capture. Sampling runs after the replay, outside the graph.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from glake.kvcache import KVCache
from glake.serve.layers.attention import AttentionMetadata


def default_buckets(max_batch: int) -> List[int]:
    """1, 2, 4, 8, then every 16 up to ``max_batch`` (which is always a bucket)."""
    out = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(out + [max_batch]))


def bucket_for(buckets: Sequence[int], n: int) -> Optional[int]:
    """The smallest bucket holding ``n`` rows, or None when ``n`` exceeds them all."""
    for b in buckets:
        if b >= n:
            return b
    return None


class DecodeGraphs:
    """Captured decode steps of ``model`` over ``kv`` for batch sizes ``buckets`` (largest first, one pool).

    Parameters
    ----------
    model
        A serve model (``model(ids, positions, meta, kv)`` and ``compute_logits``).
    kv
        Its KV cache; ``pad_slot`` is a slot of it with at least one backed row, for padding rows.
    max_len
        The longest sequence (the decode kernel's split count is fixed by it).
    """

    def __init__(self, model: torch.nn.Module, kv: KVCache, pad_slot: int, max_len: int,
                 buckets: Sequence[int]) -> None:
        self.model, self.kv, self.pad_slot, self.max_len = model, kv, pad_slot, max_len
        self.buckets = sorted(set(int(b) for b in buckets))
        n = self.buckets[-1]
        dev = kv.torch_device
        # rows: token id, position, slot, key count; one pinned staging copy of them per step
        self._host = torch.zeros((4, n), dtype=torch.int64, pin_memory=True)
        self._dev = torch.zeros((4, n), dtype=torch.int64, device=dev)
        self._copied = torch.cuda.Event()  # the last staging copy is done: the buffer can be rewritten
        self._graphs: Dict[int, Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self._pad(0)
        self._dev.copy_(self._host)
        with torch.inference_mode():
            for b in reversed(self.buckets):
                self._graphs[b] = self._capture(b)
        torch.cuda.synchronize(dev)

    def _meta(self, b: int) -> AttentionMetadata:
        ids, pos, slots, lens = self._dev[:, :b]
        return AttentionMetadata(token_slots=slots, positions=pos, seq_slots=slots, slot_list=[], query_start=[],
                                 context_start=[], context_end=[], decode_only=True, seqused_k=lens,
                                 decode_kernel=True, max_context=self.max_len)

    def _capture(self, b: int) -> Tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        meta = self._meta(b)
        ids, pos = self._dev[0, :b], self._dev[1, :b]
        stream = torch.cuda.Stream(self.kv.torch_device)
        stream.wait_stream(torch.cuda.current_stream(self.kv.torch_device))
        with torch.cuda.stream(stream):  # warm-up off the capture (Triton compiles, cuBLAS picks)
            self.model.compute_logits(self.model(ids, pos, meta, self.kv))
        torch.cuda.current_stream(self.kv.torch_device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model.compute_logits(self.model(ids, pos, meta, self.kv))
        return graph, logits

    def _pad(self, start: int) -> None:
        self._host[0, start:] = 0
        self._host[1, start:] = 0
        self._host[2, start:] = self.pad_slot
        self._host[3, start:] = 1

    def can_run(self, n: int) -> bool:
        """Whether a decode batch of ``n`` sequences has a graph."""
        return 0 < n <= self.buckets[-1]

    def run(self, ids: Union[List[int], torch.Tensor], positions: List[int], slots: List[int]) -> torch.Tensor:
        """Replays the step for these sequences (their new token, its position, their slot); returns their
        logits ``[n, vocab]`` (a view of the graph's output: read it before the next replay). ``ids`` may
        be a device tensor (a step in flight sampled them)."""
        n = len(positions)
        b = bucket_for(self.buckets, n)
        graph, logits = self._graphs[b]
        h = self._host
        self._copied.synchronize()
        if not isinstance(ids, torch.Tensor):
            h[0, :n] = torch.tensor(ids, dtype=torch.int64)
        p = torch.tensor(positions, dtype=torch.int64)
        h[1, :n] = p
        h[2, :n] = torch.tensor(slots, dtype=torch.int64)
        h[3, :n] = p + 1
        self._pad(n)
        self._dev[:, :b].copy_(h[:, :b], non_blocking=True)
        self._copied.record()
        if isinstance(ids, torch.Tensor):
            self._dev[0, :n].copy_(ids)  # device to device, after the staging copy (same stream)
        graph.replay()
        return logits[:n]


__all__ = ["DecodeGraphs", "default_buckets", "bucket_for"]
