"""Tensor and pipeline parallelism on CPU (gloo ranks spawned by the engine), against the one-process engine.

The model is a tiny random fp32 Llama with 3 layers (so that 2 stages split it 2 + 1) and a vocabulary of
127 (so that 2 tensor ranks hold unequal slices: the last one is padded). Every comparison is token-exact.
Not covered here: a sequence crossing a 2 MiB KV chunk (thousands of tokens at these row sizes, too slow
for this file), and anything on GPUs (nccl).
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from glake.errors import GlakeError, InvalidArgumentError
from glake.serve import LLM, SamplingParams
from glake.serve.engine import LLMEngine
from glake.serve.parallel_engine import ParallelEngine
from glake.serve.pipeline_parallel import split_layers
from tests.serve.serve_util import tiny_llama, tiny_qwen2

PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 50)), [3, 99, 4], [int(x) * 7 % 127 for x in range(23)]]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
KW = dict(device="cpu", max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128)  # 40-token prompt: 2 chunks


@pytest.fixture(scope="module")
def hf():
    return tiny_llama(num_hidden_layers=3, vocab_size=127)


def run(engine, prompts, params):
    """Every prompt's generated ids, added in order and stepped to the end."""
    groups = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_unfinished():
        engine.step()
    return [[s.output_token_ids for s in g] for g in groups]


@pytest.fixture(scope="module")
def reference(hf):
    """The one-process engine's outputs: greedy, seeded sampled, and an n=2 seeded request."""
    with LLMEngine(hf, **KW) as eng:
        greedy = run(eng, PROMPTS, [GREEDY] * len(PROMPTS))
        sampled = run(eng, PROMPTS, [SAMPLED] * len(PROMPTS))
        forked = run(eng, [PROMPTS[1]], [SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=12)])
    return greedy, sampled, forked


def test_split_layers():
    assert split_layers(3, 2) == [range(0, 2), range(2, 3)]
    assert split_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    with pytest.raises(InvalidArgumentError, match="more stages than the model's 3 layers"):
        split_layers(3, 4)


def test_one_rank_takes_the_ranks_timeout_and_builds_the_one_process_engine(hf, reference):
    from glake.serve.parallel_engine import create_engine

    with create_engine(hf, tensor_parallel_size=1, pipeline_parallel_size=1, timeout_s=5, **KW) as eng:
        assert isinstance(eng, LLMEngine)
        assert run(eng, PROMPTS[:1], [GREEDY]) == reference[0][:1]


def test_tensor_parallel_2_matches_one_rank(hf, reference):
    greedy, sampled, forked = reference
    with ParallelEngine(hf, tensor_parallel_size=2, timeout_s=60, **KW) as eng:
        assert eng.model.args.num_kv_heads == 1 and eng.model.args.num_heads == 2  # its shard's heads
        assert eng.kv.layout.row_bytes == 3 * 2 * 1 * 16 * 4  # K and V of 1 KV head x 16 in 3 layers, fp32
        assert run(eng, PROMPTS, [GREEDY] * len(PROMPTS)) == greedy
        # fp32 all_reduce of 2 partial sums differs from one GEMM by rounding only: the seeded draws agree
        assert run(eng, PROMPTS, [SAMPLED] * len(PROMPTS)) == sampled
        assert run(eng, [PROMPTS[1]], [SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=12)]) == forked
        # no seed: rank 0 picks one for every rank; replaying that seed in one process gives the same tokens
        unseeded = SamplingParams(temperature=1.0, max_tokens=10)
        (seq,) = eng.add_request(PROMPTS[0], unseeded)
        (other,) = eng.add_request(PROMPTS[3], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        eng.step()
        eng.step()
        assert eng.abort([other]) == 1 and other.finish_reason == "abort"
        while eng.has_unfinished():
            eng.step()
        assert seq.params.seed is not None and unseeded.seed is None
    with LLMEngine(hf, **KW) as one:
        assert run(one, [PROMPTS[0]], [seq.params]) == [[seq.output_token_ids]]


def test_pipeline_parallel_2_matches_one_rank(hf, reference):
    greedy, sampled, _ = reference
    with ParallelEngine(hf, pipeline_parallel_size=2, timeout_s=60, **KW) as eng:
        assert eng.model.args.num_layers == 2 and eng.kv.layout.num_layers == 2  # rank 0 = stage 0: layers 0, 1
        assert run(eng, PROMPTS, [GREEDY] * len(PROMPTS)) == greedy
        assert run(eng, PROMPTS, [SAMPLED] * len(PROMPTS)) == sampled
        assert "not built for tensor or pipeline parallelism" in eng.sleep_refusal(2)
        with pytest.raises(InvalidArgumentError, match="not built for tensor or pipeline"):
            eng.sleep(2)
        assert eng.sleep(1)["level"] == 1 and eng.sleeping  # every rank sleeps (level 1) and wakes
        eng.wake_up()
        assert not eng.sleeping
        assert run(eng, PROMPTS, [GREEDY] * len(PROMPTS)) == greedy


def test_tensor_and_pipeline_parallel_together(hf, reference):
    greedy, _, _ = reference
    with ParallelEngine(hf, tensor_parallel_size=2, pipeline_parallel_size=2, timeout_s=60, **KW) as eng:
        assert run(eng, PROMPTS, [GREEDY] * len(PROMPTS)) == greedy


def test_llm_tp2_qwen2_tied_embeddings_and_clean_shutdown():
    hf = tiny_qwen2(vocab_size=127, tie_word_embeddings=True)  # q/k/v biases; lm_head = the embedding's slice
    with LLMEngine(hf, **KW) as one:
        want = run(one, PROMPTS, [GREEDY] * len(PROMPTS))
    llm = LLM(hf, tensor_parallel_size=2, timeout_s=60, **KW)
    pids = llm.engine.worker_pids
    assert len(pids) == 1
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [[o.token_ids] for o in outs] == want
    llm.close()
    for pid in pids:  # joined (reaped): the pid no longer exists
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("glake-rank")]
    with pytest.raises(GlakeError, match="closed"):
        llm.engine.step()


def test_a_dead_worker_is_a_clear_error_not_a_hang(hf):
    eng = ParallelEngine(hf, tensor_parallel_size=2, timeout_s=60, **KW)
    try:
        eng.add_request(PROMPTS[0], GREEDY)
        eng.step()
        (proc,) = eng._procs
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        with pytest.raises(GlakeError, match=r"rank 1 \(pid \d+\) exited with code -9"):
            eng.step()
        with pytest.raises(GlakeError, match="unusable"):
            eng.add_request(PROMPTS[1], GREEDY)
    finally:
        eng.close()
    assert eng._procs[0].exitcode == -9


def test_heads_that_do_not_divide_are_refused_before_any_process_starts():
    hf = tiny_llama(hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    before = len(multiprocessing.active_children())
    with pytest.raises(InvalidArgumentError, match="tensor_parallel_size=2 does not divide num_key_value_heads=3"):
        ParallelEngine(hf, tensor_parallel_size=2, **KW)
    with pytest.raises(InvalidArgumentError, match="more stages than the model's 2 layers"):
        ParallelEngine(hf, pipeline_parallel_size=3, **KW)
    with pytest.raises(InvalidArgumentError, match="CUDA graphs"):
        ParallelEngine(hf, tensor_parallel_size=3, cuda_graphs=True, **KW)
    assert len(multiprocessing.active_children()) == before


def test_cli_parallel_sizes_reach_the_engine():
    from glake.cli import build_parser
    from glake.serve.api.cli import engine_kwargs

    kw = engine_kwargs(build_parser().parse_args(["serve", "--model", "m", "--tensor-parallel-size", "2",
                                                  "-pp", "3"]))
    assert kw["tensor_parallel_size"] == 2 and kw["pipeline_parallel_size"] == 3
