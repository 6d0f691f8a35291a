"""Model definitions over the vTensor KV cache and their loader (HF directories or in-memory HF models)."""

from glake.serve.models.llama import LlamaForCausalLM, ModelArgs
from glake.serve.models.loader import LoadedModel, load_model, random_model
from glake.serve.models.qwen2 import Qwen2ForCausalLM

__all__ = ["LlamaForCausalLM", "Qwen2ForCausalLM", "ModelArgs", "load_model", "random_model", "LoadedModel"]
