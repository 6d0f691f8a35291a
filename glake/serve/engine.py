"""LLMEngine: the step loop. schedule -> one ``kv.reserve_batch`` -> model runner -> sample -> update.

It owns the KV cache (``glake.kvcache.KVCache``; the host backend on CPU), the scheduler, the model
runner and the sampler. The scheduler guarantees that the step's single ``reserve_batch`` (every
scheduled slot up to the length it computes to) succeeds, so the only per-step host syncs are
reading the sampled ids (and the logprobs when a request asks for them).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence as Seq, Union

import numpy as np
import torch

from glake.errors import InvalidArgumentError, OutOfMemoryError
from glake.kvcache import KVCache
from glake.serve.cuda_graphs import DecodeGraphs, default_buckets
from glake.serve.kernels.decode_attention import available as kernels_available
from glake.serve.layers.sampler import Sampler, SamplerOutput, SamplingTensors
from glake.serve.layers.staging import to_device
from glake.serve.model_runner import ModelRunner
from glake.serve.models.loader import load_model
from glake.serve.prefix_cache import PrefixCache
from glake.serve.sampling_params import SamplingParams
from glake.serve.scheduler import ScheduledBatch, Scheduler, StopChecker
from glake.serve.sequence import Sequence, SequenceStatus


@dataclass
class _Step:
    """A launched step: the sequences that sample in it, in row order, and the sampler's output (on the
    device until :meth:`LLMEngine._complete` reads it)."""

    seqs: List[Sequence]
    out: SamplerOutput
    pure_decode: bool  # every sequence computed one token and samples (the next decode can follow it)

    @property
    def ids(self) -> torch.Tensor:
        """The sampled ids ``[len(seqs)]`` on the device."""
        return self.out.token_ids


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _eos_ids(config: Any, generation_config: Any, tokenizer: Any) -> List[int]:
    ids: List[int] = []
    for src in (generation_config, config, tokenizer):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if e is None:
            continue
        ids.extend(e if isinstance(e, (list, tuple)) else [e])
    return sorted(set(int(i) for i in ids))


def _decoder(tokenizer: Any):
    if tokenizer is None:
        return None
    try:
        tokenizer.decode([], skip_special_tokens=True)
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode


class LLMEngine:
    """The serving engine behind :class:`glake.serve.LLM`.

    Parameters
    ----------
    model
        A local HF model directory, an in-memory ``transformers`` model, or an already loaded
        :class:`~glake.serve.models.LoadedModel` (see :func:`load_model`; the parallel engine passes
        each rank's shard this way).
    tokenizer
        Anything with ``encode(text) -> ids`` and ``decode(ids) -> text`` (a HF tokenizer); None =
        the directory's tokenizer, if any (token-id prompts and no stop strings otherwise).
    device, dtype
        Where the model and cache live (default: cuda if present, else cpu) and the weights' /
        cache's dtype (default: float32 on cpu, the config's on cuda).
    max_num_seqs
        Sequences running at once (the cache's slots).
    max_model_len
        Prompt + output tokens per sequence (the cache's ``max_seq_len``); default
        ``min(max_position_embeddings, 4096)``.
    max_num_batched_tokens
        The per-step token budget (a longer prompt is prefilled in chunks of it).
    kv_memory_budget
        Physical bytes the KV cache may hold (an int or ``"8GiB"``); None = the device's memory.
    kv_lookahead_tokens
        ``KVCache``'s background-mapper lookahead (0 = no mapper thread).
    preemption_mode, swap_min_tokens
        See :class:`Scheduler`.
    use_flash
        FlashAttention-2 over the cache; default: on cuda with fp16/bf16.
    decode_kernel
        Batches of pure decodes through glake's Triton split-K kernel instead of FlashAttention-2
        (with ``use_flash``); default: on when Triton is importable.
    cuda_graphs
        Decode steps of up to ``max_num_seqs`` sequences replay CUDA graphs captured at start-up
        (:class:`~glake.serve.cuda_graphs.DecodeGraphs`; needs ``decode_kernel``); default: on with it.
    overlap_steps
        Launch each decode step behind the one in flight and do the host's bookkeeping while the GPU
        computes (see :meth:`step`); default: on on cuda.
    enable_prefix_caching
        Keep finished sequences' slots so that later prompts starting with the same whole chunks of
        tokens fork them instead of prefilling (:class:`~glake.serve.prefix_cache.PrefixCache`);
        needs KV rows that divide the 2 MiB chunk.
    dedup
        Pack the loaded weights into chunk-aligned storage and share its chunks with this user's other
        processes that loaded the same weights (:func:`glake.dedup.share`; the weights become read-only).

    Raises
    ------
    InvalidArgumentError
        Bad arguments, or a model that cannot be loaded.
    """

    def __init__(self, model: Union[str, os.PathLike, torch.nn.Module], tokenizer: Any = None, *,
                 device: Union[None, str, torch.device] = None, dtype: Optional[torch.dtype] = None,
                 max_num_seqs: int = 16, max_model_len: Optional[int] = None, max_num_batched_tokens: int = 512,
                 kv_memory_budget: Union[None, int, str] = None, kv_lookahead_tokens: int = 2,
                 preemption_mode: str = "auto", swap_min_tokens: int = 512,
                 use_flash: Optional[bool] = None, decode_kernel: Optional[bool] = None,
                 cuda_graphs: Optional[bool] = None, overlap_steps: Optional[bool] = None,
                 enable_prefix_caching: bool = False, dedup: bool = False) -> None:
        self.device = torch.device(device) if device is not None else _default_device()
        # what a level-2 sleep reloads the weights from: a checkpoint directory or a transformers model
        hf_module = isinstance(model, torch.nn.Module) and hasattr(model, "config")  # glake's own models have none
        self._weights_source = model if isinstance(model, (str, os.PathLike)) or hf_module else None
        loaded = load_model(model, self.device, dtype)
        self.model, self.config = loaded.model, loaded.config
        self.shared_weights = None
        if dedup:
            from glake.dedup import share

            self.shared_weights = share(self.model.requires_grad_(False))
        self.tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
        args = self.model.args
        limit = args.max_position_embeddings
        self.max_model_len = min(limit, 4096) if max_model_len is None else int(max_model_len)
        if not 1 < self.max_model_len <= limit:
            raise InvalidArgumentError(f"max_model_len={max_model_len} must be in [2, {limit}] "
                                       f"(max_position_embeddings)")
        kv_dtype = next(self.model.parameters()).dtype
        explicit_flash = use_flash
        if use_flash is None:
            use_flash = self.device.type == "cuda" and kv_dtype in (torch.float16, torch.bfloat16)
        if decode_kernel is None:
            decode_kernel = use_flash and kernels_available()
        elif decode_kernel and not (use_flash and kernels_available()):
            raise InvalidArgumentError("decode_kernel=True needs use_flash (cuda, fp16/bf16) and triton")
        if cuda_graphs is None:
            cuda_graphs = decode_kernel
        elif cuda_graphs and not decode_kernel:
            raise InvalidArgumentError("cuda_graphs=True needs the Triton decode kernel (decode_kernel)")
        pad_slots = 1 if cuda_graphs else 0  # the graphs' padding rows compute on a slot of their own
        self.kv = KVCache(args.num_layers, args.num_kv_heads, args.head_dim, kv_dtype,
                          max_seqs=max_num_seqs + pad_slots, max_seq_len=self.max_model_len,
                          memory_budget=kv_memory_budget, backend="cuda" if self.device.type == "cuda" else "host",
                          device=self.device.index if self.device.type == "cuda" else None,
                          lookahead_tokens=kv_lookahead_tokens)
        try:
            layout = self.kv.layout
            if use_flash and layout.slot_bytes % layout.row_bytes:
                # FlashAttention reads the cache as one column of rows: the slot stride must be whole rows
                if explicit_flash:
                    raise InvalidArgumentError(f"use_flash=True needs a KV slot stride of whole token rows: "
                                               f"{layout.describe()}; try another max_model_len")
                use_flash = decode_kernel = cuda_graphs = False
            if enable_prefix_caching and not isinstance(self.kv.tokens_per_chunk, int):
                raise InvalidArgumentError(f"enable_prefix_caching needs KV rows that divide the 2 MiB chunk: "
                                           f"{self.kv.layout.describe()}")
            cache = PrefixCache(self.kv) if enable_prefix_caching else None
            self.scheduler = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens, preemption_mode,
                                       swap_min_tokens, cache, reserved_slots=pad_slots)
            graphs = None
            if cuda_graphs:
                pad = self.kv.allocate()
                self.kv.reserve(pad, 1)
                graphs = DecodeGraphs(self.model, self.kv, pad, self.max_model_len,
                                      default_buckets(self.scheduler.max_num_seqs))
        except BaseException:
            self.kv.close()
            raise
        self.runner = ModelRunner(self.model, self.kv, use_flash, decode_kernel, graphs)
        self.overlap_steps = self.device.type == "cuda" if overlap_steps is None else bool(overlap_steps)
        self._inflight: Optional[_Step] = None
        self.sampler = Sampler()
        gen = loaded.generation_config
        self.eos_token_ids = _eos_ids(self.config, gen, self.tokenizer)
        self.stop_checker = StopChecker(self.eos_token_ids, _decoder(self.tokenizer))
        self._request_ids = itertools.count()
        self.sleeping = False
        self._sleep_level = 0

    def add_eos_token_ids(self, ids: Seq[int]) -> None:
        """More tokens that end every request (unless ``ignore_eos``), e.g. a chat model's end-of-turn
        token that its tokenizer's ``eos_token`` does not name."""
        self.eos_token_ids = sorted(set(self.eos_token_ids) | {int(i) for i in ids})
        self.stop_checker.eos_token_ids = frozenset(self.eos_token_ids)

    # ---- requests --------------------------------------------------------------------------------

    def encode(self, prompt: Union[str, Seq[int]]) -> List[int]:
        """Token ids of a prompt (text needs a tokenizer)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidArgumentError("a text prompt needs a tokenizer: pass tokenizer= or token ids")
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]

    def check_request(self, prompt: Union[str, Seq[int]], params: SamplingParams) -> List[int]:
        """The prompt's token ids, once it is known to be servable (nothing is queued).

        Raises
        ------
        InvalidArgumentError
            An empty prompt, a token id outside the vocabulary, a prompt of ``max_model_len`` tokens or
            more, or a sequence that could never fit ``kv_memory_budget``.
        """
        if not isinstance(params, SamplingParams):
            raise InvalidArgumentError(f"sampling params must be a SamplingParams, not {type(params).__name__}")
        ids = self.encode(prompt)
        vocab = self.model.args.vocab_size
        if not ids:
            raise InvalidArgumentError("empty prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidArgumentError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise InvalidArgumentError(f"prompt of {len(ids)} tokens: max_model_len={self.max_model_len} leaves "
                                       f"no room to generate")
        budget = self.kv.memory_budget
        longest = min(len(ids) + params.max_tokens, self.max_model_len)
        if budget is not None and self.kv.layout.chunks_for(longest) * self.kv.layout.chunk_bytes > budget:
            raise InvalidArgumentError(f"a sequence of up to {longest} tokens needs "
                                       f"{self.kv.layout.chunks_for(longest)} KV chunks; kv_memory_budget="
                                       f"{budget} bytes holds {budget // self.kv.layout.chunk_bytes}")
        return ids

    def add_request(self, prompt: Union[str, Seq[int]], params: SamplingParams) -> List[Sequence]:
        """Queues ``params.n`` sequences for one prompt; returns them (they fill in as the engine steps).

        Raises
        ------
        InvalidArgumentError
            See :meth:`check_request`; nothing is queued then.
        """
        ids = self.check_request(prompt, params)
        if self.sleeping:
            self.wake_up()  # a request wakes a sleeping engine
        rid = next(self._request_ids)
        seqs = [Sequence(rid, ids, params, i, self.device) for i in range(params.n)]
        seqs[0].pending_forks = seqs[1:]  # forked from seqs[0] once its prompt is in the cache
        self.scheduler.add(seqs[0])
        return seqs

    def abort(self, seqs: Seq[Sequence]) -> int:
        """Stops a request's sequences (those :meth:`add_request` returned) and frees their KV slots.

        Finished ones are left as they are; returns how many were stopped (finish reason ``"abort"``).
        A step in flight is completed first (its rows may still be written).
        """
        self.drain()
        return sum(self.scheduler.abort(s) for s in seqs)

    def has_unfinished(self) -> bool:
        """True while any request is not finished."""
        return self.scheduler.has_unfinished()

    # ---- sleep -----------------------------------------------------------------------------------

    def sleep(self, level: int = 1) -> Dict[str, Any]:
        """Gives device memory back while idle (vLLM's sleep mode, levels 1 and 2).

        Level 1: the KV cache's contents are discarded: the prefix cache is emptied and the cache is
        suspended with ``discard`` (every chunk back to the driver, nothing copied; its views keep
        their addresses, so the CUDA graphs stay valid). With it :func:`glake.suspend` suspends
        glake's process-wide allocators: whatever torch allocated through glake (``glake run``,
        ``glake.torch.install``) — the weights among it — goes to host memory at the same addresses.
        Weights in torch's own allocator stay on the device.
        Level 2: as level 1, but the weights are not copied either: their memory is given back and
        the wake reloads them from the checkpoint into the same tensors (so the CUDA graphs stay
        valid), costing host RAM only while it reloads. The next request, or :meth:`wake_up`, brings
        everything back. Returns ``{"kv_bytes_freed", "devices_suspended", "level"}``.

        Raises
        ------
        InvalidArgumentError
            A level other than 1 or 2; level 2 for a model with no checkpoint to reload from (built
            from glake's own model object) or with deduplicated (read-only) weights; or requests
            still unfinished (abort them, or sleep when idle).
        """
        why = self.sleep_refusal(level)
        if why:
            raise InvalidArgumentError(why)
        self.drain()
        if self.has_unfinished():
            n = len(self.scheduler.running) + len(self.scheduler.waiting) + len(self.scheduler.swapped)
            raise InvalidArgumentError(f"cannot sleep with {n} request(s) unfinished: wait for them or abort them")
        if self.sleeping:
            return {"kv_bytes_freed": 0, "devices_suspended": [], "level": self._sleep_level}
        import glake

        weights = list(self.model.parameters()) if level == 2 and self.device.type == "cuda" else []
        if self.scheduler.prefix_cache is not None:
            self.scheduler.prefix_cache.clear()
        freed = self.kv.stats()["chunks_physical"] * self.kv.layout.chunk_bytes
        devices = glake.suspend(self.kv.device_index, discard=[self.kv, *weights])
        self.sleeping, self._sleep_level = True, level
        return {"kv_bytes_freed": int(freed), "devices_suspended": devices, "level": level}

    def prepare_sleep(self) -> int:
        """Makes the host memory of the next :meth:`sleep` (level 1) ready while awake:
        :func:`glake.prepare_suspend` for this engine's device (the weights in glake's allocator get
        page-locked host buffers, kept from then on, so the sleep and the wake copy them at the copy
        engines' speed). Safe to call from another thread while the engine steps. Returns the bytes
        made ready (0 on the CPU, or when glake's allocator holds nothing of this engine)."""
        if self.device.type != "cuda":
            return 0
        import glake

        return glake.prepare_suspend(self.kv.device_index)

    def sleep_refusal(self, level: int) -> Optional[str]:
        """Why this engine cannot sleep at ``level`` whatever its requests (None: it can)."""
        if level not in (1, 2):
            return (f"sleep level {level}: levels are 1 (discard the KV cache, suspend glake's memory to the host) "
                    "and 2 (discard the weights too, reload them on wake)")
        if level == 2 and self._weights_source is None:
            return ("sleep level 2 reloads the weights on wake, but this engine's model was given as a loaded glake "
                    "model: build the engine from a checkpoint directory or a transformers model, or use level 1")
        if level == 2 and self.shared_weights is not None:
            return "sleep level 2 cannot reload deduplicated weights (shared read-only with other processes): use level 1"
        if level == 2 and self.device.type == "cuda":
            import glake.torch

            if not glake.torch.is_installed():
                return ("sleep level 2 gives the weights' memory back through glake's allocator, but they are in "
                        "torch's own (run under `glake run` or call glake.torch.install())")
        return None

    def wake_up(self) -> List[int]:
        """Takes the memory :meth:`sleep` gave back (a no-op when awake); returns the devices resumed.

        Raises
        ------
        OutOfMemoryError
            The device cannot give it back yet; still asleep, call again later.
        """
        if not self.sleeping:
            return []
        import glake

        devices = glake.resume(self.device.index if self.device.type == "cuda" else None)
        if self._sleep_level == 2:
            self._reload_weights()  # raises: still asleep, and the next wake_up reloads again
        self.sleeping = False
        return devices

    def _reload_weights(self) -> None:
        """After a level-2 sleep: the checkpoint's weights into the model's own tensors (same addresses)."""
        dtype = next(self.model.parameters()).dtype
        fresh = load_model(self._weights_source, torch.device("cpu"), dtype).model
        mine, theirs = dict(self.model.named_parameters()), dict(fresh.named_parameters())
        if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
            raise InvalidArgumentError("wake_up after sleep level 2: the checkpoint no longer matches the model "
                                       "(its weights changed shape); the engine's weights are undefined")
        with torch.no_grad():
            for name, p in mine.items():
                p.copy_(theirs[name], non_blocking=False)

    # ---- the step --------------------------------------------------------------------------------

    def step(self) -> List[Sequence]:
        """Runs one iteration; returns the sequences that finished in it.

        With ``overlap_steps``, a step of pure decodes is left in flight: the next call launches the
        following decode step behind it on the GPU (its input ids are the in-flight step's sampled
        ids, still on the device) and only then reads the in-flight step's ids and appends them, so
        the host's bookkeeping runs while the GPU computes. Sequences that reach ``max_tokens`` or
        ``max_model_len`` are left out of the step behind; one that stops on a token (EOS, stop
        strings) is finished when its step is read, and its slot is released once the step computed
        behind it is read too (its row there is thrown away). Anything else (admissions, prefill,
        swaps, penalties, aborts) first completes the step in flight.

        Raises
        ------
        OutOfMemoryError
            Requests are queued but none could be scheduled with nothing running (cannot happen
            for requests :meth:`add_request` accepted, unless something else holds the cache).
        """
        finished: List[Sequence] = []
        if self._inflight is not None:
            behind = self._decode_behind(self._inflight)
            if behind is not None:
                ahead = self._launch(ScheduledBatch(behind, [1] * len(behind)), self._inflight)
                finished = self._complete(self._inflight, ahead)
                self._inflight = ahead
                return finished
            finished = self.drain()
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_unfinished() and not self.scheduler.running:
                raise OutOfMemoryError(f"nothing could be scheduled: {len(self.scheduler.waiting)} waiting, "
                                       f"{len(self.scheduler.swapped)} swapped, {self.kv.num_free_chunks()} "
                                       f"free KV chunks")
            return finished
        step = self._launch(batch)
        self.scheduler.prefetch_prefills()  # the next step's prompt chunks mapped while this one computes
        if step is None:
            return finished
        if self.overlap_steps and step.pure_decode:
            self._inflight = step
            return finished
        return finished + self._complete(step)

    def drain(self) -> List[Sequence]:
        """Completes the step in flight, if any (``overlap_steps``); returns the sequences it finished."""
        step, self._inflight = self._inflight, None
        return self._complete(step) if step is not None else []

    def _decode_behind(self, step: "_Step") -> Optional[List[Sequence]]:
        """The sequences of the decode step to launch behind ``step``, or None when that step must be
        scheduled normally (something to admit or swap in, penalties, too little free KV)."""
        sched = self.scheduler
        if sched.waiting or sched.swapped:
            return None
        behind = []
        for s in step.seqs:
            p = s.params
            if s.status is SequenceStatus.FINISHED:
                continue  # stopped on a token of the step before: released when `step` completes
            if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                return None  # the penalties need the in-flight token in the history
            if s.num_output_tokens + 1 >= p.max_tokens or s.num_tokens + 1 >= self.max_model_len:
                continue  # the in-flight token is its last
            behind.append(s)
        if not behind:
            return None
        need = sum(sched.growth(s, s.num_cached_tokens + 1) for s in behind)
        if need > self.kv.num_free_chunks():
            return None  # the scheduler preempts
        sched.stats.steps += 1
        return behind

    def _launch(self, batch: ScheduledBatch, after: Optional["_Step"] = None) -> Optional["_Step"]:
        """Reserves the batch's KV rows, runs the model and the sampler (nothing waits for the GPU).

        ``after``: the in-flight step whose sampled ids are this pure-decode batch's input tokens.
        Returns None when no sequence of the batch reaches a sampled position.
        """
        slots = np.array([s.slot for s in batch.seqs], dtype=np.int64)
        lengths = np.array([s.num_cached_tokens + n for s, n in zip(batch.seqs, batch.num_new)], dtype=np.int64)
        self.kv.reserve_batch(slots, lengths)
        ids = None
        if after is not None:
            ids = after.ids
            if len(batch.seqs) < len(after.seqs):
                keep = {id(s) for s in batch.seqs}
                index = [j for j, s in enumerate(after.seqs) if id(s) in keep]
                ids = ids[to_device(index, torch.int64, ids.device)]
        logits, rows = self.runner.run(batch, ids)
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_cached_tokens += n
        if not rows:
            return None
        seqs, logit_rows = [], []
        for j, i in enumerate(rows):
            seqs.append(batch.seqs[i])
            logit_rows.append(j)
            for child in self._fork_pending(batch.seqs[i]):  # they sample from the prompt's logits too
                seqs.append(child)
                logit_rows.append(j)
        if len(seqs) > len(rows):
            logits = logits[torch.tensor(logit_rows, device=logits.device)]
        params = [s.params for s in seqs]
        history = any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params)
        t = SamplingTensors.build(params, [s.prompt_token_ids for s in seqs] if history else [],
                                  [s.output_token_ids for s in seqs] if history else [],  # copies: only if needed
                                  [s.generator for s in seqs], logits.shape[-1], logits.device)
        out = self.sampler(logits, t)
        pure = len(seqs) == len(batch.seqs) and all(n == 1 for n in batch.num_new)
        return _Step(seqs, out, pure)

    def _complete(self, step: "_Step", ahead: Optional["_Step"] = None) -> List[Sequence]:
        """Reads ``step``'s sampled ids (the step's one host sync), appends them and applies the stop
        rules; returns the sequences finished. A sequence finished here that is in ``ahead`` (the step
        launched behind it) keeps its slot until ``ahead`` is completed."""
        out = step.out.to_host()  # waits for this step alone, not for the one launched behind it
        ids = out.token_ids.tolist()
        lps = self._logprobs(out, step.seqs)
        finished: List[Sequence] = []
        busy = {id(s) for s in ahead.seqs} if ahead is not None else set()
        for j, seq in enumerate(step.seqs):
            if seq.status is SequenceStatus.FINISHED:  # stopped in the step before: this row is thrown away
                self.scheduler.finish(seq, seq.finish_reason)
                continue
            seq.append(ids[j], lps[j])
            reason = self.stop_checker.check(seq)
            if reason is None and seq.num_tokens >= self.max_model_len:
                reason = "length"
            if reason is not None:
                if id(seq) in busy:
                    seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason  # released with `ahead`
                else:
                    self.scheduler.finish(seq, reason)
                finished.append(seq)
        return finished

    def _fork_pending(self, parent: Sequence) -> List[Sequence]:
        """Starts ``parent``'s waiting completions as forks of its just-prefilled prompt; returns them.

        A fork needs a slot and, when the prompt does not end on a chunk boundary, one chunk for the
        copied tail; a completion that cannot have them now is queued to prefill the prompt itself.
        """
        if not parent.pending_forks or parent.num_output_tokens:
            return []
        kv, sched, p = self.kv, self.scheduler, parent.num_prompt_tokens
        tail = kv.layout.chunks_for(p) - kv.layout.full_chunks_of_prefix(p)
        started = []
        for child in parent.pending_forks:
            if len(sched.running) < sched.max_num_seqs and sched.free_slot() and kv.num_free_chunks() >= tail:
                child.slot = kv.fork(parent.slot, p)
                child.num_cached_tokens = p
                sched.start_running(child)
                started.append(child)
            else:
                sched.add(child)
        parent.pending_forks = []
        return started

    @staticmethod
    def _logprobs(out, seqs: List[Sequence]) -> List[Optional[dict]]:
        if out.logprobs is None:
            return [None] * len(seqs)
        chosen = out.logprobs.tolist()
        ids = out.token_ids.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        res: List[Optional[dict]] = []
        for j, s in enumerate(seqs):
            n = s.params.logprobs
            if n is None:
                res.append(None)
                continue
            d = {top_ids[j][k]: top_lp[j][k] for k in range(n)} if n and top_ids is not None else {}
            d[ids[j]] = chosen[j]
            res.append(d)
        return res

    # ---- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Releases every sequence and closes the KV cache. Idempotent."""
        if not self.kv.closed:
            self.drain()
            self.scheduler.abort_all()
            self.kv.close()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
