"""n > 1: the prompt is prefilled once and the other completions start as KVCache forks of it."""

from __future__ import annotations

import pytest

from glake.serve import LLM, SamplingParams
from tests.serve.serve_util import PROMPTS, hf_greedy, tiny_llama
from tests.serve.test_hf_greedy import big_row_llama


def guard_writes(llm):
    """Every step must write only rows that lie in no shared (forked) chunk, and only backed ones."""
    eng = llm.engine
    run = eng.runner.run

    def checked(batch, *ids):
        for seq, n in zip(batch.seqs, batch.num_new):
            eng.kv.check_writable(seq.slot, seq.num_cached_tokens, seq.num_cached_tokens + n)
        return run(batch, *ids)

    eng.runner.run = checked


def test_greedy_completions_are_forks_and_equal_hf():
    hf = tiny_llama(12)
    with LLM(hf, max_num_seqs=9, max_model_len=128) as llm:
        guard_writes(llm)
        outs = llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=20, n=3), use_tqdm=False)
        st = llm.engine.kv.stats()
    assert st["forks"] == 6
    for p, o in zip(PROMPTS, outs):
        ref = hf_greedy(hf, p, 20)
        assert [c.token_ids for c in o.outputs] == [ref] * 3


def test_sampled_completions_differ_and_are_seeded():
    hf = tiny_llama(13)

    def run():
        with LLM(hf, max_num_seqs=4, max_model_len=128) as llm:
            o = llm.generate(PROMPTS[1], SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=16), use_tqdm=False)
            assert llm.engine.kv.stats()["forks"] == 3
        return [c.token_ids for c in o[0].outputs]

    a = run()
    assert len({tuple(x) for x in a}) == 4 and run() == a


def test_no_free_slot_falls_back_to_a_prefill():
    hf = tiny_llama(14)
    with LLM(hf, max_num_seqs=2, max_model_len=128) as llm:
        outs = llm.generate(PROMPTS[1], SamplingParams(temperature=0, n=4, max_tokens=10), use_tqdm=False)
        assert llm.engine.kv.stats()["forks"] == 1  # one slot left for a fork; two prefill on their own
    assert [c.token_ids for c in outs[0].outputs] == [hf_greedy(hf, PROMPTS[1], 10)] * 4


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_forks_survive_preemption(mode):
    hf = big_row_llama()
    prompt = list(range(1, 61))  # 60 tokens, growing past the 64-token chunk: forks share nothing, copy the tail
    long_prompt = list(range(1, 70))  # 69 tokens: one shared chunk, a copied 5-token tail
    with LLM(hf, max_num_seqs=4, max_model_len=128, kv_memory_budget="8MiB", preemption_mode=mode,
             max_num_batched_tokens=64) as llm:
        guard_writes(llm)
        outs = llm.generate([prompt, long_prompt], SamplingParams(temperature=0, n=2, max_tokens=40), use_tqdm=False)
        kv = llm.engine.kv
        st = llm.engine.scheduler.stats
        assert kv.stats()["forks"] >= 1
        kv.check_invariants()
    assert st.preempted_swap + st.preempted_recompute > 0
    for p, o in zip([prompt, long_prompt], outs):
        assert [c.token_ids for c in o.outputs] == [hf_greedy(hf, p, 40)] * 2


def test_a_chunk_aligned_prompt_is_shared_whole():
    hf = big_row_llama()
    prompt = [(i * 5) % 127 + 1 for i in range(64)]  # exactly one chunk: shared, no tail copied
    with LLM(hf, max_num_seqs=3, max_model_len=128) as llm:
        guard_writes(llm)
        outs = llm.generate(prompt, SamplingParams(temperature=0, n=3, max_tokens=8), use_tqdm=False)
        st = llm.engine.kv.stats()
    assert st["forks"] == 2 and st["fork_tail_bytes"] == 0
    assert [c.token_ids for c in outs[0].outputs] == [hf_greedy(hf, prompt, 8)] * 3
