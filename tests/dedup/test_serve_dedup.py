"""glake serve's --dedup: two engines that load the same weights hold one copy, and generate as before."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import glake.dedup  # noqa: E402
from glake.serve import LLM, SamplingParams  # noqa: E402
from tests.serve.serve_util import tiny_llama  # noqa: E402

PROMPTS = [[1, 5, 9, 2], [7, 7, 3]]
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def test_two_engines_share_their_weights_and_generate_the_same(sock):
    hf = tiny_llama(5, hidden_size=256, intermediate_size=1024, vocab_size=4096)  # ~13 MB of fp32 weights
    with LLM(hf, max_num_seqs=2, max_model_len=64) as plain:
        want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, GREEDY, use_tqdm=False)]
    with LLM(hf, max_num_seqs=2, max_model_len=64, dedup=True) as a, \
            LLM(hf, max_num_seqs=2, max_model_len=64, dedup=True) as b:
        sa, sb = a.engine.shared_weights.stats(), b.engine.shared_weights.stats()
        assert sa["chunks_canonical"] > 0 and sb["saved_bytes"] == sb["shared_bytes"] > 0
        for llm in (a, b):
            assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == want
        assert glake.dedup.stats()["saved_bytes"] >= sb["saved_bytes"]
