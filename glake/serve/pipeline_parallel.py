"""Pipeline parallelism of a Llama-family serve model: the decoder layers split into consecutive stages.

:func:`split_layers` gives each stage a contiguous range of layers (the first stages one more when they
do not divide evenly). :class:`PipelineStage` is one stage's model, with the serve model's interface
(``args``, ``forward(ids, positions, meta, kv)``, ``compute_logits``), so that an unchanged
:class:`~glake.serve.engine.LLMEngine` runs it:

- the first stage embeds the step's tokens; every other stage receives ``(hidden, residual)``
  ``[T, hidden]`` from the previous one (``T`` is known on every rank: they all run the same scheduler);
- each stage runs its layers, renumbered ``0..n-1`` so that its KV cache holds only its layers;
- every stage but the last sends ``(hidden, residual)`` on; the last applies the final norm and the
  lm_head, and broadcasts the sampled rows' logits back along the pipeline so that every rank samples
  the same tokens (and keeps the same scheduler state).

The schedule is **one batch per step**: stage ``s + 1`` waits for stage ``s`` and the stages do not
overlap (gLLM-style micro-batches, which split a step's batch so that the stages work on different
parts at once, are not done). Pipeline parallelism here spreads the weights and the KV cache over
more devices; it does not make a step faster.
"""

from __future__ import annotations

import dataclasses
from typing import List

import torch
from torch import nn

from glake.errors import InvalidArgumentError
from glake.kvcache import KVCache
from glake.serve.layers.attention import AttentionMetadata
from glake.serve.models.llama import LlamaForCausalLM
from glake.serve.ranks import RankGroup


def split_layers(num_layers: int, pp: int) -> List[range]:
    """The layers of each of ``pp`` stages: contiguous, in order, sizes differing by at most one (the
    first ``num_layers % pp`` stages have the extra layer).

    Raises
    ------
    InvalidArgumentError
        ``pp < 1`` or more stages than layers.
    """
    if pp < 1:
        raise InvalidArgumentError(f"pipeline_parallel_size={pp} must be >= 1")
    if pp > num_layers:
        raise InvalidArgumentError(f"pipeline_parallel_size={pp} is more stages than the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class PipelineStage(nn.Module):
    """One pipeline stage of a (possibly tensor-sharded) :class:`LlamaForCausalLM`.

    It takes the stage's modules from ``model`` (the embedding on the first stage, the final norm and the
    lm_head on the last, the stage's layers everywhere); the rest of ``model`` is dropped with it.

    Parameters
    ----------
    model
        The full-depth model (tensor-sharded already when the job has tensor parallelism too).
    group
        This rank's place: its stage is ``group.pp_rank`` of ``group.pp_size``.

    Attributes
    ----------
    args
        ``model.args`` with ``num_layers`` = this stage's layers (what its KV cache holds).
    layers
        Which of the model's layers this stage runs.
    """

    def __init__(self, model: LlamaForCausalLM, group: RankGroup) -> None:
        super().__init__()
        full = model.args
        self.layers = split_layers(full.num_layers, group.pp_size)[group.pp_rank]
        self.args = dataclasses.replace(full, num_layers=len(self.layers))
        self.group = group
        self.dtype = model.model.norm.weight.dtype
        self.rotary_emb = model.model.rotary_emb
        self.decoder = nn.ModuleList(model.model.layers[i] for i in self.layers)
        for local, layer in enumerate(self.decoder):
            layer.self_attn.layer = local  # its rows in this stage's KV cache
        self.embed_tokens = model.model.embed_tokens if group.is_first_stage else None
        self.norm = model.model.norm if group.is_last_stage else None
        self.lm_head = model.lm_head if group.is_last_stage else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: KVCache) -> torch.Tensor:
        """This stage's part of the step: ``[T]`` ids -> ``[T, hidden]``.

        On the last stage that is the final hidden states; on the others it is what was sent to the next
        stage (rows the runner may index; their logits come from :meth:`compute_logits`).
        """
        t = input_ids.shape[0]
        cos, sin = self.rotary_emb.cos_sin(positions, self.dtype)
        if self.embed_tokens is not None:
            x, residual = self.embed_tokens(input_ids), None
        else:
            both = self.group.recv_prev(torch.Size((2, t, self.args.hidden_size)), self.dtype)
            x, residual = both[0], both[1]
        for layer in self.decoder:
            x, residual = layer(x, residual, cos, sin, meta, kv)
        if self.norm is None:
            self.group.send_next(torch.stack((x, residual)))
            return x
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> ``[N, vocab]`` on every stage: the last computes them, the others receive them."""
        if self.lm_head is not None:
            logits = self.lm_head(hidden).contiguous()
        else:
            logits = torch.empty(hidden.shape[0], self.args.vocab_size, dtype=self.dtype, device=hidden.device)
        return self.group.broadcast_from_last_stage(logits)
