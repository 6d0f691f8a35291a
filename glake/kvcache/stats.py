"""Introspection of a KVCache: counters and gauges, and a full invariant check for tests."""

from __future__ import annotations

from typing import Dict, Union

from glake.kvcache.slots import ACTIVE, FREE, IDLE


class CacheIntrospection:
    """``stats()`` and ``check_invariants()`` (a mixin of KVCache)."""

    def stats(self) -> Dict[str, Union[int, float, None]]:
        """Counters and gauges.

        Gauges: ``chunks_physical`` (distinct chunks mapped), ``chunks_mapped`` (mappings; a shared
        chunk counts once per slot), ``chunks_shared``, ``chunks_active`` / ``chunks_released``
        (mappings in live / released slots), ``chunks_reclaimable`` (kept by released slots),
        ``chunks_surplus`` (live sequences' chunks past their reserved length), ``chunks_free``
        (:meth:`num_free_chunks`), ``chunks_budget`` (None without a budget),
        ``pool_cached_chunks``, ``slots_active|released|free``, ``tokens_reserved`` (sum over live
        sequences), ``tokens_mapped`` (physical bytes mapped / row) and ``utilisation`` (their
        ratio; above 1 when forks share chunks).

        Counters: ``maps`` (chunks mapped, one driver map each) = ``maps_background`` +
        ``maps_sync`` + ``maps_shared`` (fork prefixes); ``unmaps``; ``reclaimed_released`` /
        ``reclaimed_lookahead``; ``moved`` (a slot's own chunks remapped from past its need into a
        hole below it); ``trimmed`` (surplus chunks the mapper unmapped from live sequences into
        the pool); ``sync_waits`` (reserve calls that mapped synchronously) and ``wait_ns`` (their
        time, lock waits included); ``mapper_passes``, ``mapper_busy_ns``, ``mapper_errors``;
        ``forks``, ``fork_tail_bytes``, ``releases``, ``swaps_out|in``, ``bytes_swapped_out|in``.
        """
        with self._lock:
            self._check_open()
            tab, lay, n = self._table, self.layout, self._n
            reserved = sum(st.target for st in self._active.values())
            held = tab.unique_chunks * lay.chunk_bytes
            out: Dict[str, Union[int, float, None]] = {
                "chunks_physical": tab.unique_chunks, "chunks_mapped": tab.mapped_total,
                "chunks_shared": tab.shared_chunks,
                "chunks_active": sum(tab.count(i) for i in self._active),
                "chunks_released": sum(tab.count(i) for i in self._idle),
                "chunks_reclaimable": len(self._idle_victims(-1)),
                "chunks_surplus": len(self._surplus_victims()),
                "chunks_free": self._pool_left() + len(self._idle_victims(-1)) + len(self._surplus_victims()),
                "chunks_budget": self._budget_chunks, "pool_cached_chunks": self._pool.stats()["cached_chunks"],
                "slots_active": len(self._active), "slots_released": len(self._idle), "slots_free": len(self._free),
                "tokens_reserved": reserved, "tokens_mapped": held / lay.row_bytes,
                "utilisation": (reserved * lay.row_bytes / held) if held else 0.0,
                "maps": n["maps_background"] + n["maps_sync"] + n["maps_shared"],
            }
            for key in ("maps_background", "maps_sync", "maps_shared", "unmaps", "reclaimed_released",
                        "reclaimed_lookahead", "moved", "trimmed", "sync_waits", "wait_ns", "mapper_errors", "forks",
                        "fork_tail_bytes", "releases", "swaps_out", "swaps_in", "bytes_swapped_out",
                        "bytes_swapped_in"):
                out[key] = n[key]
            out["mapper_passes"] = self._mapper.passes if self._mapper else 0
            out["mapper_busy_ns"] = self._mapper.busy_ns if self._mapper else 0
            return out

    def check_invariants(self) -> None:
        """Asserts every internal invariant (tables vs. range, refcounts, slot states, budget).

        For tests and debugging; raises AssertionError naming the first broken one.
        """
        def expect(ok: bool, msg: str) -> None:
            if not ok:
                raise AssertionError(msg)

        with self._lock:
            self._check_open()
            tab, lay = self._table, self.layout
            tab.check()
            for st in self._slots:
                i = st.index
                expect((st.state == ACTIVE) == (i in self._active), f"slot {i}: state {st.state} vs active table")
                expect((st.state == IDLE) == (i in self._idle), f"slot {i}: state {st.state} vs released list")
                expect((st.state == FREE) == (i in self._free), f"slot {i}: state {st.state} vs free stack")
                if st.state == FREE:
                    expect(tab.count(i) == 0, f"free slot {i} holds {tab.count(i)} chunks")
                if st.state == IDLE:
                    expect(tab.count(i) > 0, f"released slot {i} holds no chunk")
                if st.state == ACTIVE:
                    expect(st.capacity == lay.tokens_backed(tab.ready[i]), f"slot {i}: stale capacity {st.capacity}")
                    expect(st.target <= st.capacity, f"slot {i}: reserved {st.target} > capacity {st.capacity}")
                    shared = [j for j in tab.indices(i) if tab.is_shared(i, j)]
                    expect(not shared or max(shared) < lay.full_chunks_of_prefix(st.target),
                           f"slot {i}: shared chunk(s) {shared} not wholly inside its reserved tokens")
            expect(len(self._free) == len(set(self._free)), "duplicate slot in the free stack")
            ps = self._pool.stats()
            expect(ps["in_use_chunks"] == tab.unique_chunks,
                   f"pool has {ps['in_use_chunks']} chunks in use but the table maps {tab.unique_chunks}")
            if self._budget_chunks is not None:
                expect(ps["in_use_chunks"] + ps["cached_chunks"] <= self._budget_chunks, "over the memory budget")

