"""overlap_steps: a decode step launched behind the one in flight gives exactly the outputs of the
synchronous engine (tokens, finish reasons, logprobs, text), under admissions, chunked prefill,
preemption, stops on tokens and strings, n > 1, prefix caching, seeds and aborts; no slot or chunk
is left behind."""

from __future__ import annotations

import pytest

from glake.serve import LLM, SamplingParams
from glake.serve.engine import LLMEngine
from tests.serve.serve_util import PROMPTS, CharTokenizer, tiny_llama

MORE = PROMPTS + [[7, 8, 9, 10] * 3, [100, 101], list(range(50, 90)), [1, 2, 3]]


def both(hf, prompts, params, **engine_args):
    """The outputs with overlap off and on, and how many steps the overlapped run launched behind another."""
    outs = []
    for overlap in (False, True):
        with LLM(hf, overlap_steps=overlap, **engine_args) as llm:
            eng = llm.engine
            behind = []
            launch = eng._launch
            eng._launch = lambda batch, after=None: (behind.append(after is not None), launch(batch, after))[1]
            outs.append(llm.generate(prompts, params, use_tqdm=False))
            eng.kv.check_invariants()
            assert not eng.scheduler.running and eng._inflight is None
            assert eng.kv.stats()["slots_active"] == 0
    return outs[0], outs[1], sum(behind)


def same(a, b):
    """Equal tokens, finish reasons and text; logprobs equal up to float32 noise (a step behind may carry
    the row of a sequence that just stopped, so its batch, and the GEMMs' blocking, can differ)."""
    for x, y in zip(a, b):
        assert len(x.outputs) == len(y.outputs)
        for p, q in zip(x.outputs, y.outputs):
            assert (q.token_ids, q.finish_reason, q.text) == (p.token_ids, p.finish_reason, p.text)
            assert (q.logprobs is None) == (p.logprobs is None)
            for u, v in zip(p.logprobs or [], q.logprobs or []):
                assert u.keys() == v.keys() and all(abs(u[k] - v[k]) < 1e-4 for k in u)


@pytest.fixture(scope="module")
def hf():
    return tiny_llama(21, eos_token_id=None)  # stops come from the requests only


def test_batched_greedy_with_admissions_and_chunked_prefill(hf):
    ref, out, behind = both(hf, MORE, SamplingParams(temperature=0, max_tokens=20, logprobs=2), max_num_seqs=3,
                            max_model_len=128, max_num_batched_tokens=6)
    same(ref, out)
    assert behind > 10  # decode steps ran behind another


def test_different_max_tokens_leave_the_step_behind(hf):
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (1, 2, 5, 13, 3, 30, 8, 1)]
    ref, out, behind = both(hf, MORE, params, max_num_seqs=8, max_model_len=128)
    same(ref, out)
    assert behind > 0


def test_model_length_limit(hf):
    ref, out, _ = both(hf, MORE, SamplingParams(temperature=0, max_tokens=200), max_num_seqs=4, max_model_len=48)
    same(ref, out)
    assert {o.finish_reason for o in out} == {"length"}


def test_stops_on_tokens_and_strings_finish_in_flight():
    """Stops that cannot be foreseen (a stop token, a stop string): the step behind the stopping one is
    thrown away for that sequence and its slot released after it."""
    hf = tiny_llama(22, eos_token_id=None)
    first = LLM(hf, tokenizer=CharTokenizer(), max_num_seqs=4, max_model_len=128, overlap_steps=False)
    with first:
        probe = first.generate("Hello", SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]
    stop_id = probe.token_ids[6]
    stop_str = probe.text[9:11]
    params = [SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id]),
              SamplingParams(temperature=0, max_tokens=30, stop=[stop_str]),
              SamplingParams(temperature=0, max_tokens=30)]
    prompts = ["Hello", "Hello", "Hello, world"]
    outs, thrown = [], []
    for overlap in (False, True):
        with LLM(hf, tokenizer=CharTokenizer(), max_num_seqs=4, max_model_len=128, overlap_steps=overlap) as llm:
            eng = llm.engine
            complete = eng._complete

            def spy(step, ahead=None):
                thrown.extend(s for s in step.seqs if s.is_finished)  # rows of sequences that stopped before
                return complete(step, ahead)
            eng._complete = spy
            outs.append(llm.generate(prompts, params, use_tqdm=False))
            assert eng.kv.stats()["slots_active"] == 0
    same(*outs)
    assert len(thrown) == 2  # both stops came one step before the step behind them was read
    assert outs[1][0].finish_reason == "stop" and outs[1][0].token_ids[-1] == stop_id
    assert outs[1][1].finish_reason == "stop"


def test_preemption_under_a_tiny_kv_budget(hf):
    ref, out, _ = both(hf, MORE, SamplingParams(temperature=0, max_tokens=40), max_num_seqs=4, max_model_len=128,
                       kv_memory_budget=6 << 20, preemption_mode="recompute")
    same(ref, out)


def test_n_forks_seeds_and_penalties(hf):
    params = [SamplingParams(temperature=0.8, seed=3, max_tokens=12, n=3),
              SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3),
              SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=15)]
    ref, out, _ = both(hf, MORE[:3], params, max_num_seqs=6, max_model_len=128)
    same(ref, out)


def test_prefix_caching(hf):
    shared = list(range(10, 10 + 40))
    prompts = [shared + [1, 2], shared + [3], shared + [4, 5, 6]]
    ref, out, _ = both(hf, prompts, SamplingParams(temperature=0, max_tokens=10), max_num_seqs=4,
                       max_model_len=256, enable_prefix_caching=True)
    same(ref, out)


def test_abort_completes_the_step_in_flight(hf):
    with LLMEngine(hf, max_num_seqs=4, max_model_len=128, overlap_steps=True) as eng:
        a = eng.add_request(PROMPTS[1], SamplingParams(temperature=0, max_tokens=50))
        b = eng.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=50))
        for _ in range(6):
            eng.step()
        assert eng._inflight is not None
        assert eng.abort(a) == 1
        assert eng._inflight is None and a[0].finish_reason == "abort"
        while eng.has_unfinished():
            eng.step()
        assert b[0].finish_reason == "length" and b[0].num_output_tokens == 50
        assert eng.kv.stats()["slots_active"] == 0
