"""Prefix caching: finished sequences' slots are kept and forked by later prompts sharing whole chunks."""

from __future__ import annotations

import random

import pytest

from glake.errors import InvalidArgumentError
from glake.kvcache import KVCache
from glake.serve import LLM, SamplingParams
from glake.serve.prefix_cache import PrefixCache
from tests.serve.serve_util import hf_greedy, tiny_llama
from tests.serve.test_hf_greedy import big_row_llama

SYSTEM = [(i * 37) % 127 + 1 for i in range(70)]  # 70 tokens: one whole 64-token chunk, then 6 more


@pytest.fixture(scope="module")
def hf():
    return big_row_llama()


def test_a_later_prompt_forks_the_cached_prefix(hf):
    first, later = SYSTEM + [1, 2, 3], [SYSTEM + [4, 5], SYSTEM + [6, 7, 8, 9]]
    with LLM(hf, max_num_seqs=4, max_model_len=160, enable_prefix_caching=True) as llm:
        cache = llm.engine.scheduler.prefix_cache
        a = llm.generate(first, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
        assert len(cache) == 1 and cache.hits == 0
        b = llm.generate(later, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
        assert cache.hits == 2 and cache.hit_tokens == 128
        assert llm.engine.kv.stats()["forks"] == 2
        llm.engine.kv.check_invariants()
    for p, o in zip([first] + later, a + b):
        assert o.token_ids == hf_greedy(hf, p, 12)


def test_a_prompt_equal_to_a_cached_one_still_computes_its_last_token(hf):
    p = SYSTEM[:64] + [9]  # one block and a token: a repeat may fork 64 tokens and compute 1
    with LLM(hf, max_num_seqs=2, max_model_len=160, enable_prefix_caching=True) as llm:
        x = llm.generate(SYSTEM[:64], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
        y = llm.generate(SYSTEM[:64], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
        z = llm.generate(p, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
        cache = llm.engine.scheduler.prefix_cache
        assert cache.hits == 1  # the 64-token prompt cannot fork all of itself; p forks its first block
    assert x.token_ids == y.token_ids == hf_greedy(hf, SYSTEM[:64], 3)
    assert z.token_ids == hf_greedy(hf, p, 3)


def test_entries_are_evicted_under_pressure_and_outputs_do_not_change(hf):
    rnd = random.Random(1)
    prompts = [SYSTEM[:rnd.choice([64, 70])] + [rnd.randrange(1, 128) for _ in range(rnd.randrange(1, 30))]
               for _ in range(10)]
    params = [SamplingParams(temperature=0, max_tokens=rnd.randrange(4, 40)) for _ in range(10)]
    with LLM(hf, max_num_seqs=10, max_model_len=160) as llm:
        want = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with LLM(hf, max_num_seqs=4, max_model_len=160, kv_memory_budget=5 * 2 ** 21, max_num_batched_tokens=32,
             enable_prefix_caching=True) as llm:
        got = []
        for i in range(0, 10, 3):  # in waves, so that later waves find earlier ones cached
            got += [o.token_ids for o in llm.generate(prompts[i:i + 3], params[i:i + 3], use_tqdm=False)]
            llm.engine.kv.check_invariants()
            assert llm.engine.kv.stats()["chunks_physical"] <= 5
        cache = llm.engine.scheduler.prefix_cache
        assert cache.hits > 0
    assert got == want


def test_the_cache_unit():
    with KVCache(2, 4, 512, "float32", max_seqs=4, max_seq_len=256, backend="host") as kv:  # 64 tokens per chunk
        pc = PrefixCache(kv)
        toks = list(range(200))
        a = kv.allocate()
        kv.reserve(a, 150)
        assert pc.insert(a, toks, 150)           # two whole blocks
        b = kv.allocate()
        kv.reserve(b, 100)
        assert not pc.insert(b, toks, 100)       # its one block is cached already: released
        assert pc.match(toks, 199) == (a, 128)
        assert pc.match(toks, 127) == (a, 64)
        assert pc.match([1] + toks, 199) == (None, 0)
        c = kv.allocate()
        kv.reserve(c, 128)
        assert pc.insert(c, toks[:64] + [7] * 64, 128)  # shares block 0's hash, adds its own block 1
        assert pc.evict(keep=a)                  # c goes; block 0 points back at a
        assert pc.match(toks, 199) == (a, 128) and len(pc) == 1
        pc.clear()
        assert len(pc) == 0 and kv.stats()["slots_active"] == 0


def test_prefix_caching_needs_rows_that_divide_the_chunk():
    with pytest.raises(InvalidArgumentError, match="divide"):
        LLM(tiny_llama(0, head_dim=24), max_num_seqs=2, max_model_len=64, enable_prefix_caching=True)
