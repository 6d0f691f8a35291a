"""Builds a serve model from a local Hugging Face directory (config.json + safetensors) or an in-memory HF model.

A directory needs ``config.json`` and either ``model.safetensors`` or ``model.safetensors.index.json``
with its shards; a tokenizer in it is loaded too (``AutoTokenizer``, local files only). An in-memory
``transformers`` model (the tests build tiny random ones) has its ``state_dict`` copied. Nothing is
downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Type, Union

import torch

from glake.errors import InvalidArgumentError
from glake.serve.models.llama import LlamaForCausalLM, ModelArgs, rope_inv_freq
from glake.serve.models.qwen2 import Qwen2ForCausalLM

# model_type -> (class, how its args are read from the HF config)
MODELS: Dict[str, Tuple[Type[LlamaForCausalLM], Callable[[Any], ModelArgs]]] = {
    "llama": (LlamaForCausalLM, ModelArgs.from_hf),
    "qwen2": (Qwen2ForCausalLM, Qwen2ForCausalLM.args_from_hf),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints carry RoPE buffers; they are recomputed


@dataclass
class LoadedModel:
    """What :func:`load_model` returns: the model, the HF config, the tokenizer (None if none was found) and
    an in-memory model's ``generation_config`` (its EOS tokens; None for a directory)."""

    model: LlamaForCausalLM
    config: Any
    tokenizer: Optional[Any]
    generation_config: Optional[Any] = None


def _safetensors_dir(path: str) -> Iterator[Tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(single):
        shards = ["model.safetensors"]
    else:
        raise InvalidArgumentError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    for shard in shards:
        with safe_open(os.path.join(path, shard), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _build(config: Any, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    kind = getattr(config, "model_type", None)
    if kind not in MODELS:
        raise InvalidArgumentError(f"model_type={kind!r} is not supported (supported: {sorted(MODELS)})")
    cls, read = MODELS[kind]
    args = read(config)
    with torch.device("meta"):
        model = cls(args)
    model = model.to(dtype).to_empty(device=device)  # dtype first: no float32 copy of the weights
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # to_empty left the (non-persistent) RoPE buffer uninitialised: recompute it
    model.model.rotary_emb.inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling).to(device)
    return model


def _fill(model: LlamaForCausalLM, weights: Iterator[Tuple[str, torch.Tensor]], where: str) -> None:
    params = dict(model.named_parameters())  # a tied lm_head is not listed (it is embed_tokens' weight)
    tied = model.args.tie_word_embeddings
    seen = set()
    with torch.no_grad():
        for name, w in weights:
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            p = params.get(name)
            if p is None:
                raise InvalidArgumentError(f"{where}: unexpected weight {name!r} {tuple(w.shape)}")
            if tuple(p.shape) != tuple(w.shape):
                raise InvalidArgumentError(f"{where}: weight {name!r} has shape {tuple(w.shape)}, "
                                           f"the model expects {tuple(p.shape)}")
            p.copy_(w)
            seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise InvalidArgumentError(f"{where}: missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def random_model(config: Any, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0, std: float = 0.02) -> LoadedModel:
    """A serve model of ``config``'s shape (a ``transformers`` config) with random weights made on ``device``
    (normal, ``std``; norms 1), for benchmarks and tests: nothing is read or downloaded. No tokenizer."""
    device = torch.device(device)
    m = _build(config, device, dtype)
    m.fuse_projections()
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)
    m.eval()
    return LoadedModel(m, config, None)


def load_model(model: Union[str, os.PathLike, torch.nn.Module, LoadedModel], device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """The serve model for ``model``: a local HF directory, an in-memory ``transformers`` model, or an
    already loaded one (:func:`random_model`; returned as it is).

    Parameters
    ----------
    model
        A directory with ``config.json`` and safetensors weights (sharded or not), or a
        ``transformers`` ``PreTrainedModel`` (its config and ``state_dict`` are used).
    device
        Where the weights go.
    dtype
        Weights' dtype; None = float32 on CPU, else the config's ``dtype``/``torch_dtype`` (float32
        when it names none).

    Raises
    ------
    InvalidArgumentError
        An unsupported architecture, a missing/unexpected/misshapen weight, or a directory without weights.
    """
    device = torch.device(device)
    tokenizer = generation_config = None
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.nn.Module):
        config = getattr(model, "config", None)
        if config is None:
            raise InvalidArgumentError(f"{type(model).__name__} has no HF .config: pass a transformers model")
        weights = iter(model.state_dict().items())
        generation_config = getattr(model, "generation_config", None)
        where = f"in-memory {type(model).__name__}"
    else:
        path = os.fspath(model)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise InvalidArgumentError(f"{path!r} is not a directory with a config.json (nothing is downloaded)")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        weights = _safetensors_dir(path)
        where = path
        if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if dtype is None:
        named = config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)  # v5 / v4
        if isinstance(named, str):
            named = getattr(torch, named, None)
        dtype = torch.float32 if device.type == "cpu" or not isinstance(named, torch.dtype) else named
    m = _build(config, device, dtype)
    _fill(m, weights, where)
    m.fuse_projections()
    m.eval()
    return LoadedModel(m, config, tokenizer, generation_config)
