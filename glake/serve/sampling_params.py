"""SamplingParams: how one request is sampled and when it stops (the control plane's only user input)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from glake.errors import InvalidArgumentError


@dataclass
class SamplingParams:
    """Sampling and stopping rules of one request (vLLM's names and defaults where they exist).

    Parameters
    ----------
    n
        Completions per prompt. The prompt is prefilled once; the other completions start as
        ``KVCache.fork`` s of it (sharing its chunks), or prefill it themselves when no slot or
        chunk is free at that moment.
    temperature
        0 = greedy (argmax of the penalised logits); otherwise logits are divided by it.
    top_k
        Keep the ``top_k`` most likely tokens; 0 or -1 = all.
    top_p
        Keep the smallest set of most likely tokens whose probability reaches ``top_p``; 1 = all.
    min_p
        Drop tokens whose probability is below ``min_p`` times the most likely one's; 0 = off.
    repetition_penalty
        HF's rule over prompt and output tokens: a logit ``x`` of a seen token becomes ``x / p``
        when positive, ``x * p`` otherwise; 1 = off.
    presence_penalty, frequency_penalty
        vLLM's (OpenAI's) rule over output tokens: subtract ``presence`` once per seen token and
        ``frequency`` per occurrence; 0 = off.
    seed
        Seeds this request's own ``torch.Generator``: its samples do not depend on the batch it ran in.
    max_tokens
        Generated tokens at most (finish reason ``"length"``).
    ignore_eos
        Keep generating past the tokenizer's EOS tokens.
    stop_token_ids
        More tokens that end the completion (kept in ``token_ids``, finish reason ``"stop"``).
    stop
        Strings that end the completion; the text is cut before the first match (kept when
        ``include_stop_str_in_output``); ``token_ids`` end with the token that completed it.
    include_stop_str_in_output
        Keep the matched stop string at the end of the text.
    logprobs
        Return the ``logprobs`` most likely tokens' log-probabilities (plus the sampled token's)
        for every generated token; None = none.

    Raises
    ------
    InvalidArgumentError
        A value out of its range.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: List[int] = field(default_factory=list)
    stop: Union[None, str, List[str]] = None
    include_stop_str_in_output: bool = False
    logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidArgumentError:
            return InvalidArgumentError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an int >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "must be an int >= -1 (0 or -1 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an int >= 1")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise bad("logprobs", "must be None or an int >= 0")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be None or an int")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        """True when ``temperature == 0`` (argmax, no randomness)."""
        return self.temperature == 0.0
