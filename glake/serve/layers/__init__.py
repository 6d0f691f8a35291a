"""Data-plane layers: attention over the strided KV cache, and the sampler."""

from glake.serve.layers.attention import AttentionMetadata, CacheAttention, build_metadata
from glake.serve.layers.sampler import Sampler, SamplerOutput, SamplingTensors

__all__ = ["AttentionMetadata", "CacheAttention", "build_metadata", "Sampler", "SamplerOutput", "SamplingTensors"]
