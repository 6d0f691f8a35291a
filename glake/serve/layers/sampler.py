"""Sampler: logits of the sampled positions -> next tokens (and logprobs), on the logits' device.

The order, per row: penalties (repetition over prompt + output, presence and frequency over
output), then greedy rows take the argmax; the others divide by their temperature, drop tokens under
``min_p`` x the top probability, keep the ``top_k`` most likely and the top-``top_p`` nucleus, and
draw with the exponential race (``argmax(p / q)``, ``q ~ Exp(1)``), where a seeded request fills its
own row of ``q`` from its own ``torch.Generator``: its draws do not depend on the rest of the batch.
Logprobs are those of the model's raw distribution (``log_softmax`` of the logits before any
processing), as vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from glake.serve.layers.staging import to_device
from glake.serve.sampling_params import SamplingParams


@dataclass
class SamplingTensors:
    """A batch's sampling parameters as ``[B]`` tensors (and ``[B, vocab]`` token counts when penalised)."""

    temperature: Optional[torch.Tensor]  # [B]; these five are None when every row is greedy
    top_k: Optional[torch.Tensor]
    top_p: Optional[torch.Tensor]
    min_p: Optional[torch.Tensor]
    greedy: Optional[torch.Tensor]
    all_greedy: bool
    generators: List[Optional[torch.Generator]]
    repetition_penalty: Optional[torch.Tensor] = None  # [B], with seen_mask
    seen_mask: Optional[torch.Tensor] = None           # [B, V] bool: in prompt or output
    presence_penalty: Optional[torch.Tensor] = None    # [B], with output_counts
    frequency_penalty: Optional[torch.Tensor] = None
    output_counts: Optional[torch.Tensor] = None       # [B, V] occurrences in the output
    max_logprobs: Optional[int] = None                 # the largest top-n asked for, None = none

    @staticmethod
    def build(params: List[SamplingParams], prompt_ids: List[List[int]], output_ids: List[List[int]],
              generators: List[Optional[torch.Generator]], vocab_size: int, device: torch.device) -> "SamplingTensors":
        """The tensors for rows with these params, prompts and outputs so far (host lists, one upload each,
        pinned and asynchronous on cuda: building them never waits for the GPU)."""
        f32 = dict(dtype=torch.float32, device=device)
        if all(p.greedy for p in params):
            t = SamplingTensors(None, None, None, None, None, all_greedy=True, generators=generators)
        else:
            t = SamplingTensors(
                temperature=to_device([p.temperature if not p.greedy else 1.0 for p in params], torch.float32, device),
                top_k=to_device([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.int64, device),
                top_p=to_device([p.top_p for p in params], torch.float32, device),
                min_p=to_device([p.min_p for p in params], torch.float32, device),
                greedy=to_device([p.greedy for p in params], torch.bool, device),
                all_greedy=False, generators=generators)
        if any(p.repetition_penalty != 1.0 for p in params):
            t.repetition_penalty = torch.tensor([p.repetition_penalty for p in params], **f32)
            t.seen_mask = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)
            for i, (a, b) in enumerate(zip(prompt_ids, output_ids)):
                t.seen_mask[i, torch.tensor(a + b, dtype=torch.int64, device=device)] = True
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            t.presence_penalty = torch.tensor([p.presence_penalty for p in params], **f32)
            t.frequency_penalty = torch.tensor([p.frequency_penalty for p in params], **f32)
            t.output_counts = torch.zeros(len(params), vocab_size, **f32)
            for i, b in enumerate(output_ids):
                if b:
                    idx = torch.tensor(b, dtype=torch.int64, device=device)
                    t.output_counts[i].index_add_(0, idx, torch.ones(len(b), **f32))
        asked = [p.logprobs for p in params if p.logprobs is not None]
        t.max_logprobs = max(asked) if asked else None
        return t


@dataclass
class SamplerOutput:
    """The sampled ids ``[B]`` and, when asked for, the sampled ids' logprobs ``[B]`` and the top-n ``[B, n]``.

    :meth:`copy_to_host` (the sampler calls it) queues their copy to host memory right behind the
    sampler, and :meth:`to_host` waits for that copy alone. Reading the tensors directly instead
    (``.tolist()``) queues the copy when it is called, behind whatever was launched since: with a
    step left in flight, the host would wait for the step behind too, and the GPU would idle while
    the host then did its bookkeeping.
    """

    token_ids: torch.Tensor
    logprobs: Optional[torch.Tensor] = None
    top_ids: Optional[torch.Tensor] = None
    top_logprobs: Optional[torch.Tensor] = None
    _host: Optional["SamplerOutput"] = field(default=None, repr=False, compare=False)
    _ready: Optional[torch.cuda.Event] = field(default=None, repr=False, compare=False)

    def _tensors(self) -> Tuple[Optional[torch.Tensor], ...]:
        return self.token_ids, self.logprobs, self.top_ids, self.top_logprobs

    def copy_to_host(self) -> None:
        """Queues the copy of every tensor to (pinned) host memory on the current stream; returns at once."""
        if self.token_ids.device.type != "cuda":
            self._host = self
            return
        self._host = SamplerOutput(*(t.to("cpu", non_blocking=True) if t is not None else None
                                     for t in self._tensors()))
        self._ready = torch.cuda.Event()
        self._ready.record()

    def to_host(self) -> "SamplerOutput":
        """The same output with host tensors, once the copy :meth:`copy_to_host` queued has landed
        (queued now if it was not)."""
        if self._host is None:
            self.copy_to_host()
        if self._ready is not None:
            self._ready.synchronize()
        return self._host


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Repetition (HF's rule), presence and frequency (OpenAI's rule) penalties; returns new logits."""
    if t.repetition_penalty is not None:
        rp = t.repetition_penalty[:, None].expand_as(logits)
        penalised = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(t.seen_mask, penalised, logits)
    if t.output_counts is not None:
        logits = logits - t.frequency_penalty[:, None] * t.output_counts
        logits = logits - t.presence_penalty[:, None] * (t.output_counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    """Sets to -inf every logit outside a row's min-p, top-k and top-p sets (the most likely token always stays).

    ``top_k`` ``[B]`` int64 (vocab size = off), ``top_p`` and ``min_p`` ``[B]`` float (1 and 0 = off).
    """
    probs = logits.softmax(dim=-1)
    top = probs.max(dim=-1, keepdim=True).values
    logits = logits.masked_fill(probs < min_p[:, None] * top, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = rank >= top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the more likely tokens
    drop = drop | (before >= top_p[:, None])
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler(torch.nn.Module):
    """Picks the next token of every row of a logits batch (see the module docstring for the rules)."""

    def forward(self, logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
        """``logits`` ``[B, vocab]`` -> a :class:`SamplerOutput` (tensors on the logits' device)."""
        logits = logits.float()
        raw = logits
        logits = apply_penalties(logits, t)
        if t.all_greedy:
            ids = logits.argmax(dim=-1)
        else:
            scaled = apply_top_k_top_p_min_p(logits / t.temperature[:, None], t.top_k, t.top_p, t.min_p)
            probs = scaled.softmax(dim=-1)
            q = torch.empty_like(probs)
            shared = [i for i, g in enumerate(t.generators) if g is None]
            if shared:
                q[shared] = torch.empty(len(shared), probs.shape[-1], device=probs.device).exponential_()
            for i, g in enumerate(t.generators):
                if g is not None:
                    q[i] = self._exponential(probs.shape[-1], g, probs.device)
            sampled = (probs / q).argmax(dim=-1)
            ids = torch.where(t.greedy, logits.argmax(dim=-1), sampled)
        out = SamplerOutput(ids)
        if t.max_logprobs is not None:
            lp = raw.log_softmax(dim=-1)
            out.logprobs = lp.gather(-1, ids[:, None])[:, 0]
            if t.max_logprobs > 0:
                out.top_logprobs, out.top_ids = lp.topk(t.max_logprobs, dim=-1)
        out.copy_to_host()
        return out

    @staticmethod
    def _exponential(n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
        # a request's generator lives on the engine's device (made there by the engine): no transfer
        return torch.empty(n, device=g.device).exponential_(generator=g).to(device)
