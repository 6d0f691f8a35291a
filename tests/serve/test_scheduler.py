"""The scheduler under pressure: budgets respected, memory planned exactly (reserve_batch never refused), and
outputs the same as with unlimited memory, with and without the background mapper."""

from __future__ import annotations

import random

import pytest

from glake.errors import InvalidArgumentError
from glake.serve import LLM, SamplingParams
from glake.serve.scheduler import Scheduler
from tests.serve.test_hf_greedy import big_row_llama


def workload(seed=0, n=10):
    rnd = random.Random(seed)
    prompts = [[rnd.randrange(1, 128) for _ in range(rnd.randrange(3, 50))] for _ in range(n)]
    params = [SamplingParams(temperature=0, max_tokens=rnd.randrange(5, 70)) for _ in range(n)]
    return prompts, params


@pytest.fixture(scope="module")
def hf():
    return big_row_llama()


@pytest.fixture(scope="module")
def reference(hf):
    prompts, params = workload()
    with LLM(hf, max_num_seqs=10, max_model_len=128) as llm:
        return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("mode,lookahead", [("swap", 0), ("recompute", 2), ("auto", 8)])
def test_tight_memory_and_budget_change_nothing_but_the_schedule(hf, reference, mode, lookahead):
    prompts, params = workload()
    seen = []
    with LLM(hf, max_num_seqs=6, max_model_len=128, kv_memory_budget=4 * 2 ** 21, max_num_batched_tokens=24,
             preemption_mode=mode, swap_min_tokens=40, kv_lookahead_tokens=lookahead) as llm:
        eng = llm.engine
        reserve = eng.kv.reserve_batch

        def spy(slots, lengths):
            seen.append((len(slots), int(sum(lengths))))
            assert len(slots) <= 6
            reserve(slots, lengths)  # an OutOfMemoryError here would be a planning error: it propagates
            eng.kv.check_invariants()
            assert eng.kv.stats()["chunks_physical"] <= 4

        eng.kv.reserve_batch = spy
        run = eng.runner.run
        eng.runner.run = lambda b, *ids: (assert_budget(b), run(b, *ids))[1]
        outs = llm.generate(prompts, params, use_tqdm=False)
        st = eng.scheduler.stats
    assert [o.token_ids for o in outs] == reference
    assert st.preempted_swap + st.preempted_recompute > 0
    if mode == "swap":
        assert st.preempted_recompute == 0
    if mode == "recompute":
        assert st.preempted_swap == 0


def assert_budget(batch):
    assert 0 < batch.num_tokens <= 24


def test_scheduler_arguments_are_checked(hf):
    with LLM(hf, max_num_seqs=2, max_model_len=64) as llm:
        kv = llm.engine.kv
        with pytest.raises(InvalidArgumentError, match="preemption_mode"):
            Scheduler(kv, 2, 16, preemption_mode="never")
        with pytest.raises(InvalidArgumentError, match="max_num_batched_tokens"):
            Scheduler(kv, 2, 0)
        assert Scheduler(kv, 99, 16).max_num_seqs == 2  # capped by the cache's slots
