"""Slot states: which slots hold live sequences, which keep chunks of ended ones, which are empty.

A slot is *free* (no sequence, no chunk), *active* (a live sequence) or *released* (no sequence, but
it kept its chunks for the next one: deferred reclamation). :class:`SlotBook` is the part of
:class:`~glake.kvcache.manager.KVCache` that moves slots between these states; it expects the
manager's ``layout``, ``_table``, ``_slots``, ``_active``, ``_idle``, ``_free``, ``_mapper``,
``lookahead_tokens``, ``_closed`` and ``_n``, and runs with the manager's lock held.
"""

from __future__ import annotations

import operator
from typing import Optional

from glake.errors import InvalidArgumentError, OutOfMemoryError

FREE, ACTIVE, IDLE = 0, 1, 2
STATE_NAMES = {FREE: "free", ACTIVE: "active", IDLE: "released"}
NEVER = 1 << 62  # a watermark no length reaches


class Slot:
    """What the manager knows about one slot; ``capacity`` and ``watermark`` are read lock-free."""

    __slots__ = ("index", "state", "target", "hint", "capacity", "watermark")

    def __init__(self, index: int) -> None:
        self.index = index
        self.state = FREE
        self.target = 0          # tokens the engine reserved (max over reserve calls)
        self.hint = 0            # tokens the engine announced with prefetch() (backed in the background)
        self.capacity = 0        # tokens [0, capacity) are backed
        self.watermark = NEVER   # a reserve beyond this queues the slot for the mapper


def checked_index(name: str, value: object, lo: int, hi: Optional[int]) -> int:
    """``operator.index(value)`` checked to lie in ``[lo, hi]`` (hi None = no bound); InvalidArgumentError otherwise."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name}={value!r} must be an int")
    try:
        v = operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"{name}={value!r} must be an int") from None
    if v < lo or (hi is not None and v > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InvalidArgumentError(f"{name}={v} is out of range {bound}")
    return v


class SlotBook:
    """Slot state transitions (a mixin of KVCache)."""

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError("this KVCache is closed")

    def _active_slot(self, slot: object) -> Slot:
        self._check_open()
        i = checked_index("slot", slot, 0, self.layout.max_seqs - 1)
        st = self._slots[i]
        if st.state != ACTIVE:
            raise InvalidArgumentError(f"slot {i} holds no live sequence (it is {STATE_NAMES[st.state]}): "
                                       "allocate() first")
        return st

    def _take_slot(self, prefer_chunk0: Optional[int]) -> int:
        """Picks a non-active slot: a released one whose first chunk is ``prefer_chunk0`` (a fork
        sibling), else the most recently released one (fork: a free one first), else a free one."""
        if prefer_chunk0 is not None:
            for i in reversed(self._idle):
                c = self._table.chunk(i, 0)
                if c is not None and c.id == prefer_chunk0:
                    return i
            if self._free:
                return self._free[-1]
        if self._idle:
            return next(reversed(self._idle))
        if self._free:
            return self._free[-1]
        raise OutOfMemoryError(f"KVCache: all {self.layout.max_seqs} slots hold live sequences (max_seqs); "
                               "release one first")

    def _activate(self, i: int, target: int, unmap_shared: bool = True) -> None:
        st = self._slots[i]
        if unmap_shared:  # a new sequence writes from token 0: it may not keep chunks shared with others
            shared = [j for j in self._table.indices(i) if self._table.is_shared(i, j)]
            for j in reversed(shared):
                self._table.unmap(i, j)
            self._n["unmaps"] += len(shared)
        if st.state == IDLE:
            del self._idle[i]
        else:
            self._free.remove(i)
        st.state = ACTIVE
        st.target = target
        st.hint = 0
        self._active[i] = st
        self._refresh(st)

    def _deactivate(self, st: Slot) -> None:
        """Undoes _activate after a failure: the slot goes back to released/free."""
        self._active.pop(st.index, None)
        st.target = st.hint = 0
        self._park(st)

    def _park(self, st: Slot) -> None:
        """A non-active slot goes to the released list (it keeps chunks) or the free stack."""
        st.watermark = NEVER
        st.capacity = self.layout.tokens_backed(self._table.ready[st.index])
        if self._table.count(st.index):
            if st.state == IDLE:
                self._idle.move_to_end(st.index)
            else:
                if st.state == FREE:
                    self._free.remove(st.index)
                self._idle[st.index] = None
            st.state = IDLE
        else:
            if st.state == IDLE:
                del self._idle[st.index]
            if st.state != FREE:
                self._free.append(st.index)
            st.state = FREE

    def _refresh(self, st: Slot, starved: bool = False) -> None:
        """Recomputes capacity and watermark from the table, and queues the slot for the mapper when
        it is inside its lookahead or holds surplus chunks (see :meth:`_surplus_start`)."""
        cap = self.layout.tokens_backed(self._table.ready[st.index])
        st.capacity = cap
        if self._mapper is None or starved or st.state != ACTIVE:
            st.watermark = NEVER
            return
        if len(self._table.chunks[st.index]) > self._surplus_start(st):
            if st.target or st.hint:   # trim now
                st.watermark = NEVER
                self._mapper.request(st.index)
            else:                      # a reused slot: its first reserve (the prompt) uses the kept
                st.watermark = 0       # chunks, then the mapper trims what is left over
            return
        if cap >= self.layout.max_seq_len:
            st.watermark = NEVER
            return
        st.watermark = cap - self.lookahead_tokens
        if max(st.target, st.hint) > st.watermark:
            st.watermark = NEVER
            self._mapper.request(st.index)

    def _surplus_start(self, st: Slot) -> int:
        """First chunk index the mapper does not keep for a live sequence: its reserved (or prefetched)
        length plus the lookahead, rounded up to a chunk. Chunks from there on (kept from the slot's
        previous sequence, or mapped ahead of a reservation that never came) are unmapped into the pool."""
        return self.layout.chunks_for(min(self.layout.max_seq_len, max(st.target, st.hint) + self.lookahead_tokens))

    def _wake_starved(self) -> None:
        """Chunks were freed: let the mapper retry the slots whose lookahead it could not back."""
        if self._mapper is not None and self._starved:
            for i in self._starved:
                if i in self._active:
                    self._mapper.request(i)
            self._starved.clear()
