"""Greedy outputs token-exact against HF transformers' generate, under batching, chunked prefill and preemption."""

from __future__ import annotations

import pytest
import torch

from glake.serve import LLM, SamplingParams
from tests.serve.serve_util import PROMPTS, hf_greedy, tiny_llama, tiny_qwen2

MAX = 24
GREEDY = SamplingParams(temperature=0, max_tokens=MAX)


def check_against_hf(hf, prompts, outs, max_new=MAX, **kw):
    for p, o in zip(prompts, outs):
        ref = hf_greedy(hf, p, max_new, **kw)
        assert o.token_ids == ref, (p, o.token_ids, ref)
        assert o.finish_reason == ("stop" if len(ref) < max_new else "length")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf(request):
    return tiny_llama(1) if request.param == "llama" else tiny_qwen2(2)


def test_single_prompt(hf):
    with LLM(hf, max_num_seqs=4, max_model_len=128) as llm:
        outs = llm.generate(PROMPTS[1], GREEDY, use_tqdm=False)
    assert len(outs) == 1
    check_against_hf(hf, [PROMPTS[1]], outs)


def test_batched_prompts_of_different_lengths(hf):
    with LLM(hf, max_num_seqs=4, max_model_len=128) as llm:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        llm.engine.kv.check_invariants()
    check_against_hf(hf, PROMPTS, outs)


def test_more_prompts_than_slots_and_chunked_prefill(hf):
    """A 5-token budget: the 30- and 17-token prompts are prefilled in chunks next to other sequences' decodes."""
    steps = []
    with LLM(hf, max_num_seqs=3, max_model_len=128, max_num_batched_tokens=5) as llm:
        run = llm.engine.runner.run

        def spy(batch, *ids):
            steps.append((batch.num_tokens, sum(1 for n in batch.num_new if n == 1), max(batch.num_new)))
            return run(batch, *ids)

        llm.engine.runner.run = spy
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        stats = llm.engine.scheduler.stats
    check_against_hf(hf, PROMPTS, outs)
    assert all(t <= 5 for t, _, _ in steps)
    assert stats.chunked_prefills >= 6  # 30 tokens in chunks of at most 5
    assert any(decodes >= 1 and longest > 1 for _, decodes, longest in steps), "no prefill chunk rode with a decode"


def test_tied_embeddings_and_llama3_rope_scaling():
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    hf = tiny_llama(3, tie_word_embeddings=True, rope_parameters=rope)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    with LLM(hf, max_num_seqs=4, max_model_len=128) as llm:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    check_against_hf(hf, PROMPTS, outs)


def test_repetition_penalty_matches_hf():
    hf = tiny_llama(4)
    with LLM(hf, max_num_seqs=4, max_model_len=128) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX, repetition_penalty=1.8),
                            use_tqdm=False)
    check_against_hf(hf, PROMPTS, outs, repetition_penalty=1.8)


# head_dim 512 x 4 KV heads x 2 layers, fp32: a 32 KiB row, so a 2 MiB chunk holds 64 tokens and a budget of
# 3 chunks cannot hold 3 sequences of up to 90 tokens: the scheduler must preempt.
def big_row_llama():
    return tiny_llama(5, num_key_value_heads=4, head_dim=512, eos_token_id=None)


PREEMPT_PROMPTS = [list(range(1, 31)), list(range(40, 60)), list(range(70, 95))]


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_keeps_outputs_exact(mode):
    hf = big_row_llama()
    with LLM(hf, max_num_seqs=3, max_model_len=128, kv_memory_budget="6MiB", preemption_mode=mode,
             max_num_batched_tokens=64) as llm:
        assert llm.engine.kv.tokens_per_chunk == 64
        outs = llm.generate(PREEMPT_PROMPTS, SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)
        stats = llm.engine.scheduler.stats
        llm.engine.kv.check_invariants()
        assert llm.engine.kv.stats()["chunks_physical"] <= 3
    if mode == "swap":
        assert stats.preempted_swap > 0 and stats.swapped_in == stats.preempted_swap
        assert stats.preempted_recompute == 0
    else:
        assert stats.preempted_recompute > 0 and stats.preempted_swap == 0
    check_against_hf(hf, PREEMPT_PROMPTS, outs, max_new=60)


def test_auto_preemption_chooses_by_length():
    hf = big_row_llama()
    with LLM(hf, max_num_seqs=3, max_model_len=128, kv_memory_budget="6MiB", preemption_mode="auto",
             swap_min_tokens=70, max_num_batched_tokens=64) as llm:
        sched = llm.engine.scheduler
        outs = llm.generate(PREEMPT_PROMPTS, SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)
    assert sched.stats.preempted_recompute + sched.stats.preempted_swap > 0
    check_against_hf(hf, PREEMPT_PROMPTS, outs, max_new=60)


def test_a_sequence_that_can_never_fit_the_budget_is_refused():
    from glake.errors import InvalidArgumentError

    hf = big_row_llama()
    with LLM(hf, max_num_seqs=2, max_model_len=256, kv_memory_budget="2MiB") as llm:
        with pytest.raises(InvalidArgumentError, match="KV chunks"):
            llm.generate([list(range(1, 31))], SamplingParams(max_tokens=60), use_tqdm=False)


def test_logprobs_match_hf_scores(hf):
    """The raw log-probabilities of every generated token equal HF's (a numeric check, not just the argmax)."""
    p = PROMPTS[3]
    with LLM(hf, max_num_seqs=2, max_model_len=128, max_num_batched_tokens=7) as llm:
        out = llm.generate(p, SamplingParams(temperature=0, max_tokens=10, logprobs=3), use_tqdm=False)[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, attention_mask=torch.ones(1, len(p), dtype=torch.long))
    assert out.token_ids == ref.sequences[0, len(p):].tolist()
    for step, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        want = ref.logits[step][0].float().log_softmax(-1)
        top = want.topk(3)
        assert set(lp) == set(top.indices.tolist()) | {tok}
        for t, v in lp.items():
            assert v == pytest.approx(want[t].item(), abs=1e-4), (step, t)
