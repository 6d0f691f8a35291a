"""Stop strings, stop token ids, max_tokens, ignore_eos, text prompts and seeded sampling, through the engine."""

from __future__ import annotations

import pytest

from glake.serve import LLM, SamplingParams
from tests.serve.serve_util import PROMPTS, CharTokenizer, hf_greedy, tiny_llama


@pytest.fixture(scope="module")
def hf():
    return tiny_llama(7, eos_token_id=None)


@pytest.fixture
def llm(hf):
    with LLM(hf, tokenizer=CharTokenizer(), max_num_seqs=4, max_model_len=128, max_num_batched_tokens=16) as llm:
        yield llm


PROMPT = "Hello, world"


def full(llm, n=30):
    return llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=n), use_tqdm=False)[0]


def test_text_prompt_is_encoded_and_output_decoded(llm, hf):
    out = full(llm)
    assert out.token_ids == hf_greedy(hf, CharTokenizer().encode(PROMPT), 30)
    assert out.text == CharTokenizer().decode(out.token_ids) and out.finish_reason == "length"


def test_max_tokens(llm):
    ref = full(llm)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=7), use_tqdm=False)[0]
    assert out.token_ids == ref.token_ids[:7] and out.finish_reason == "length"


def test_stop_strings_cut_the_text_and_keep_the_completing_token(llm):
    ref = full(llm)
    stop = ref.text[9:11]
    i = ref.text.find(stop)
    for keep in (False, True):
        out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30, stop=["\x7f never", stop],
                                                  include_stop_str_in_output=keep), use_tqdm=False)[0]
        assert out.finish_reason == "stop"
        assert out.token_ids == ref.token_ids[:i + len(stop)]  # one character per token
        assert out.text == ref.text[:i + len(stop)] if keep else out.text == ref.text[:i]


def test_stop_token_ids(llm):
    ref = full(llm)
    tok = ref.token_ids[5]
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[tok]), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids == ref.token_ids[:ref.token_ids.index(tok) + 1]


def test_eos_and_ignore_eos(hf):
    ref = hf_greedy(hf, PROMPTS[1], 30)
    eos = ref[3]  # declare the 4th generated token the tokenizer's EOS
    tok = CharTokenizer()
    tok.eos_token_id = eos
    with LLM(hf, tokenizer=tok, max_num_seqs=2, max_model_len=128) as llm:
        stopped = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]
        ignored = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                               use_tqdm=False)[0]
    assert stopped.token_ids == ref[:ref.index(eos) + 1] and stopped.finish_reason == "stop"
    assert ignored.token_ids == ref and ignored.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20)
    a = llm.generate(PROMPT, p, use_tqdm=False)[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=20), SamplingParams(temperature=0, max_tokens=5)]
    batch = llm.generate(["xyz", PROMPT, "abcdefgh"], [others[0], p, others[1]], use_tqdm=False)
    assert batch[1].token_ids == a
    b = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_tokens=20),
                     use_tqdm=False)[0].token_ids
    assert a != b  # another seed, other samples (20 tokens from a 128-token vocabulary)
    assert a != full(llm, 20).token_ids  # and not the greedy output


def test_n_completions_have_their_own_seeds(llm):
    outs = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=7, max_tokens=12, n=3), use_tqdm=False)[0]
    assert [o.index for o in outs.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs.outputs}) == 3
    assert outs.token_ids == outs.outputs[0].token_ids


def test_bad_prompts(llm):
    from glake.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(InvalidArgumentError, match="vocab|token ids"):
        llm.generate([[1, 500]], use_tqdm=False)
    with pytest.raises(InvalidArgumentError, match="max_model_len"):
        llm.generate([[1] * 128], use_tqdm=False)
    with pytest.raises(InvalidArgumentError, match="sampling params"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)
    with pytest.raises(InvalidArgumentError, match="max_model_len"):
        llm.generate(["ok", [1] * 200], use_tqdm=False)  # the valid first prompt is not left queued
    assert not llm.engine.has_unfinished()
