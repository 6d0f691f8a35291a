"""Tensor parallelism (Megatron-style) of a Llama-family serve model: :func:`shard` turns the full model
into one rank's shard, in place.

What each rank of the tensor group holds (``tp`` ranks, rank ``r``):

- attention: query heads ``[r * H/tp, (r+1) * H/tp)`` and KV heads ``[r * KV/tp, (r+1) * KV/tp)`` of
  q/k/v (column-parallel by heads, biases included: Qwen2), so its KV cache holds only its KV heads;
  o_proj's matching input columns (row-parallel), whose partial outputs are summed (all_reduce) before
  the bias;
- MLP: rows ``[r * I/tp, (r+1) * I/tp)`` of gate and up (column-parallel), the matching columns of down
  (row-parallel + all_reduce);
- the embedding: vocabulary rows ``[r * ceil(V/tp), ...)`` (:class:`VocabParallelEmbedding`: ids outside
  the slice give zeros, then all_reduce);
- lm_head: the same vocabulary slice (:class:`ParallelLMHead`: each rank computes its slice of the
  logits, all_gather gives every rank the full ``[N, V]``, so every rank samples the same tokens); a tied
  lm_head shares the embedding's slice.

The fused layouts of the loader (``qkv_proj`` = q, k, v stacked; ``gate_up_proj`` = gate, up stacked)
are sliced part by part, so a model can be sharded before or after :meth:`fuse_projections`. The shard's
``args`` say the local ``num_heads`` / ``num_kv_heads`` / ``intermediate_size`` (the engine sizes the
KV cache from them); ``vocab_size`` and ``hidden_size`` stay the full model's.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from glake.errors import InvalidArgumentError
from glake.serve.layers.attention import CacheAttention
from glake.serve.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, ModelArgs
from glake.serve.ranks import RankGroup


def check_shardable(args: ModelArgs, tp: int) -> None:
    """Raises :class:`InvalidArgumentError` unless ``args``' model splits over ``tp`` tensor ranks: the
    query heads, the KV heads and the MLP width must all divide by ``tp`` (KV heads are not replicated)."""
    if tp < 1:
        raise InvalidArgumentError(f"tensor_parallel_size={tp} must be >= 1")
    for name, n in (("num_key_value_heads", args.num_kv_heads), ("num_attention_heads", args.num_heads),
                    ("intermediate_size", args.intermediate_size)):
        if n % tp:
            raise InvalidArgumentError(f"tensor_parallel_size={tp} does not divide {name}={n} (each rank holds "
                                       f"{name} / tp; KV heads are not replicated across ranks)")


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """An ``nn.Linear`` owning copies of ``weight`` / ``bias`` (a slice's copy: the full tensor can be freed)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return lin


def _rows(t: Optional[torch.Tensor], sizes: List[int], rank: int, tp: int) -> Optional[torch.Tensor]:
    """Rank ``rank``'s share of every part of ``t`` stacked along dim 0 in parts of ``sizes`` rows."""
    if t is None:
        return None
    out = []
    for part in t.split(sizes, dim=0):
        n = part.shape[0] // tp
        out.append(part[rank * n:(rank + 1) * n])
    return torch.cat(out)


class RowParallelLinear(nn.Module):
    """A linear layer whose input features are split over the tensor group: each rank multiplies its
    columns, the partial outputs are summed (all_reduce), then the (full, unsplit) bias is added once."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], group: RankGroup) -> None:
        super().__init__()
        self.linear = _linear(weight, None)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, in / tp]`` -> ``[T, out]``, the same on every rank of the group."""
        y = self.group.all_reduce(self.linear(x))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """The embedding rows of one vocabulary slice; ids outside it contribute zeros, all_reduce sums the slices.

    Parameters
    ----------
    weight
        ``[per_rank, hidden]``: rows ``[start, start + per_rank)`` of the full table (zero rows past the vocabulary).
    start, vocab_size
        Where the slice begins, and the full vocabulary (ids at or past it are in no slice).
    """

    def __init__(self, weight: nn.Parameter, start: int, vocab_size: int, group: RankGroup) -> None:
        super().__init__()
        self.weight = weight
        self.start, self.end = start, min(start + weight.shape[0], vocab_size)
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``[T]`` ids -> ``[T, hidden]`` (the full embedding on every rank)."""
        inside = (ids >= self.start) & (ids < self.end)
        x = F.embedding(torch.where(inside, ids - self.start, torch.zeros_like(ids)), self.weight)
        return self.group.all_reduce(x.masked_fill(~inside[:, None], 0.0))


class ParallelLMHead(nn.Module):
    """lm_head over one vocabulary slice: the slices' logits are all-gathered into the full ``[N, vocab]``."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, group: RankGroup) -> None:
        super().__init__()
        self.weight = weight
        self.vocab_size = vocab_size
        self.group = group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> ``[N, vocab]`` on every rank (the padding rows of the last slice cut off)."""
        return self.group.all_gather(F.linear(hidden, self.weight), dim=-1)[:, :self.vocab_size]


def _vocab_slice(weight: torch.Tensor, rank: int, tp: int) -> nn.Parameter:
    """Rows ``[rank * ceil(V/tp), ...)`` of a ``[V, hidden]`` table, zero-padded to ``ceil(V/tp)`` rows."""
    v = weight.shape[0]
    per = -(-v // tp)
    part = weight[rank * per:min((rank + 1) * per, v)]
    out = torch.zeros(per, weight.shape[1], dtype=weight.dtype, device=weight.device)
    out[:part.shape[0]] = part
    return nn.Parameter(out, requires_grad=False)


def _shard_attention(attn: LlamaAttention, group: RankGroup) -> None:
    tp, r = group.tp_size, group.tp_rank
    d, h, kv = attn.head_dim, attn.num_heads, attn.num_kv_heads
    sizes = [h * d, kv * d, kv * d]
    if attn.qkv_proj is not None:
        p = attn.qkv_proj
        attn.qkv_proj = _linear(_rows(p.weight, sizes, r, tp), _rows(p.bias, sizes, r, tp))
    else:
        for name, n in (("q_proj", sizes[0]), ("k_proj", sizes[1]), ("v_proj", sizes[2])):
            p = getattr(attn, name)
            setattr(attn, name, _linear(_rows(p.weight, [n], r, tp), _rows(p.bias, [n], r, tp)))
    o = attn.o_proj
    cols = h * d // tp
    attn.o_proj = RowParallelLinear(o.weight[:, r * cols:(r + 1) * cols], o.bias, group)
    attn.num_heads, attn.num_kv_heads = h // tp, kv // tp
    attn.attn = CacheAttention(h // tp, kv // tp, d, scale=attn.attn.scale)


def _shard_mlp(mlp: LlamaMLP, group: RankGroup, width: int) -> None:
    tp, r = group.tp_size, group.tp_rank
    if mlp.gate_up_proj is not None:
        p = mlp.gate_up_proj
        mlp.gate_up_proj = _linear(_rows(p.weight, [width, width], r, tp), _rows(p.bias, [width, width], r, tp))
    else:
        for name in ("gate_proj", "up_proj"):
            p = getattr(mlp, name)
            setattr(mlp, name, _linear(_rows(p.weight, [width], r, tp), _rows(p.bias, [width], r, tp)))
    down = mlp.down_proj
    cols = width // tp
    mlp.down_proj = RowParallelLinear(down.weight[:, r * cols:(r + 1) * cols], down.bias, group)


@torch.no_grad()
def shard(model: LlamaForCausalLM, group: RankGroup) -> LlamaForCausalLM:
    """Turns ``model`` (the full, loaded model) into ``group``'s tensor-rank shard, in place; returns it.

    A no-op when the tensor group has one rank.

    Raises
    ------
    InvalidArgumentError
        The heads or the MLP width do not divide by the tensor-parallel size (:func:`check_shardable`),
        or the model is already sharded.
    """
    tp, r = group.tp_size, group.tp_rank
    if tp == 1:
        return model
    args = model.args
    check_shardable(args, tp)
    if isinstance(model.lm_head, ParallelLMHead):
        raise InvalidArgumentError("the model is already sharded")
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, group)
        _shard_mlp(layer.mlp, group, args.intermediate_size)
    embed = _vocab_slice(model.model.embed_tokens.weight, r, tp)
    per = embed.shape[0]
    model.model.embed_tokens = VocabParallelEmbedding(embed, r * per, args.vocab_size, group)
    head = embed if args.tie_word_embeddings else _vocab_slice(model.lm_head.weight, r, tp)
    model.lm_head = ParallelLMHead(head, args.vocab_size, group)
    model.args = dataclasses.replace(args, num_heads=args.num_heads // tp, num_kv_heads=args.num_kv_heads // tp,
                                     intermediate_size=args.intermediate_size // tp)
    return model
