"""The engine on a GPU: fp32 greedy outputs token-exact against HF on the same GPU; the flash and Triton
decode paths against the reference path; an 8B-wide model's logits within bf16 tolerance of HF's."""

from __future__ import annotations

import pytest
import torch

from glake.serve import LLM, SamplingParams
from tests.serve.serve_util import PROMPTS, tiny_llama, tiny_qwen2

pytestmark = pytest.mark.gpu
MAX = 24


def hf_greedy_cuda(model, prompt, max_new):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=max_new, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device="cuda"))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_fp32_greedy_equals_hf_on_the_gpu(make):
    hf = make(3).cuda()
    with LLM(hf, device="cuda", dtype=torch.float32, max_num_seqs=4, max_model_len=128,
             max_num_batched_tokens=16) as llm:
        assert not llm.engine.runner.use_flash
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX), use_tqdm=False)
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == hf_greedy_cuda(hf, p, MAX)


def logprob_runs(hf, **engine_args):
    params = SamplingParams(temperature=0, max_tokens=MAX, logprobs=0)
    with LLM(hf, device="cuda", dtype=torch.float16, max_num_seqs=4, max_model_len=128, **engine_args) as llm:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        runner = llm.engine.runner
        paths = (runner.use_flash, runner.decode_kernel)
    return outs, paths


def test_flash_and_triton_decode_paths_agree_with_the_reference():
    hf = tiny_llama(4)
    ref, paths = logprob_runs(hf, use_flash=False)
    assert paths == (False, False)
    flash, paths = logprob_runs(hf, use_flash=True, decode_kernel=False)
    assert paths == (True, False)
    triton, paths = logprob_runs(hf, use_flash=True, decode_kernel=True)
    assert paths == (True, True)
    for r, f, t in zip(ref, flash, triton):
        assert f.token_ids == r.token_ids and t.token_ids == r.token_ids
        for a, b, c in zip(r.logprobs, f.logprobs, t.logprobs):
            (tok, lp), = a.items()
            assert abs(b[tok] - lp) < 2e-2 and abs(c[tok] - lp) < 2e-2


def test_8b_wide_logits_within_bf16_tolerance_of_hf():
    """Llama-3-8B's widths (two layers): the prompt's last-position logits against HF's forward in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    prompt = torch.randint(0, cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float(), -1)
    with LLM(hf, device="cuda", dtype=torch.bfloat16, max_num_seqs=2, max_model_len=512,
             max_num_batched_tokens=128) as llm:
        assert llm.engine.runner.use_flash
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=20), use_tqdm=False)[0]
    top = ref.topk(20)
    lp = out.logprobs[0]
    # the first token: HF's argmax unless HF's top two are within bf16 noise
    if top.values[0] - top.values[1] > 0.05:
        assert out.token_ids[0] == top.indices[0].item()
    common = [t for t in top.indices.tolist()[:5] if t in lp]
    assert len(common) >= 3, (lp, top)
    for t in common:
        assert abs(lp[t] - ref[t].item()) < 0.1, (t, lp[t], ref[t].item())


def test_graph_replay_equals_eager():
    hf = tiny_llama(5)
    eager, _ = logprob_runs(hf, cuda_graphs=False)
    with LLM(hf, device="cuda", dtype=torch.float16, max_num_seqs=4, max_model_len=128) as llm:
        runner = llm.engine.runner
        assert runner.graphs is not None and runner.graphs.buckets == [1, 2, 4]
        graphed = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX, logprobs=0), use_tqdm=False)
        assert runner.graph_steps > 0
        llm.engine.kv.check_invariants()
    for e, g in zip(eager, graphed):
        assert g.token_ids == e.token_ids
        for a, b in zip(e.logprobs, g.logprobs):
            (tok, lp), = a.items()
            assert abs(b[tok] - lp) < 1e-2
