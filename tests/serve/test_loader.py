"""Loading from a local HF directory (single and sharded safetensors, its tokenizer) and the loader's errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from glake.errors import InvalidArgumentError
from glake.serve import LLM, SamplingParams
from glake.serve.models import load_model
from tests.serve.serve_util import PROMPTS, hf_greedy, tiny_llama, tiny_qwen2


def char_tokenizer():
    """A PreTrainedTokenizerFast, one token per lowercase letter or space (built here, nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(" abcdefghijklmnopqrstuvwxyz")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_a_saved_directory_loads_and_generates_like_hf(tmp_path, shard):
    hf = tiny_qwen2(8)
    kw = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, safe_serialization=True, **kw)
    if shard:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    else:
        assert (tmp_path / "model.safetensors").exists()
    with LLM(str(tmp_path), max_num_seqs=4, max_model_len=128, device="cpu") as llm:
        assert type(llm.engine.model).__name__ == "Qwen2ForCausalLM"
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == hf_greedy(hf, p, 16)


def test_the_directorys_tokenizer_serves_text_prompts(tmp_path):
    hf = tiny_llama(9)
    hf.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    with LLM(str(tmp_path), max_num_seqs=2, max_model_len=128) as llm:
        assert llm.engine.tokenizer is not None
        out = llm.generate("hello world", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
        ids = llm.engine.tokenizer.encode("hello world")
    assert out.token_ids == hf_greedy(hf, ids, 12)
    assert out.text == llm.engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_tied_weights_load_from_a_directory_without_lm_head(tmp_path):
    hf = tiny_llama(10, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    m = load_model(str(tmp_path)).model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert torch.equal(m.lm_head.weight, hf.lm_head.weight)


def test_loader_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match="config.json"):
        load_model(str(tmp_path))
    hf = tiny_llama(11)
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(InvalidArgumentError, match="safetensors"):
        load_model(str(tmp_path))
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(tmp_path, "model.safetensors"))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(InvalidArgumentError, match="missing weights.*up_proj"):
        load_model(str(tmp_path))
    hf.config.model_type = "gpt2"
    with pytest.raises(InvalidArgumentError, match="not supported"):
        load_model(hf)
    with pytest.raises(InvalidArgumentError, match="config"):
        load_model(torch.nn.Linear(2, 2))
