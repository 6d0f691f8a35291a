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
    params = SamplingParams(temperature=0, max_tokens=MAX, logprobs=2)
    with LLM(hf, device="cuda", dtype=torch.float16, max_num_seqs=4, max_model_len=128, **engine_args) as llm:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        runner = llm.engine.runner
        paths = (runner.use_flash, runner.decode_kernel, runner.graphs is not None)
    return outs, paths


def assert_same_greedy(a, b, tol=2e-2, tie=5e-2):
    """Greedy outputs of two fp16 runs agree token for token, each token's logprob within ``tol``; where
    they part, the two tokens are a near tie in both (each in the other's top 2, logprobs within ``tie``),
    and the rest of that output is not compared (its context differs)."""
    for x, y in zip(a, b):
        for i, (s, t) in enumerate(zip(x.token_ids, y.token_ids)):
            lx, ly = x.logprobs[i], y.logprobs[i]
            if s != t:
                assert t in lx and s in ly, (i, s, t, lx, ly)
                assert abs(lx[s] - lx[t]) < tie and abs(ly[s] - ly[t]) < tie, (i, s, t, lx, ly)
                break
            assert abs(lx[s] - ly[t]) < tol, (i, s, lx, ly)


def test_flash_and_triton_decode_paths_agree_with_the_reference():
    hf = tiny_llama(4)
    ref, paths = logprob_runs(hf, use_flash=False)
    assert paths == (False, False, False)
    flash, paths = logprob_runs(hf, use_flash=True, decode_kernel=False)
    assert paths == (True, False, False)
    triton, paths = logprob_runs(hf, use_flash=True, decode_kernel=True, cuda_graphs=False)
    assert paths == (True, True, False)
    assert_same_greedy(ref, flash)
    assert_same_greedy(ref, triton)


def test_graph_replay_equals_eager():
    hf = tiny_llama(5)
    eager, paths = logprob_runs(hf, cuda_graphs=False)
    assert paths == (True, True, False)
    with LLM(hf, device="cuda", dtype=torch.float16, max_num_seqs=4, max_model_len=128) as llm:
        runner = llm.engine.runner
        assert runner.graphs is not None and runner.graphs.buckets == [1, 2, 4]
        graphed = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX, logprobs=2), use_tqdm=False)
        assert runner.graph_steps > 0
        llm.engine.kv.check_invariants()
    assert_same_greedy(eager, graphed, tol=1e-2)


def test_8b_wide_logits_within_bf16_tolerance_of_hf():
    """Llama-3-8B's widths (two layers), bf16: the prompt's last-position logprobs are as close to HF's
    float32 forward as HF's own bf16 forward is (twice its error, plus 0.02), on the top tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        ref32 = torch.log_softmax(hf(ids).logits[0, -1].double(), -1)
        hf = hf.to(torch.bfloat16)
        ref16 = torch.log_softmax(hf(ids).logits[0, -1].double(), -1)
    with LLM(hf, device="cuda", dtype=torch.bfloat16, max_num_seqs=2, max_model_len=512,
             max_num_batched_tokens=128) as llm:
        assert llm.engine.runner.use_flash
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=20), use_tqdm=False)[0]
    lp = out.logprobs[0]
    common = [t for t in ref32.topk(20).indices.tolist() if t in lp]
    assert len(common) >= 10, (sorted(lp), ref32.topk(20))
    ours = max(abs(lp[t] - ref32[t].item()) for t in common)
    theirs = max(abs(ref16[t].item() - ref32[t].item()) for t in common)
    assert ours <= 2 * theirs + 0.02, (ours, theirs)


def test_greedy_outputs_after_a_wake_equal_those_before():
    """Sleep (level 1) gives the KV cache's chunks back on the GPU; the next requests, CUDA graphs
    replayed over the same KV views, give the same greedy tokens as before the sleep."""
    hf = tiny_llama(5)
    params = SamplingParams(temperature=0, max_tokens=MAX)
    with LLM(hf, device="cuda", dtype=torch.float16, max_num_seqs=4, max_model_len=128) as llm:
        engine = llm.engine
        before = [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        assert engine.kv.stats()["chunks_physical"] > 0
        free_awake, _ = torch.cuda.mem_get_info()
        slept = engine.sleep()
        assert engine.sleeping and slept["kv_bytes_freed"] > 0
        assert engine.kv.stats()["chunks_physical"] == 0
        assert torch.cuda.mem_get_info()[0] > free_awake
        after = [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]  # wakes the engine
        assert not engine.sleeping
        assert engine.runner.graphs is not None
    assert after == before


def test_reading_a_steps_ids_waits_for_that_step_alone():
    """The sampler queues its ids' copy to the host right behind itself: reading them later must not
    wait for work launched after it (the decode step behind, with ``overlap_steps``)."""
    from glake.serve.layers.sampler import Sampler, SamplingTensors

    logits = torch.randn(6, 50, device="cuda")
    params = [SamplingParams(temperature=0, logprobs=2)] * 6
    t = SamplingTensors.build(params, [], [], [None] * 6, 50, logits.device)
    out = Sampler()(logits, t)
    torch.cuda._sleep(2_000_000_000)  # about a second of spinning queued behind the sampler
    host = out.to_host()
    assert not torch.cuda.current_stream().query(), "to_host() waited for the kernel queued behind the sampler"
    assert host.token_ids.device.type == "cpu" and host.token_ids.tolist() == logits.argmax(-1).tolist()
    assert torch.allclose(host.logprobs, logits.log_softmax(-1).max(-1).values.cpu())
    assert host.top_ids.tolist() == logits.topk(2).indices.tolist()
    torch.cuda.synchronize()
