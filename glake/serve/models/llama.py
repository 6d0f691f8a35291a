"""The Llama family over the vTensor KV cache: RMSNorm, RoPE (incl. llama3 and linear scaling), GQA, SwiGLU.

Module and parameter names are Hugging Face's (``model.layers.0.self_attn.q_proj.weight``, ...), so a
HF checkpoint loads by name (:mod:`glake.serve.models.loader`, strictly: nothing missing or left over). The forward pass takes the step's tokens
flattened (``[T]`` ids and positions of every scheduled sequence, back to back) and the attention
metadata; each layer writes its K/V into ``kv.k_cache(l)`` / ``kv.v_cache(l)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from glake.errors import InvalidArgumentError
from glake.kvcache import KVCache
from glake.serve.kernels.fused import rms_norm, rope_and_cache, silu_mul
from glake.serve.layers.attention import AttentionMetadata, CacheAttention


@dataclass
class ModelArgs:
    """The shape of a Llama-family model, read from a HF config (:meth:`from_hf`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[Dict[str, Any]]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @staticmethod
    def from_hf(config: Any, qkv_bias: Optional[bool] = None) -> "ModelArgs":
        """Reads a ``transformers`` config (v4's ``rope_theta``/``rope_scaling`` or v5's ``rope_parameters``)."""
        if getattr(config, "hidden_act", "silu") != "silu":
            raise InvalidArgumentError(f"hidden_act={config.hidden_act!r}: only silu (SwiGLU) is implemented")
        if getattr(config, "use_sliding_window", False):
            raise InvalidArgumentError("use_sliding_window=True: sliding-window attention is not implemented")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        theta = rope.pop("rope_theta", getattr(config, "rope_theta", 10000.0))
        scaling = getattr(config, "rope_scaling", None) or rope or None
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
            elif kind not in ("llama3", "linear"):
                raise InvalidArgumentError(f"rope_type={kind!r} is not implemented (default, linear, llama3 are)")
        heads = config.num_attention_heads
        bias = getattr(config, "attention_bias", False)
        return ModelArgs(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_norm_eps=config.rms_norm_eps, rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=bias if qkv_bias is None else qkv_bias, o_bias=bias and qkv_bias is None,
            mlp_bias=bool(getattr(config, "mlp_bias", False)))


def fuse_linears(*parts: nn.Linear) -> nn.Linear:
    """One ``nn.Linear`` whose output is ``parts``' outputs side by side (their weights stacked)."""
    w = parts[0].weight
    fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                      device="meta", dtype=w.dtype)
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        if parts[0].bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 (HF's LlamaRMSNorm), with the residual add fused."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)`` over the last dimension (``(norm(x), x)`` without one)."""
        return rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[Dict[str, Any]]) -> torch.Tensor:
    """RoPE's inverse frequencies ``[head_dim / 2]``, with linear or llama3 (Llama 3.1) scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)  # long wavelengths: slowed down
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE (HF's half-rotation convention) at explicit positions."""

    def __init__(self, head_dim: int, theta: float, scaling: Optional[Dict[str, Any]]) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """``cos``/``sin`` ``[T, head_dim]`` for ``positions`` ``[T]`` (computed once per step for all layers)."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)



class LlamaAttention(nn.Module):
    """GQA self-attention: q/k/v projections (optional bias), RoPE, cache attention, o projection."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        h, d = args.hidden_size, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, d
        self.q_proj = nn.Linear(h, args.num_heads * d, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, args.num_kv_heads * d, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, args.num_kv_heads * d, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * d, h, bias=args.o_bias)
        self.attn = CacheAttention(args.num_heads, args.num_kv_heads, d)
        self.qkv_proj: Optional[nn.Linear] = None

    def fuse_projections(self) -> None:
        """Replaces q/k/v_proj by one ``qkv_proj`` (one GEMM instead of three), once the weights are loaded."""
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                kv: KVCache) -> torch.Tensor:
        """``x`` ``[T, hidden]`` -> ``[T, hidden]``; writes this layer's K/V of the step's tokens."""
        t = x.shape[0]
        hd, kd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([hd, kd, kd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv.k_cache(self.layer), kv.v_cache(self.layer)
        # RoPE of q and k, and k/v written at [slot, position] of the cache (those rows are backed: the
        # engine reserved them), in one kernel on cuda
        q = rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, meta.token_slots, meta.positions)
        o = self.attn(q, k_cache, v_cache, meta)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        h, i = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=args.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=args.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=args.mlp_bias)
        self.gate_up_proj: Optional[nn.Linear] = None

    def fuse_projections(self) -> None:
        """Replaces gate/up_proj by one ``gate_up_proj``, once the weights are loaded."""
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, hidden]`` -> ``[T, hidden]``."""
        if self.gate_up_proj is not None:
            return self.down_proj(silu_mul(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, layer)
        self.mlp = LlamaMLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata, kv: KVCache) -> Tuple[torch.Tensor, torch.Tensor]:
        """One layer over the step's tokens: ``(mlp output, residual)``; the layer's input is ``x + residual``
        (``x`` alone in the first layer), and the next norm adds the two."""
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, meta, kv)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """Embeddings, the decoder layers, the final norm."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: KVCache) -> torch.Tensor:
        """``[T]`` ids at ``[T]`` positions -> hidden states ``[T, hidden]``."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.cos_sin(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, meta, kv)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM over the KV cache (HF's parameter names; tied or untied embeddings).

    Parameters
    ----------
    args
        The model's shape (:meth:`ModelArgs.from_hf`).
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> None:
        """Fuses every layer's q/k/v and gate/up projections (after loading: HF's names are gone then)."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: KVCache) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` of the step's tokens (:meth:`compute_logits` maps the sampled ones)."""
        return self.model(input_ids, positions, meta, kv)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> ``[N, vocab]``."""
        return self.lm_head(hidden)
