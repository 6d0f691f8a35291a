"""Host time of keeping the output text of a decode step's sequences, by output length.

glake serve's StopChecker detokenises incrementally (a few ids of context per token, one full decode
when a sequence finishes); the anchor, measured in the same run, is what it did before: a full decode
of each sequence's output after every token (plus a second one for stop strings, not counted here).
The tokenizer is a byte-level BPE (GPT-2 style, vocabulary 8,000) trained here on generated text and
wrapped as a transformers fast tokenizer, as `glake serve` uses one; the outputs are that text's tokens.
CPU only: this is host work, whatever the GPU.

    python3 benchmarks/detokenize.py [--seqs 256] [--lengths 100,500,1000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyzéü") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    text = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=8000,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok), text


def main() -> None:
    from glake.serve.sampling_params import SamplingParams
    from glake.serve.scheduler import StopChecker
    from glake.serve.sequence import Sequence

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--lengths", default="100,500,1000", help="output lengths at which a step is timed")
    ap.add_argument("--steps", type=int, default=20, help="steps timed at each length")
    args = ap.parse_args()
    hf, text = make_tokenizer()
    decode = lambda ids: hf.decode(ids, skip_special_tokens=True)  # noqa: E731  (as glake serve calls it)
    stream = hf.encode(" ".join(text))
    rows, out = [], []
    for length in map(int, args.lengths.split(",")):
        outputs = [stream[i * 37:i * 37 + length + args.steps] for i in range(args.seqs)]
        # the anchor: a full decode of each output after each token
        t0 = time.perf_counter()
        for k in range(length, length + args.steps):
            for ids in outputs:
                decode(ids[:k])
        full_us = (time.perf_counter() - t0) / args.steps * 1e6
        # StopChecker, its sequences brought to `length` tokens first (untimed)
        checker = StopChecker([], decode)
        seqs = []
        for ids in outputs:
            s = Sequence(0, [0], SamplingParams(max_tokens=length + args.steps + 1, ignore_eos=True))
            for t in ids[:length]:
                s.token_ids.append(t)
                checker.check(s)
            seqs.append(s)
        t0 = time.perf_counter()
        for k in range(length, length + args.steps):
            for s, ids in zip(seqs, outputs):
                s.token_ids.append(ids[k])
                checker.check(s)
        inc_us = (time.perf_counter() - t0) / args.steps * 1e6
        rows.append([length, round(full_us / 1000, 2), round(inc_us / 1000, 2), round(full_us / inc_us, 1)])
        out.append({"length": length, "full_decode_us_per_step": full_us, "incremental_us_per_step": inc_us})
    print_table(f"Text upkeep of one decode step, {args.seqs} sequences (host ms per step)",
                ["output tokens", "full decode ms (before)", "incremental ms (StopChecker)", "speed-up"], rows)
    write_json("detokenize", {"args": vars(args), "runs": out})


if __name__ == "__main__":
    main()
