"""Tiny random HF models and references for the serve tests (built in the test: nothing is downloaded)."""

from __future__ import annotations

from typing import List, Optional

import torch


# HF's default 0.02 makes a 64-wide model's attention almost uniform (RoPE, masks and positions would barely
# change the argmax); 0.15 gives peaked attention, so that a wrong position or mask changes the tokens.
INIT = 0.15


def randomise_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    """HF initialises RMSNorm weights to 1 and biases to 0: perturb them so that the tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def tiny_llama(seed: int = 0, **overrides):
    """A random fp32 ``LlamaForCausalLM``: 2 layers, hidden 64, 4 heads, 2 KV heads, vocab 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, initializer_range=INIT)
    kw.update(overrides)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    randomise_norms_and_biases(m, seed)
    return m


def tiny_qwen2(seed: int = 0, **overrides):
    """A random fp32 ``Qwen2ForCausalLM`` of the same shape (q/k/v biases randomised)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, initializer_range=INIT)
    kw.update(overrides)
    torch.manual_seed(seed)
    m = Qwen2ForCausalLM(Qwen2Config(**kw)).eval()
    randomise_norms_and_biases(m, seed)
    return m


def hf_greedy(model, prompt: List[int], max_new_tokens: int, **kw) -> List[int]:
    """HF ``generate(do_sample=False)`` of one unpadded prompt: the generated ids (EOS included if hit)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kw)
    return out[0, len(prompt):].tolist()


PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 40)), [3, 99, 4], [int(x) for x in torch.arange(17) * 7 % 128]]


class CharTokenizer:
    """One token per printable ASCII character: id ``i`` <-> ``chr(32 + i % 95)``."""

    eos_token_id: Optional[int] = None

    def encode(self, text: str) -> List[int]:
        return [ord(c) - 32 for c in text]

    def decode(self, ids: List[int]) -> str:
        return "".join(chr(32 + i % 95) for i in ids)
