"""Scheduler: iteration-level continuous batching over a KVCache (the control plane).

Every step it picks which sequences run and how many of their tokens, under a token budget
(``max_num_batched_tokens``): running sequences first, oldest first (decodes take one token,
prefills a chunk of what is left of the budget, so a long prompt is prefilled in chunks piggybacked
on the decodes), then swapped-out sequences come back, then waiting ones are admitted. Memory is
checked *before* anything is reserved, from ``kv.num_free_chunks()`` and each slot's reserved
length (the same accounting ``reserve_batch`` uses), so the engine's single ``reserve_batch`` per
step never fails and no exception drives the scheduling. When a running sequence cannot grow, the
newest running sequence is preempted: by recompute (its slot is released, it is queued again and
re-prefilled, generated tokens included) or by swap (``kv.swap_out``; ``kv.swap_in`` when memory
is back), chosen by :meth:`Scheduler.preemption_mode_for`. With a prefix cache, finished
sequences' slots are kept for later prompts to fork, and evicted (LRU) before anything is preempted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, List, Optional, Sequence as Seq, Tuple

from glake.errors import InvalidArgumentError
from glake.kvcache import KVCache
from glake.serve.prefix_cache import PrefixCache
from glake.serve.sequence import Sequence, SequenceStatus

PREEMPTION_MODES = ("auto", "recompute", "swap")


@dataclass
class ScheduledBatch:
    """One step's work: ``seqs[i]`` computes tokens ``[num_cached, num_cached + num_new[i])``."""

    seqs: List[Sequence] = field(default_factory=list)
    num_new: List[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        """Tokens computed this step (at most the token budget)."""
        return sum(self.num_new)

    def samples(self, i: int) -> bool:
        """Whether ``seqs[i]`` reaches its last token this step (its logits are sampled)."""
        s = self.seqs[i]
        return s.num_cached_tokens + self.num_new[i] == s.num_tokens


@dataclass
class SchedulerStats:
    """Counters since the scheduler was made."""

    steps: int = 0
    preempted_recompute: int = 0
    preempted_swap: int = 0
    swapped_in: int = 0
    chunked_prefills: int = 0  # prefill chunks that did not reach the end of the prompt


class Scheduler:
    """Continuous batching with chunked prefill and preemption.

    Parameters
    ----------
    kv
        The cache the sequences live in.
    max_num_seqs
        Sequences running at once, at most (and at most ``kv``'s slots).
    max_num_batched_tokens
        Token budget of one step (decodes and prefill chunks together).
    preemption_mode
        ``"recompute"``, ``"swap"`` or ``"auto"`` (see :meth:`preemption_mode_for`).
    swap_min_tokens
        In ``"auto"`` mode, sequences with at least this many cached tokens are swapped, shorter
        ones recomputed: re-prefilling n tokens costs O(n) model FLOPs (quadratic attention on top),
        a swap moves n rows twice over the host link, cheaper for long sequences.
    prefix_cache
        Keep finished sequences' slots for their prefixes (None = release them): a new sequence
        whose prompt starts with a cached run of whole chunks forks it instead of prefilling it.
        Entries are evicted (LRU) before any running sequence is preempted.
    """

    def __init__(self, kv: KVCache, max_num_seqs: int, max_num_batched_tokens: int, preemption_mode: str = "auto",
                 swap_min_tokens: int = 512, prefix_cache: Optional[PrefixCache] = None,
                 reserved_slots: int = 0) -> None:
        if preemption_mode not in PREEMPTION_MODES:
            raise InvalidArgumentError(f"preemption_mode={preemption_mode!r} is not one of {PREEMPTION_MODES}")
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise InvalidArgumentError(f"max_num_seqs={max_num_seqs} and max_num_batched_tokens="
                                       f"{max_num_batched_tokens} must both be >= 1")
        self.kv = kv
        self.num_slots = kv.layout.max_seqs - reserved_slots  # the engine keeps the others (graph padding)
        self.max_num_seqs = min(max_num_seqs, self.num_slots)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.swap_min_tokens = swap_min_tokens
        self.prefix_cache = prefix_cache
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []
        self.swapped: Deque[Sequence] = deque()
        self.stats = SchedulerStats()
        self._free = 0  # chunks still obtainable this step, after what was planned so far
        self._early = 0  # waiting sequences holding a slot already (prefetch_prefills)

    # ---- queue -----------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence (FCFS)."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def start_running(self, seq: Sequence) -> None:
        """Adds a sequence that already holds a slot (a fork) to the running ones (the newest)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        """True while any sequence is waiting, running or swapped out."""
        return bool(self.waiting or self.running or self.swapped)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Marks ``seq`` finished and releases its slot (or keeps it in the prefix cache)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            if self.prefix_cache is not None and reason != "abort":
                self.prefix_cache.insert(seq.slot, seq.token_ids, seq.num_cached_tokens)
            else:
                self.kv.release(seq.slot)
            seq.slot = None

    def abort(self, seq: Sequence) -> bool:
        """Finishes ``seq`` with reason ``"abort"`` wherever it is, freeing its slot or swap handle.

        Returns False when it was finished already (nothing to do). Its waiting forks (``n > 1``
        completions not started yet) are aborted with it.
        """
        for child in seq.pending_forks:
            child.status = SequenceStatus.FINISHED
            child.finish_reason = "abort"
        seq.pending_forks = []
        if seq.status is SequenceStatus.FINISHED:
            return False
        if seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
            if seq.slot is not None:
                self._early -= 1
        elif seq.status is SequenceStatus.SWAPPED and seq in self.swapped:
            self.swapped.remove(seq)
            if seq.swap_handle is not None:
                seq.swap_handle.discard()
                seq.swap_handle = None
        self.finish(seq, "abort")  # releases the slot of a running one (never kept in the prefix cache)
        return True

    def abort_all(self) -> None:
        """Releases every slot and swap handle (the engine is closing)."""
        for s in list(self.running):
            self.finish(s, "abort")
        for s in self.swapped:
            if s.swap_handle is not None:
                s.swap_handle.discard()
                s.swap_handle = None
        self.swapped.clear()
        self._drop_early()
        self.waiting.clear()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    # ---- memory accounting -----------------------------------------------------------------------

    def _chunks(self, tokens: int) -> int:
        return self.kv.layout.chunks_for(tokens)

    def growth(self, seq: Sequence, length: int) -> int:
        """Chunks that reserving ``length`` tokens for a running ``seq`` takes from ``num_free_chunks``.

        ``num_free_chunks`` counts a live slot's chunks past ``chunks_for(reserved)`` as obtainable
        (lookahead), and ``reserve_batch`` keeps ``chunks_for(length)`` of the slot; so whether the
        chunks in between are mapped already or holes, they leave the free count.
        """
        return max(0, self._chunks(length) - self._chunks(self.kv.reserved(seq.slot)))

    def _take(self, chunks: int) -> bool:
        if chunks > self._free:
            return False
        self._free -= chunks
        return True

    def _evict_for_memory(self, planned: int, keep: Optional[int] = None) -> bool:
        """Evicts a prefix-cache entry (not ``keep``) and re-reads the free chunks; False if none could go."""
        if self.prefix_cache is None or not self.prefix_cache.evict(keep):
            return False
        self._free = self.kv.num_free_chunks() - planned
        return True

    def free_slot(self, keep: Optional[int] = None) -> bool:
        """Whether a KV slot is free for one more sequence, evicting prefix-cache entries (not ``keep``) if needed."""
        cached = self.prefix_cache
        while len(self.running) + self._early + (len(cached) if cached is not None else 0) >= self.num_slots:
            if cached is None or not cached.evict(keep):
                return False
        return True

    # ---- preemption ------------------------------------------------------------------------------

    def preemption_mode_for(self, seq: Sequence) -> str:
        """``"swap"`` or ``"recompute"`` for ``seq``: the forced mode, or in ``"auto"`` mode swap iff it
        has at least ``swap_min_tokens`` cached tokens."""
        if self.preemption_mode != "auto":
            return self.preemption_mode
        return "swap" if seq.num_cached_tokens >= self.swap_min_tokens else "recompute"

    def _preempt(self, seq: Sequence, planned: int) -> None:
        """Takes ``seq`` off the GPU; ``planned`` = chunks already promised this step (kept promised)."""
        self.running.remove(seq)
        seq.num_preemptions += 1
        if self.preemption_mode_for(seq) == "swap" and seq.num_cached_tokens > 0:
            seq.swap_handle = self.kv.swap_out(seq.slot, seq.num_cached_tokens)
            seq.status = SequenceStatus.SWAPPED
            self.swapped.appendleft(seq)
            self.stats.preempted_swap += 1
        else:
            self.kv.release(seq.slot)
            seq.num_cached_tokens = 0
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)
            self.stats.preempted_recompute += 1
        seq.slot = None
        self._free = self.kv.num_free_chunks() - planned

    # ---- the step --------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        """Plans one step: which sequences compute how many tokens. Preempts, swaps in and admits.

        The plan's memory is guaranteed: ``kv.reserve_batch`` of every planned
        ``(slot, num_cached + num_new)`` succeeds if nothing else changes the cache in between.
        """
        self.stats.steps += 1
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        self._free = self.kv.num_free_chunks()
        planned = 0
        preempted = False
        queue = deque(self.running)  # oldest first
        while queue and budget > 0:
            seq = queue.popleft()
            n = min(seq.num_uncomputed_tokens, budget)
            need = self.growth(seq, seq.num_cached_tokens + n)
            while not self._take(need):
                if self._evict_for_memory(planned):
                    continue
                victim = queue.pop() if queue else seq  # the newest not yet planned; else itself
                self._preempt(victim, planned)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            planned += need
            budget -= n
            batch.seqs.append(seq)
            batch.num_new.append(n)
        if preempted or self.swapped:
            self._drop_early()  # slots taken early for waiting prompts go back: swapped sequences come first
        if not preempted:
            budget, planned = self._swap_in(batch, budget, planned)
        if not preempted and not self.swapped:
            self._admit(batch, budget, planned)
        for i in range(len(batch)):
            if not batch.samples(i):
                self.stats.chunked_prefills += 1
        return batch

    def _swap_in(self, batch: ScheduledBatch, budget: int, planned: int):
        while self.swapped and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.swapped[0]
            h = seq.swap_handle
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.free_slot():
                break
            if not self._take(self._chunks(seq.num_cached_tokens + n)):
                if self._evict_for_memory(planned):
                    continue
                break
            self.swapped.popleft()
            seq.slot = self.kv.swap_in(h)
            seq.swap_handle = None
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.stats.swapped_in += 1
            # swap_in reserved num_cached tokens: the growth past them is what is left to take
            self._free = self.kv.num_free_chunks() - planned - self.growth(seq, seq.num_cached_tokens + n)
            planned += self.growth(seq, seq.num_cached_tokens + n)
            budget -= n
            batch.seqs.append(seq)
            batch.num_new.append(n)
        return budget, planned

    def _admit(self, batch: ScheduledBatch, budget: int, planned: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            src, p = (None, 0) if self.prefix_cache is None else self.prefix_cache.match(seq.token_ids,
                                                                                          seq.num_tokens - 1)
            n = min(seq.num_tokens - p, budget)
            need = self._chunks(p + n) - self._chunks(p)  # a fork of p whole chunks shares them, copies nothing
            if seq.slot is None and not self.free_slot(keep=src):
                break
            if not self._take(need):
                if self._evict_for_memory(planned, keep=src):
                    continue
                if src is not None and self._evict_for_memory(planned):  # the matched entry last
                    continue
                break
            self.waiting.popleft()
            if seq.slot is not None:  # taken early by prefetch_prefills
                self._early -= 1
                if src is not None:  # a prefix cached since: the fork replaces it
                    self.kv.release(seq.slot)
                    seq.slot = None
            if src is None:
                if seq.slot is None:  # a released slot's kept chunks count as obtainable: still n's worth
                    seq.slot = self.kv.allocate()
            else:
                seq.slot = self.kv.fork(src, p)
                seq.num_cached_tokens = p
                self.prefix_cache.use(src, p)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            planned += need
            budget -= n
            batch.seqs.append(seq)
            batch.num_new.append(n)

    def _drop_early(self) -> None:
        if not self._early:
            return
        for s in self.waiting:
            if s.slot is not None:
                self.kv.release(s.slot)
                s.slot = None
        self._early = 0

    def prefetch_prefills(self) -> int:
        """Starts backing the prompt tokens the next step is likely to compute, while this step computes.

        It walks the next step's token budget as :meth:`schedule` will: running sequences first (a
        decode takes one token, a prompt prefilled in chunks its next chunk), then the waiting ones at
        the head of the queue, which get their KV slot now. Each such prompt chunk is passed to
        ``kv.prefetch``: the cache's mapper maps its chunks in the background, so that the next step
        does not map them on its critical path with the GPU idle (about 40 us a 2 MiB chunk; a
        16k-token prefill is ~1,000 chunks on a Llama-3-8B-shaped cache). Only a hint: nothing is
        reserved, the chunks count as free until then, a prompt that starts with a cached prefix is
        left to fork at admission, and a waiting sequence that is aborted, or pushed back by a
        preemption or a swap-in, gives its slot back. A no-op without the cache's mapper
        (``lookahead_tokens=0``). Returns how many waiting sequences took a slot.
        """
        if not self.kv.lookahead_tokens or self.swapped:
            return 0
        # Every early slot is taken before the first prefetch: the mapper holds the cache's lock while
        # it maps a slot's chunks, and allocate() needs that lock.
        budget = self.max_num_batched_tokens
        chunks = []  # (slot, length) to prefetch
        for seq in self.running:
            if budget <= 0:
                break
            n = min(max(1, seq.num_uncomputed_tokens), budget)
            budget -= n
            if n > 1:
                chunks.append((seq.slot, seq.num_cached_tokens + n))
        cached = len(self.prefix_cache) if self.prefix_cache is not None else 0
        taken = 0
        for seq in self.waiting:
            if budget <= 0:
                break
            n = min(seq.num_uncomputed_tokens, budget)
            budget -= n
            if seq.slot is None:
                busy = len(self.running) + self._early
                if busy >= self.max_num_seqs or busy + cached >= self.num_slots:  # no slot free without evicting
                    break
                if self.prefix_cache is not None and self.prefix_cache.match(seq.token_ids, seq.num_tokens - 1)[1]:
                    continue
                seq.slot = self.kv.allocate()
                self._early += 1
                taken += 1
            chunks.append((seq.slot, n))
        for slot, length in chunks:
            self.kv.prefetch(slot, length)
        return taken


class StopChecker:
    """Decides whether a sequence is done after a token was appended, and keeps its detokenised text.

    The text grows incrementally: each step decodes only the few ids since the last complete character
    (with the ids before them as context, so tokenizers that drop a leading space at the start of a
    decode give the right text), not the whole output, which made a step's host time grow with the
    output length (a full decode of 500 ids takes ~150 us: 256 sequences, tens of ms per step). Bytes
    of an incomplete UTF-8 character wait for the ids that complete them. When the sequence finishes,
    its text is decoded once in full, so the final text is exactly ``decode(output ids)`` (cut at a stop
    string).

    Parameters
    ----------
    eos_token_ids
        The tokenizer's / model's end-of-sequence ids (ignored by ``ignore_eos`` requests).
    decode
        ``token ids -> text`` (a tokenizer's decode), or None when no tokenizer is known (stop
        strings then raise).
    """

    def __init__(self, eos_token_ids: Seq[int], decode: Optional[Callable[[List[int]], str]]) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self.decode = decode

    def _grow_text(self, seq: Sequence) -> None:
        """Appends to ``seq.text`` what the ids since its last complete character add."""
        ids, base = seq.token_ids, seq.num_prompt_tokens  # the offsets count output ids
        before = self.decode(ids[base + seq.prefix_offset:base + seq.read_offset])
        now = self.decode(ids[base + seq.prefix_offset:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            seq.text += now[len(before):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids) - base

    def check(self, seq: Sequence) -> Optional[str]:
        """The finish reason (``"stop"``/``"length"``) if ``seq`` must stop now, else None; updates ``seq.text``."""
        p = seq.params
        tok = seq.token_ids[-1]
        checked = len(seq.text)  # the text stop strings were looked for in before this token
        if self.decode is not None:
            self._grow_text(seq)
        reason = None
        if p.stop:
            if self.decode is None:
                raise InvalidArgumentError("SamplingParams.stop needs a tokenizer: pass tokenizer= to the LLM")
            if _stop_at(seq.text, p.stop, checked) is not None:  # only a match ending in the new text is new
                reason = "stop"
        if reason is None and ((not p.ignore_eos and tok in self.eos_token_ids) or tok in p.stop_token_ids):
            reason = "stop"
        if reason is None and seq.num_output_tokens >= p.max_tokens:
            reason = "length"
        if reason is not None and self.decode is not None:
            text = self.decode(seq.output_token_ids)  # once, in full: exactly the tokenizer's text
            hit = _stop_at(text, p.stop, checked) if p.stop else None
            if hit is not None:
                i, s = hit
                text = text[:i + len(s)] if p.include_stop_str_in_output else text[:i]
            seq.text = text
        return reason


def _stop_at(text: str, stops: Seq[str], checked: int) -> Optional[Tuple[int, str]]:
    """(position, string) of the earliest stop string in `text` that ends past its first `checked` characters."""
    best = None
    for s in stops:
        i = text.find(s, max(0, checked - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best
