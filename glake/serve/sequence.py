"""Sequence: one completion's tokens, its state in the scheduler, and where its KV lives."""

from __future__ import annotations

import enum
import itertools
from typing import Dict, List, Optional

import torch

from glake.kvcache import SwapHandle
from glake.serve.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    """Where a sequence is: queued, holding a slot, parked in host memory, or done."""

    WAITING = "waiting"    # no slot; num_cached_tokens == 0 (new, or preempted by recompute)
    RUNNING = "running"    # holds a KV slot
    SWAPPED = "swapped"    # its KV rows are in a SwapHandle, no slot
    FINISHED = "finished"


class Sequence:
    """One completion of one request.

    Parameters
    ----------
    request_id
        Index of the request (the prompt) this completion belongs to.
    prompt_token_ids
        The prompt's token ids.
    params
        How it is sampled and when it stops.
    index
        Which of the request's ``params.n`` completions this is.
    device
        Where a seeded request's ``torch.Generator`` lives (the engine's device); it is seeded with
        ``params.seed + index``.

    Attributes
    ----------
    token_ids
        Prompt followed by the generated tokens.
    num_cached_tokens
        Tokens ``[0, num_cached_tokens)`` have their K/V in the cache (or in ``swap_handle``).
    slot
        The KV slot while RUNNING, else None.
    finish_reason
        ``"stop"`` (EOS, a stop token or string) or ``"length"`` (``max_tokens``), once FINISHED.
    """

    def __init__(self, request_id: int, prompt_token_ids: List[int], params: SamplingParams, index: int = 0,
                 device: Optional[torch.device] = None) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids: List[int] = list(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.slot: Optional[int] = None
        self.num_cached_tokens = 0
        self.swap_handle: Optional[SwapHandle] = None
        self.finish_reason: Optional[str] = None
        self.logprobs: List[Dict[int, float]] = []
        self.text = ""                 # the detokenised output, when a tokenizer is known
        # incremental detokenisation (StopChecker): output ids [prefix_offset, read_offset) are the context
        # of the last decode; text holds everything decoded up to read_offset
        self.prefix_offset = 0
        self.read_offset = 0
        self.num_preemptions = 0
        # the request's other completions (n > 1) wait here until this one's prompt is prefilled, then
        # start as forks of its slot (sharing the prompt's chunks); see LLMEngine._fork_pending
        self.pending_forks: List["Sequence"] = []
        self.generator: Optional[torch.Generator] = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device or torch.device("cpu"))
            self.generator.manual_seed(params.seed + index)

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> List[int]:
        """The generated tokens."""
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens so far."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V the model has not computed yet (1 when decoding, more during prefill)."""
        return self.num_tokens - self.num_cached_tokens

    @property
    def is_finished(self) -> bool:
        """True once a stop condition was met."""
        return self.status is SequenceStatus.FINISHED

    def append(self, token_id: int, logprobs: Optional[Dict[int, float]] = None) -> None:
        """Adds a sampled token (and its logprobs entry, when the request asked for them)."""
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)

    def __repr__(self) -> str:
        return (f"<Sequence {self.seq_id} req {self.request_id}.{self.index} {self.status.value} slot={self.slot} "
                f"tokens={self.num_tokens} cached={self.num_cached_tokens}>")
