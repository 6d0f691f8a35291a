"""Where new backing comes from: the pool within the budget, then released slots, then lookahead.

:class:`ChunkSupply` is the part of :class:`~glake.kvcache.manager.KVCache` that finds chunks for a
growing slot and decides out-of-memory. In order it takes: chunks the pool can hand out under the
budget (cached ones first, then new ones); chunks kept by released slots, least recently released
first and highest index first (deferred reclamation: they are used until the pool needs them, so
they never cause a false out-of-memory); and, for a synchronous reservation only, chunks that the
mapper mapped past other live sequences' reserved lengths (lookahead is speculative). A synchronous
request that cannot be met raises :class:`glake.OutOfMemoryError` naming the budget and the usage
*before* anything is unmapped or mapped. Runs with the manager's lock held.
"""

from __future__ import annotations

from typing import List, Tuple

from glake import core
from glake.errors import OutOfMemoryError
from glake.kvcache.slots import IDLE, Slot


class ChunkSupply:
    """Chunk acquisition and reclamation (a mixin of KVCache)."""

    def _pool_left(self) -> int:
        """Chunks the pool can still hand out: budget minus chunks in use (free device memory without a budget)."""
        if self._budget_chunks is None:
            return core.mem_info(self.backend, self.device_index)[0] // self.layout.chunk_bytes
        return max(0, self._budget_chunks - self._pool.stats()["in_use_chunks"])

    def _idle_victims(self, exclude: int) -> List[Tuple[int, int]]:
        """(slot, index) of chunks only released slots hold: oldest release first, highest index first."""
        out = []
        for i in self._idle:
            if i != exclude:
                out.extend((i, j) for j in reversed(self._table.exclusive_indices(i)))
        return out

    def _surplus_victims(self, for_slot: int = -1, own_keep: int = 0) -> List[Tuple[int, int]]:
        """(slot, index) of live sequences' unshared chunks past their reserved length (lookahead, or
        kept from a slot's previous sequence), ``for_slot``'s own past index ``own_keep`` first."""
        out = []
        if for_slot in self._active:
            out.extend((for_slot, j) for j in reversed(self._table.exclusive_indices(for_slot)) if j >= own_keep)
        for i, st in self._active.items():
            if i != for_slot:
                need = self.layout.chunks_for(st.target)
                out.extend((i, j) for j in reversed(self._table.exclusive_indices(i)) if j >= need)
        return out

    def _usage(self) -> str:
        active = sum(self._table.count(i) for i in self._active)
        budget = ("none (device memory)" if self._budget_chunks is None else
                  f"{self._budget_chunks * self.layout.chunk_bytes} B ({self._budget_chunks} chunks of "
                  f"{self.layout.chunk_bytes >> 20} MiB)")
        return (f"memory budget {budget}; in use: {self._table.unique_chunks} physical chunks "
                f"({self._table.shared_chunks} shared), {active} mappings in {len(self._active)} live sequences, "
                f"{len(self._idle_victims(-1))} reclaimable in {len(self._idle)} released slots, "
                f"{self._pool.stats()['cached_chunks']} cached in the pool")

    def _victims(self, for_slot: int, own_keep: int, strict: bool) -> List[Tuple[int, int]]:
        """Chunks that may be unmapped to back ``for_slot`` below index ``own_keep``, in the order taken:
        released slots' (oldest first); then, strict (synchronous) requests only, ``for_slot``'s own
        past ``own_keep`` and other live sequences' past their reserved length. (The mapper thread
        takes no live slot's chunk here: it trims with the protocol of ``KVCache._trim``.)"""
        victims = self._idle_victims(for_slot)
        if strict:  # the engine's own thread: no reserve() of a live slot can run meanwhile
            victims += self._surplus_victims(for_slot, own_keep)
        return victims

    def _check_budget(self, n: int, for_slot: int, own_keep: int, what: str) -> None:
        """Raises OutOfMemoryError unless ``n`` chunks can be had for ``for_slot`` (strict rules)."""
        if n <= 0:
            return
        have = self._pool_left()
        if have >= n:
            return
        have += len(self._victims(for_slot, own_keep, strict=True))
        if have < n:
            raise OutOfMemoryError(f"KVCache: cannot back {what}: {n} more chunk(s) needed, {have} obtainable; "
                                   + self._usage())

    def _obtain(self, n: int, for_slot: int, own_keep: int, strict: bool, what: str) -> list:
        """``n`` chunks for ``for_slot`` (whose chunks below ``own_keep`` must stay): from the pool, then
        from :meth:`_victims`. Strict: all, or OutOfMemoryError before anything changes; else as many
        as it can (the mapper's lookahead never takes other live sequences' chunks)."""
        if strict:
            self._check_budget(n, for_slot, own_keep, what)
        got: list = []
        take = min(n, self._pool_left())
        if take:
            try:
                got = self._pool.acquire_many(take)
            except OutOfMemoryError:  # the device refused: reclaim below, or give up
                if strict and len(self._victims(for_slot, own_keep, strict)) < n:
                    raise OutOfMemoryError(f"KVCache: the device has no memory for {what} ({n} chunk(s)) and too "
                                           f"few can be reclaimed; " + self._usage()) from None
        rest = n - len(got)
        if rest:
            for slot, j in self._victims(for_slot, own_keep, strict)[:rest]:
                got.append(self._steal(slot, j, for_slot))
        return got

    def _steal(self, slot: int, j: int, for_slot: int):
        """Unmaps chunk ``j`` of ``slot`` (released, or past a live sequence's reservation) for ``for_slot``."""
        c = self._table.unmap(slot, j)
        st = self._slots[slot]
        if st.state == IDLE:
            self._n["reclaimed_released"] += 1
            if not self._table.count(slot):
                self._park(st)
            else:
                st.capacity = self.layout.tokens_backed(self._table.ready[slot])
        elif slot == for_slot:
            self._n["moved"] += 1  # its own chunk, from past the needed range into a hole below it
        else:
            self._n["reclaimed_lookahead"] += 1
            self._starved.add(slot)  # the mapper retries it when chunks are freed
            self._refresh(st, starved=True)
        self._n["unmaps"] += 1
        return c

    def _grow(self, st: Slot, want: int, strict: bool, length: int = 0) -> int:
        """Maps chunks into ``st``'s holes below index ``want``; returns how many were mapped."""
        holes = self._table.holes(st.index, want)
        if not holes:
            return 0
        what = f"{length} tokens of slot {st.index}" if strict else f"lookahead of slot {st.index}"
        chunks = self._obtain(len(holes), st.index, want, strict, what)
        if not chunks:
            return 0
        self._table.map_at(st.index, holes[:len(chunks)], chunks)
        self._n["maps_sync" if strict else "maps_background"] += len(chunks)
        return len(chunks)

