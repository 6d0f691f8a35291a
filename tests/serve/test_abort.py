"""``LLMEngine.abort``: a request stops wherever it is (waiting, running, swapped, forks pending) and frees its KV."""

from __future__ import annotations

from glake.serve import SamplingParams
from glake.serve.engine import LLMEngine
from glake.serve.sequence import SequenceStatus
from tests.serve.serve_util import tiny_llama


def engine(**kw) -> LLMEngine:
    return LLMEngine(tiny_llama(1), device="cpu", max_model_len=128, **kw)


def test_abort_running_and_waiting_frees_the_slot_and_the_queue_moves_on():
    with engine(max_num_seqs=1) as eng:
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        (a,), (b,) = eng.add_request([1, 2, 3], params), eng.add_request([4, 5], params)
        eng.step()
        assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
        assert eng.abort([a]) == 1 and a.finish_reason == "abort" and a.slot is None
        assert eng.kv.stats()["slots_active"] == 0
        assert eng.abort([a]) == 0  # already finished: nothing to do
        eng.step()
        assert b.status is SequenceStatus.RUNNING
        (c,) = eng.add_request([6], params)
        assert eng.abort([c]) == 1 and c not in eng.scheduler.waiting
        while eng.has_unfinished():
            eng.step()
        assert b.finish_reason == "length" and b.num_output_tokens == 20
        eng.kv.check_invariants()


def test_abort_swapped_discards_its_swap_handle():
    with engine(max_num_seqs=2, preemption_mode="swap", swap_min_tokens=0) as eng:
        (a,) = eng.add_request(list(range(1, 30)), SamplingParams(temperature=0, max_tokens=8))
        eng.step()
        eng.scheduler._preempt(a, 0)
        assert a.status is SequenceStatus.SWAPPED and a.swap_handle is not None
        handle = a.swap_handle
        assert eng.abort([a]) == 1
        assert a.swap_handle is None and handle.consumed and not eng.has_unfinished()
        assert eng.kv.stats()["slots_active"] == 0


def test_abort_before_the_forks_start_aborts_them_too():
    with engine(max_num_seqs=4) as eng:
        seqs = eng.add_request([3, 4, 5], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=5))
        assert eng.abort(seqs) == 1  # the first; the other two were still pending on it
        assert all(s.finish_reason == "abort" for s in seqs) and not eng.has_unfinished()
        assert eng.kv.stats()["slots_active"] == 0
