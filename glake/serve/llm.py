"""LLM: the offline API. ``LLM(model, **engine_args).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence as Seq, Union

import torch

from glake.errors import InvalidArgumentError
from glake.serve.engine import LLMEngine
from glake.serve.parallel_engine import ParallelEngine, create_engine
from glake.serve.sampling_params import SamplingParams
from glake.serve.sequence import Sequence

Prompt = Union[str, Seq[int]]


@dataclass
class CompletionOutput:
    """One completion: its text (when a tokenizer is known), generated ids, finish reason and logprobs."""

    index: int
    text: str
    token_ids: List[int]
    finish_reason: Optional[str]
    logprobs: Optional[List[Dict[int, float]]]


@dataclass
class RequestOutput:
    """The result of one prompt; ``.text``/``.token_ids``/``.finish_reason``/``.logprobs`` are its first completion's."""

    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The first completion's text."""
        return self.outputs[0].text

    @property
    def token_ids(self) -> List[int]:
        """The first completion's generated token ids."""
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> Optional[str]:
        """``"stop"`` or ``"length"``."""
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> Optional[List[Dict[int, float]]]:
        """Per generated token, ``{token id: logprob}`` (top-n plus the sampled one), if asked for."""
        return self.outputs[0].logprobs


def _as_prompt_list(prompts: Union[Prompt, Seq[Prompt]]) -> List[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt of token ids
    for p in prompts:
        if not isinstance(p, str) and not (isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p)):
            raise InvalidArgumentError(f"a prompt must be a str or a list of token ids, not {type(p).__name__}")
    return prompts


class LLM:
    """A reference LLM engine over glake's vTensor KV cache, for offline batch generation.

    Parameters
    ----------
    model
        A local HF directory (config.json + safetensors) or an in-memory ``transformers`` model.
    tokenizer
        Optional tokenizer (``encode``/``decode``); default: the directory's.
    tensor_parallel_size, pipeline_parallel_size
        Above 1: the model is split over ``tensor_parallel_size * pipeline_parallel_size`` ranks (this
        process and spawned ones; :class:`glake.serve.parallel_engine.ParallelEngine`): heads, MLP width
        and vocabulary over the tensor ranks, layers over the pipeline stages. Both together work.
    **engine_args
        :class:`glake.serve.engine.LLMEngine`'s keyword arguments (``max_num_seqs``,
        ``max_num_batched_tokens``, ``kv_memory_budget``, ``preemption_mode``, ...).

    Examples
    --------
    >>> with LLM("/models/SmolLM2-135M") as llm:                      # doctest: +SKIP
    ...     out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8))
    ...     print(out[0].text)
    """

    def __init__(self, model: Union[str, os.PathLike, torch.nn.Module], tokenizer: Any = None, *,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, **engine_args: Any):
        self.engine: Union[LLMEngine, ParallelEngine] = create_engine(
            model, tokenizer, tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size, **engine_args)

    def generate(self, prompts: Union[Prompt, Seq[Prompt]],
                 sampling_params: Union[None, SamplingParams, Seq[SamplingParams]] = None,
                 use_tqdm: bool = True) -> List[RequestOutput]:
        """Generates for every prompt; returns one :class:`RequestOutput` per prompt, in order.

        Parameters
        ----------
        prompts
            A text, a list of token ids, or a list of either.
        sampling_params
            One for all prompts, or one per prompt; None = ``SamplingParams()``.
        use_tqdm
            Show a progress bar (prompts finished).

        Raises
        ------
        InvalidArgumentError
            A malformed prompt, or as many sampling params as prompts was not given.
        """
        plist = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(plist)
        else:
            params = list(sampling_params)
            if len(params) != len(plist):
                raise InvalidArgumentError(f"{len(params)} sampling params for {len(plist)} prompts")
        ids = [self.engine.check_request(p, sp) for p, sp in zip(plist, params)]  # all valid, or none queued
        groups: List[List[Sequence]] = [self.engine.add_request(i, sp) for i, sp in zip(ids, params)]
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plist), desc="Generating", unit="prompt", dynamic_ncols=True)
        pending = {id(g[0]): g for g in groups}
        try:
            while self.engine.has_unfinished():
                self.engine.step()
                if bar is not None:
                    done = [k for k, g in pending.items() if all(s.is_finished for s in g)]
                    for k in done:
                        del pending[k]
                    bar.update(len(done))
        finally:
            if bar is not None:
                bar.close()
        return [self._output(p, g) for p, g in zip(plist, groups)]

    @staticmethod
    def _output(prompt: Prompt, seqs: List[Sequence]) -> RequestOutput:
        outs = [CompletionOutput(s.index, s.text, s.output_token_ids, s.finish_reason,
                                 s.logprobs if s.params.logprobs is not None else None) for s in seqs]
        return RequestOutput(prompt if isinstance(prompt, str) else None, list(seqs[0].prompt_token_ids), outs)

    def close(self) -> None:
        """Frees the KV cache (the engine cannot be used afterwards)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
