"""glake.serve: a small reference LLM engine over glake's vTensor KV cache (CPU-tested, CUDA-ready).

Control plane: :mod:`~glake.serve.sampling_params`, :mod:`~glake.serve.sequence`,
:mod:`~glake.serve.scheduler` (continuous batching, chunked prefill, preemption by recompute or
swap), :mod:`~glake.serve.engine` (the step loop), :mod:`~glake.serve.llm` (the offline API).
Data plane: :mod:`~glake.serve.model_runner`, :mod:`~glake.serve.models` (Llama, Qwen2, the loader),
:mod:`~glake.serve.layers` (attention over the strided cache, the sampler). See docs/serve.md.

>>> from glake.serve import LLM, SamplingParams                         # doctest: +SKIP
>>> with LLM("/models/llama-dir", max_num_seqs=8) as llm:               # doctest: +SKIP
...     outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=16))
"""

from glake.serve.llm import LLM, CompletionOutput, RequestOutput
from glake.serve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
