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


def _admissions_run(hf, prefetch: bool, monkeypatch):
    """6 prompts of 150 tokens (3 chunks of 64 tokens each) through a 160-token budget: prompts admitted
    over several steps and prefilled in chunks across steps. The mapper is waited for after each step, so
    that what it prefetched is there when the next one runs. Returns the outputs, the chunks mapped
    synchronously in the first step and in all, and the most waiting sequences that held a slot."""
    if not prefetch:
        monkeypatch.setattr(Scheduler, "prefetch_prefills", lambda self: 0)
    rnd = random.Random(1)
    prompts = [[rnd.randrange(1, 128) for _ in range(150)] for _ in range(6)]
    with LLM(hf, max_num_seqs=6, max_model_len=256, max_num_batched_tokens=160, kv_lookahead_tokens=2) as llm:
        eng = llm.engine
        seqs = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=6))[0] for p in prompts]
        early, first = 0, None
        while eng.has_unfinished():
            eng.step()
            early = max(early, sum(s.slot is not None for s in eng.scheduler.waiting))
            assert eng.kv.wait_mapper()
            eng.kv.check_invariants()
            if first is None:
                first = eng.kv.stats()["maps_sync"]
        total = eng.kv.stats()["maps_sync"]
    monkeypatch.undo()
    return [s.output_token_ids for s in seqs], first, total, early


def test_prompts_next_in_line_are_backed_in_the_background_before_they_are_admitted(hf, monkeypatch):
    outs, first, total, early = _admissions_run(hf, True, monkeypatch)
    base_outs, base_first, base_total, base_early = _admissions_run(hf, False, monkeypatch)
    assert outs == base_outs
    assert base_early == 0 and early >= 1
    # without the prefetch each step maps its new prompt chunks itself; with it only the first step does
    assert base_total - base_first >= 8, (base_first, base_total)
    assert total == first, (first, total)


def test_every_early_slot_is_taken_before_the_first_prefetch(hf):
    """The mapper holds the cache's lock while it maps a prefetched slot: an allocate() after a
    prefetch would wait for it, on the step's critical path."""
    with LLM(hf, max_num_seqs=8, max_model_len=192, max_num_batched_tokens=256, kv_lookahead_tokens=2) as llm:
        eng = llm.engine
        for _ in range(8):
            eng.add_request(list(range(1, 61)), SamplingParams(temperature=0, max_tokens=4))
        calls, kv = [], eng.kv
        allocate, prefetch = kv.allocate, kv.prefetch
        kv.allocate = lambda: (calls.append("allocate"), allocate())[1]
        kv.prefetch = lambda slot, n: (calls.append("prefetch"), prefetch(slot, n))[1]
        eng.scheduler.max_num_batched_tokens = 128  # the first step admits two, the next two wait in line
        eng.step()
        del kv.allocate, kv.prefetch
        after = calls[calls.index("prefetch"):]
        assert "allocate" not in after and after.count("prefetch") >= 2, calls
        while eng.has_unfinished():
            eng.step()


def test_a_waiting_request_holding_an_early_slot_gives_it_back_on_abort(hf):
    with LLM(hf, max_num_seqs=4, max_model_len=192, max_num_batched_tokens=64, kv_lookahead_tokens=2) as llm:
        eng = llm.engine
        reqs = [eng.add_request(list(range(1, 61)), SamplingParams(temperature=0, max_tokens=4)) for _ in range(4)]
        eng.step()
        held = [r for r in reqs if r[0] in eng.scheduler.waiting and r[0].slot is not None]
        assert held, "the next prompt in line should hold a slot after the first step"
        active = eng.kv.stats()["slots_active"]
        assert eng.abort(held[0]) == 1
        assert held[0][0].slot is None and eng.kv.stats()["slots_active"] == active - 1
        eng.kv.check_invariants()
        while eng.has_unfinished():
            eng.step()
        assert all(r[0].finish_reason == "length" for r in reqs if r is not held[0])
        assert eng.kv.stats()["slots_active"] == 0


def test_early_slots_never_take_what_swapped_sequences_need(hf):
    """Swapped-out sequences come back before waiting ones are admitted: slots taken early go back."""
    prompts, params = workload(seed=3, n=12)
    with LLM(hf, max_num_seqs=3, max_model_len=128, kv_memory_budget=3 * 2 ** 21, max_num_batched_tokens=40,
             preemption_mode="swap", swap_min_tokens=1, kv_lookahead_tokens=2) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.scheduler.stats.preempted_swap > 0
        llm.engine.kv.check_invariants()
    with LLM(hf, max_num_seqs=10, max_model_len=128) as llm:
        assert [o.token_ids for o in outs] == [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
