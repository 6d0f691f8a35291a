"""StopChecker's incremental detokenisation: after every token the text is what a full decode of the
output gives (less the bytes of a character not yet complete), and the final text is exactly the full
decode, for a byte-level BPE tokenizer (multi-byte characters split across tokens; random ids that
never complete one) and a SentencePiece-style one (a leading space that a decode drops at its start)."""

from __future__ import annotations

import random

import pytest

from glake.serve.sampling_params import SamplingParams
from glake.serve.scheduler import StopChecker
from glake.serve.sequence import Sequence

tokenizers = pytest.importorskip("tokenizers")

TEXT = ["naïve café déjà vu, 中文字符 and émojis 🙂🚀 mixed with plain words %d" % i for i in range(300)]


def tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None))
    if kind == "bytelevel":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"])
    tok.train_from_iterator(TEXT, trainer)
    return tok


def outputs(tok, kind: str):
    """(ids, whether they are text's): real text's tokens, and for byte-level random ids too."""
    rng = random.Random(7)
    for n in range(12):
        yield tok.encode(rng.choice(TEXT) + " " + rng.choice(TEXT)).ids, True
    if kind == "bytelevel":  # lone bytes of multi-byte characters, in any order
        for n in range(12):
            yield [rng.randrange(tok.get_vocab_size()) for _ in range(60)], False


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_the_text_after_every_token_is_the_full_decode(kind):
    tok = tokenizer(kind)
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return tok.decode(ids)

    for ids, text in outputs(tok, kind):
        seq = Sequence(0, [1, 2, 3], SamplingParams(max_tokens=len(ids), ignore_eos=True))
        checker = StopChecker([], decode)
        for k, t in enumerate(ids):
            seq.token_ids.append(t)
            calls.clear()
            reason = checker.check(seq)
            if reason is None and text:
                assert max(calls) <= 8, calls  # a few ids of context, never the whole output
            full = tok.decode(ids[:k + 1])
            if reason is None:
                assert full.startswith(seq.text), (k, full, seq.text)
                assert "\ufffd" not in full[len(seq.text):].rstrip("\ufffd") or full.endswith("\ufffd")
            else:
                assert reason == "length" and k == len(ids) - 1
                assert seq.text == full  # the final text: one full decode


def test_a_stop_string_split_across_tokens_cuts_the_final_text():
    tok = tokenizer("bytelevel")
    ids = tok.encode("plain words déjà vu, 中文字符 and more").ids
    for keep in (False, True):
        seq = Sequence(0, [1], SamplingParams(max_tokens=100, stop=["vu, 中"], include_stop_str_in_output=keep))
        checker = StopChecker([], tok.decode)
        reason = None
        for t in ids:
            seq.token_ids.append(t)
            reason = checker.check(seq)
            if reason:
                break
        assert reason == "stop"
        assert seq.text == ("plain words déjà vu, 中" if keep else "plain words déjà ")
