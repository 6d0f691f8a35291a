"""Qwen2: the Llama architecture with biases on the q/k/v projections (none on o), reusing llama.py's layers."""

from __future__ import annotations

from typing import Any

from glake.serve.models.llama import LlamaForCausalLM, ModelArgs


class Qwen2ForCausalLM(LlamaForCausalLM):
    """A Qwen2 causal LM over the KV cache (HF's parameter names).

    Parameters
    ----------
    args
        The model's shape; use :meth:`args_from_hf` to read a HF ``Qwen2Config`` (it sets the q/k/v bias).
    """

    @staticmethod
    def args_from_hf(config: Any) -> ModelArgs:
        """A :class:`ModelArgs` for a HF Qwen2 config: ``qkv_bias=True``, no o_proj bias.

        Raises
        ------
        InvalidArgumentError
            ``use_sliding_window=True`` (not implemented).
        """
        return ModelArgs.from_hf(config, qkv_bias=True)
