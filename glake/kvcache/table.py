"""ChunkTable: which physical chunk is mapped at which chunk index of which slot.

It owns the one :class:`glake.core.VirtualRange` of the cache and is the only code that maps or
unmaps into it, so its tables always agree with the range: ``chunks[slot][i]`` is the chunk mapped at
chunk index ``i`` of ``slot`` (or ``None``), and ``refs[id]`` is how many places a physical chunk is
mapped at (more than one = shared by a fork). Each method updates the tables only after its driver
call succeeded, so a failing call leaves them true.

Not thread-safe by itself: the manager calls it with its lock held.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from glake import core
from glake.kvcache.layout import KVLayout

Fence = Callable[[], None]


def _expect(ok: bool, msg: str) -> None:
    """Raises AssertionError(msg) unless ok (an explicit raise, so it also checks under ``python -O``)."""
    if not ok:
        raise AssertionError(msg)


class ChunkTable:
    """Per-slot chunk tables over one reserved range, with a refcount per physical chunk."""

    def __init__(self, layout: KVLayout, device: int, backend: str) -> None:
        self.layout = layout
        self.range = core.VirtualRange(layout.total_bytes, device=device, backend=backend)
        self.chunks: List[List[Optional[core.PhysChunk]]] = [[] for _ in range(layout.max_seqs)]
        self.ready: List[int] = [0] * layout.max_seqs  # leading mapped chunks of each slot
        self.refs: Dict[int, int] = {}                 # chunk id -> places it is mapped at
        self.fences: List[Optional[Fence]] = [None] * layout.max_seqs
        self.mapped_total = 0                          # mappings (a shared chunk counts once per place)

    # ---- queries ------------------------------------------------------------------------------

    def chunk(self, slot: int, index: int) -> Optional[core.PhysChunk]:
        """The chunk mapped at ``index`` of ``slot``, or None."""
        row = self.chunks[slot]
        return row[index] if index < len(row) else None

    def is_shared(self, slot: int, index: int) -> bool:
        """True when the chunk at ``index`` of ``slot`` is also mapped somewhere else."""
        c = self.chunk(slot, index)
        return c is not None and self.refs[c.id] > 1

    def count(self, slot: int) -> int:
        """Chunks mapped in ``slot``."""
        return sum(1 for c in self.chunks[slot] if c is not None)

    def indices(self, slot: int) -> Iterator[int]:
        """Mapped chunk indices of ``slot``, ascending."""
        return (i for i, c in enumerate(self.chunks[slot]) if c is not None)

    def exclusive_indices(self, slot: int) -> List[int]:
        """Indices of ``slot`` whose chunk is mapped nowhere else, ascending."""
        return [i for i, c in enumerate(self.chunks[slot]) if c is not None and self.refs[c.id] == 1]

    def holes(self, slot: int, upto: int) -> List[int]:
        """Unmapped chunk indices of ``slot`` below ``upto``, ascending."""
        row = self.chunks[slot]
        return [i for i in range(upto) if i >= len(row) or row[i] is None]

    @property
    def unique_chunks(self) -> int:
        """Physical chunks mapped anywhere in the range."""
        return len(self.refs)

    @property
    def shared_chunks(self) -> int:
        """Physical chunks mapped at more than one place."""
        return sum(1 for n in self.refs.values() if n > 1)

    # ---- fences ----------------------------------------------------------------------------------

    def set_fence(self, slot: int, fence: Optional[Fence]) -> None:
        """Work that must finish before any chunk of ``slot`` is unmapped (e.g. a CUDA event's wait)."""
        self.fences[slot] = fence

    def wait_fence(self, slot: int) -> None:
        """Runs and clears the slot's fence, if any."""
        fence = self.fences[slot]
        if fence is not None:
            fence()
            self.fences[slot] = None

    # ---- mutations ----------------------------------------------------------------------------

    def map_run(self, slot: int, first: int, chunks: Sequence[core.PhysChunk]) -> None:
        """Maps ``chunks`` at consecutive indices ``first, first+1, ...`` of ``slot`` (all or nothing)."""
        if not chunks:
            return
        row = self.chunks[slot]
        last = first + len(chunks)
        if last > self.layout.chunks_per_slot:
            raise AssertionError(f"map_run: slot {slot} index {last - 1} beyond {self.layout.chunks_per_slot} chunks")
        for i in range(first, min(last, len(row))):
            if row[i] is not None:
                raise AssertionError(f"map_run: slot {slot} index {i} is already mapped")
        self.range.map_many(self.layout.chunk_offset(slot, first), list(chunks))
        if len(row) < last:
            row.extend([None] * (last - len(row)))
        for i, c in enumerate(chunks, start=first):
            row[i] = c
            self.refs[c.id] = self.refs.get(c.id, 0) + 1
        self.mapped_total += len(chunks)
        r = self.ready[slot]
        while r < len(row) and row[r] is not None:
            r += 1
        self.ready[slot] = r

    def map_at(self, slot: int, indices: Sequence[int], chunks: Sequence[core.PhysChunk]) -> None:
        """Maps ``chunks[k]`` at ``indices[k]`` (ascending), one driver call per consecutive run."""
        k = 0
        while k < len(indices):
            j = k + 1
            while j < len(indices) and indices[j] == indices[j - 1] + 1:
                j += 1
            self.map_run(slot, indices[k], chunks[k:j])
            k = j

    def unmap(self, slot: int, index: int) -> core.PhysChunk:
        """Unmaps the chunk at ``index`` of ``slot`` (after the slot's fence) and returns it."""
        row = self.chunks[slot]
        c = row[index]
        if c is None:
            raise AssertionError(f"unmap: slot {slot} index {index} is not mapped")
        self.wait_fence(slot)
        self.range.unmap(self.layout.chunk_offset(slot, index))
        row[index] = None
        while row and row[-1] is None:
            row.pop()
        n = self.refs[c.id] - 1
        if n:
            self.refs[c.id] = n
        else:
            del self.refs[c.id]
        self.mapped_total -= 1
        if index < self.ready[slot]:
            self.ready[slot] = index
        return c

    def unmap_all(self, slot: int) -> int:
        """Unmaps every chunk of ``slot``, highest index first; returns how many."""
        n = 0
        for i in reversed(list(self.indices(slot))):
            self.unmap(slot, i)
            n += 1
        return n

    def free(self) -> None:
        """Unmaps everything and frees the addresses (waits for every fence first)."""
        for slot in range(self.layout.max_seqs):
            self.wait_fence(slot)
        self.chunks = [[] for _ in range(self.layout.max_seqs)]
        self.ready = [0] * self.layout.max_seqs
        self.refs.clear()
        self.mapped_total = 0
        self.range.free()

    # ---- checking -------------------------------------------------------------------------------

    def check(self) -> List[Tuple[int, int]]:
        """Asserts the tables agree with the range and with each chunk's own mapping count.

        Returns the ``[(offset, chunk id)]`` of every mapping.
        """
        expect: List[Tuple[int, int]] = []
        counts: Dict[int, int] = {}
        for slot, row in enumerate(self.chunks):
            _expect(not row or row[-1] is not None, f"slot {slot}: trailing hole in its table")
            r = 0
            while r < len(row) and row[r] is not None:
                r += 1
            _expect(self.ready[slot] == r, f"slot {slot}: ready={self.ready[slot]} but {r} leading chunks are mapped")
            for i, c in enumerate(row):
                if c is not None:
                    expect.append((self.layout.chunk_offset(slot, i), c.id))
                    counts[c.id] = counts.get(c.id, 0) + 1
        actual = [(off, c.id) for off, c in self.range.mappings()]
        _expect(actual == expect, f"range mappings {actual[:8]}... differ from the tables {expect[:8]}...")
        _expect(counts == self.refs, f"refcounts {self.refs} differ from the tables {counts}")
        _expect(self.mapped_total == len(expect), f"mapped_total={self.mapped_total}, tables hold {len(expect)}")
        _expect(self.range.mapped_bytes == len(expect) * self.layout.chunk_bytes,
                "range.mapped_bytes disagrees with the tables")
        for off, c in self.range.mappings():
            _expect(c.mappings == self.refs[c.id],
                    f"chunk #{c.id}: {c.mappings} mappings, tables say {self.refs[c.id]}")
        return expect
