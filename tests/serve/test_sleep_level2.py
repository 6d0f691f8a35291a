"""Sleep level 2 (vLLM's): the weights are not copied to the host but reloaded from the checkpoint on
wake, into the same tensors. On CPU the reload is checked by wiping the weights while asleep; on a GPU
(a fresh process under glake.torch) the suspend must skip the weights' memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from glake.errors import InvalidArgumentError
from glake.serve import LLM, SamplingParams
from glake.serve.models.loader import random_model
from tests.serve.serve_util import PROMPTS, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def tokens(llm):
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_a_level_2_wake_reloads_the_weights_from_the_checkpoint_into_the_same_tensors(tmp_path):
    tiny_llama(4).save_pretrained(str(tmp_path), safe_serialization=True)
    with LLM(str(tmp_path), device="cpu", max_num_seqs=4, max_model_len=128) as llm:
        engine = llm.engine
        before = tokens(llm)
        addresses = [p.data_ptr() for p in engine.model.parameters()]
        assert engine.sleep(2)["level"] == 2 and engine.sleeping
        with torch.no_grad():  # what a GPU's discarded memory may hold after the resume
            for p in engine.model.parameters():
                p.zero_()
        engine.wake_up()
        assert not engine.sleeping
        assert [p.data_ptr() for p in engine.model.parameters()] == addresses
        assert tokens(llm) == before
        engine.sleep(1)  # level 1 reloads nothing: the weights stay what they are
        engine.wake_up()
        assert tokens(llm) == before


def test_sleep_levels_an_engine_cannot_take_are_refused_before_anything_changes():
    with LLM(random_model(tiny_llama(0).config), device="cpu", max_num_seqs=2, max_model_len=64) as llm:
        engine = llm.engine
        assert "levels are 1" in engine.sleep_refusal(3)
        assert "loaded glake model" in engine.sleep_refusal(2)
        assert engine.sleep_refusal(1) is None
        with pytest.raises(InvalidArgumentError, match="loaded glake model"):
            engine.sleep(2)
        assert not engine.sleeping
    with LLM(tiny_llama(0), device="cpu", max_num_seqs=2, max_model_len=64) as llm:  # a transformers model
        assert llm.engine.sleep_refusal(2) is None


GPU_SCRIPT = textwrap.dedent("""
    import glake.torch
    glake.torch.install()
    import torch
    from glake import _C
    from glake.serve import LLM, SamplingParams
    from tests.serve.serve_util import PROMPTS, tiny_llama

    hf = tiny_llama(6, hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=4,
                    vocab_size=8192)
    params = SamplingParams(temperature=0, max_tokens=12)
    with LLM(hf, device="cuda", dtype=torch.float16, max_num_seqs=4, max_model_len=128) as llm:
        engine, g = llm.engine, _C.gmlake_global(0)
        weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        before = [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        engine.sleep(1)
        copied_1 = g.stats()["suspended_host_bytes"]
        engine.wake_up()
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep(2)
        copied_2 = g.stats()["suspended_host_bytes"]
        assert torch.cuda.mem_get_info()[0] > free_awake + weights // 2
        after = [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]  # wakes and reloads
        assert not engine.sleeping
    assert copied_1 >= weights, (copied_1, weights)
    assert copied_2 < copied_1 - weights // 2, (copied_1, copied_2, weights)
    assert after == before
    print("OK", weights, copied_1, copied_2)
""")


@pytest.mark.gpu
def test_on_a_gpu_level_2_copies_no_weights_and_answers_the_same_after_the_wake():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", GPU_SCRIPT], capture_output=True, text=True, timeout=600, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
