"""ModelRunner: one step's tensors in, the sampled positions' logits out (the data plane's entry point).

It flattens the scheduled sequences' new tokens into one batch (ids, positions, each token's slot,
the query offsets ``cu_seqlens``), runs the model, and returns the logits of each sequence's last
position, only for the sequences that reach their last token this step (a prefill chunk that stops
short of the prompt's end is not sampled).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from glake.kvcache import KVCache
from glake.serve.cuda_graphs import DecodeGraphs
from glake.serve.layers.attention import build_metadata
from glake.serve.layers.staging import to_device
from glake.serve.models.llama import LlamaForCausalLM
from glake.serve.scheduler import ScheduledBatch


class ModelRunner:
    """Runs a model over a :class:`ScheduledBatch` and the KV cache.

    Parameters
    ----------
    model
        A serve model (:func:`glake.serve.models.load_model`).
    kv
        The cache its layers write into and read from.
    use_flash
        Use torch's bundled FlashAttention-2 over the cache (CUDA with fp16/bf16 only); else the
        torch reference attention.
    decode_kernel
        With ``use_flash``: batches of pure decodes through the Triton decode kernel.
    graphs
        Captured decode steps (:class:`DecodeGraphs`): a batch of pure decodes that fits replays one.
    """

    def __init__(self, model: LlamaForCausalLM, kv: KVCache, use_flash: bool = False,
                 decode_kernel: bool = False, graphs: Optional[DecodeGraphs] = None) -> None:
        self.model = model
        self.kv = kv
        self.device = kv.device
        self.use_flash = use_flash
        self.decode_kernel = decode_kernel
        self.graphs = graphs
        self.graph_steps = 0
        layout = kv.layout
        self.rows_per_slot = layout.slot_bytes // layout.row_bytes  # whole when use_flash (the engine checks)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, List[int]]:
        """Computes the batch's tokens; returns (logits ``[N, vocab]``, the batch indices they belong to).

        Row ``j`` of the logits is the last position of ``batch.seqs[rows[j]]``; ``rows`` lists the
        sequences that reach their last token this step, in batch order. ``ids``: a decode batch's
        input tokens on the device (a step in flight sampled them; the host does not know them yet),
        and then every sequence samples.
        """
        decode = all(n == 1 for n in batch.num_new)
        if ids is not None and not decode:
            raise ValueError("device input ids are for decode batches only")
        if self.graphs is not None and self.graphs.can_run(len(batch)) and decode:
            self.graph_steps += 1
            tokens = ids if ids is not None else [s.token_ids[s.num_cached_tokens] for s in batch.seqs]
            logits = self.graphs.run(tokens, [s.num_cached_tokens for s in batch.seqs], [s.slot for s in batch.seqs])
            if ids is not None:
                return logits, list(range(len(batch)))
            rows = [i for i in range(len(batch)) if batch.samples(i)]  # a 1-token prefill chunk does not
            return (logits if len(rows) == len(batch) else logits[rows]), rows
        slots, starts, ends, tokens = [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_new):
            a = seq.num_cached_tokens
            slots.append(seq.slot)
            starts.append(a)
            ends.append(a + n)
            if ids is None:
                tokens.extend(seq.token_ids[a:a + n])
        meta = build_metadata(slots, starts, ends, self.device, self.rows_per_slot, self.use_flash,
                              self.decode_kernel)
        input_ids = to_device(tokens, torch.int64, self.device) if ids is None else ids
        hidden = self.model(input_ids, meta.positions, meta, self.kv)
        rows = list(range(len(batch))) if ids is not None else [i for i in range(len(batch)) if batch.samples(i)]
        last = to_device([meta.query_start[i + 1] - 1 for i in rows], torch.int64, self.device)
        return self.model.compute_logits(hidden[last]), rows
