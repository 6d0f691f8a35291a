"""A tiny random Llama with a chat tokenizer saved to a directory, and a real ``glake serve`` on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import List, Optional

from tests.serve.serve_util import tiny_llama

API_KEY = "test-key"
MODEL_NAME = "tiny-llama"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def chat_tokenizer(vocab_size: int = 128):
    """One token per printable ASCII character or newline, ``<|im_start|>``/``<|im_end|>``, fillers up to ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "\n"] + [chr(c) for c in range(32, 127)]
    names += [f"<x{i}>" for i in range(len(names), vocab_size)]
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    t.chat_template = CHAT_TEMPLATE
    return t


def save_tiny_chat_model(path: str, max_position_embeddings: int = 2048) -> str:
    """Saves a random tiny Llama (safetensors) and :func:`chat_tokenizer` into ``path``; returns it."""
    tiny_llama(3, max_position_embeddings=max_position_embeddings).save_pretrained(path, safe_serialization=True)
    chat_tokenizer().save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``glake serve`` in a subprocess (its output in ``log``); ``url`` once :meth:`wait_ready` returned."""

    def __init__(self, model_dir: str, log: str, extra: Optional[List[str]] = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "glake.cli", "serve", "--model", model_dir, "--served-model-name", MODEL_NAME,
               "--port", str(self.port), "--api-key", API_KEY, "--device", "cpu", "--max-num-seqs", "16",
               "--max-model-len", "2048", "--kv-memory-budget", "64MiB", *(extra or [])]
        env = dict(os.environ, OMP_NUM_THREADS="1", GLAKE_BACKEND="host", PYTHONPATH=ROOT)
        self._out = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"glake serve exited with {self.proc.returncode}: {open(self.log).read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # polling for readiness, not synchronisation
        raise TimeoutError(f"glake serve not ready after {timeout} s: {open(self.log).read()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


def metric_values(text: str) -> dict:
    """``{sample name: value}`` of a Prometheus exposition (unlabelled samples and the first of labelled ones)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, s.value)
    return out
