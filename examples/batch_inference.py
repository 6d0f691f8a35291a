"""glake.serve demo: offline batch generation with the reference engine over the vTensor KV cache.

With a model directory (a local HF checkpoint: config.json + safetensors + tokenizer), it generates
from text prompts. Without one it builds a tiny random Llama (2 layers, hidden 64) on the spot and
generates from token-id prompts, so the whole engine runs anywhere (CPU: host-backed KV cache, fp32).

    python examples/batch_inference.py [--model DIR] [--max-tokens 32] [--temperature 0]
                                       [--kv-budget 64MiB] [--budget-tokens 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from glake.serve import LLM, SamplingParams


def tiny_random_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, initializer_range=0.15)
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a local HF model directory; default: a tiny random Llama")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--kv-budget", default=None, help="KV cache memory budget, e.g. 64MiB (default: no cap)")
    ap.add_argument("--budget-tokens", type=int, default=64, help="tokens per step (chunked prefill)")
    ap.add_argument("--max-model-len", type=int, default=256)
    args = ap.parse_args()

    if args.model:
        model = args.model
        prompts = ["The capital of France is", "Write a haiku about memory:", "1, 2, 3, 4,"]
    else:
        model = tiny_random_llama()
        prompts = [[1, 5, 9, 13], list(range(20, 60)), [7] * 3, list(range(100, 117))]
    # one seed per prompt: the same seed would draw the same noise for every prompt
    params = [SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=i) for i in range(len(prompts))]
    with LLM(model, max_num_seqs=8, max_model_len=args.max_model_len, kv_memory_budget=args.kv_budget,
             max_num_batched_tokens=args.budget_tokens) as llm:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t0
        kv = llm.engine.kv
        st = llm.engine.scheduler.stats
        print(f"device {llm.engine.device}, KV {kv.backend}: {kv.layout.describe()}")
    n = sum(len(o.token_ids) for o in outs)
    for p, o in zip(prompts, outs):
        shown = o.text if o.text else o.token_ids
        print(f"{str(p)[:40]!s:42} -> {shown!r} ({o.finish_reason})")
    print(f"{n} tokens in {dt:.2f} s ({n / dt:.1f} tok/s); {st.steps} steps, {st.chunked_prefills} prefill chunks, "
          f"preemptions: {st.preempted_recompute} recompute, {st.preempted_swap} swap")


if __name__ == "__main__":
    main()
