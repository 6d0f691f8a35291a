"""Random grow/fork/release/swap sequences (hypothesis) keep every invariant and every byte.

A model remembers the value written at every token of every live sequence (and of every swapped-out
one); after each step the cache's invariants are checked and every live sequence is read back
through the views. The deterministic machine (no mapper thread) also checks that an
out-of-memory error is raised only when the chunks really are not there, and changes nothing.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

import torch  # noqa: E402,F401  (a test extra: a missing torch is an error, not a skip)
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

import glake  # noqa: E402
from glake.kvcache import KVCache  # noqa: E402
from kv_util import CHUNK, ODD_ROW, get, get_at, put, sample_tokens  # noqa: E402

MAX_SEQS, MAX_LEN, BUDGET = 4, 400, 9  # 400 tokens of 23040 B = 5 chunks per slot; 9 chunks in all


class KVMachine(RuleBasedStateMachine):
    backend = "host"
    lookahead = 0

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCache(backend=self.backend, **ODD_ROW, max_seqs=MAX_SEQS, max_seq_len=MAX_LEN,
                          memory_budget=BUDGET * CHUNK, lookahead_tokens=self.lookahead)
        self.seqs = {}      # slot -> values of tokens [0, n)
        self.swapped = []   # (handle, values)
        self.counter = 0
        self.steps = 0

    def fresh(self, n):
        vals = np.arange(self.counter, self.counter + n, dtype=np.float32) + 1
        self.counter += n
        return vals

    def snapshot(self):
        return [self.kv.chunk_ids(i) for i in range(MAX_SEQS)], self.kv.stats()["chunks_physical"]

    def holes(self, slot, n):
        ids = self.kv.chunk_ids(slot)
        return sum(1 for i in range(self.kv.layout.chunks_for(n)) if i >= len(ids) or ids[i] is None)

    def obtainable_for(self, s, n):
        """Chunks the rules allow to back slot s up to n tokens, computed from the chunk tables alone:
        unused budget, chunks only released slots map, chunks only a live sequence maps past its
        reserved length (s: past n). (Without a mapper thread, so nothing moves meanwhile.)"""
        lay = self.kv.layout
        rows = {i: self.kv.chunk_ids(i) for i in range(MAX_SEQS)}
        count = collections.Counter(c for row in rows.values() for c in row if c is not None)
        total = BUDGET - len(count)
        for i, row in rows.items():
            keep = lay.chunks_for(n) if i == s else lay.chunks_for(len(self.seqs[i])) if i in self.seqs else 0
            total += sum(1 for j, c in enumerate(row) if c is not None and count[c] == 1 and j >= keep)
        return total

    # ---- rules ---------------------------------------------------------------------------------

    @rule()
    def allocate(self):
        try:
            s = self.kv.allocate()
        except glake.OutOfMemoryError:
            assert len(self.seqs) == MAX_SEQS
            return
        assert s not in self.seqs and self.kv.reserved(s) == 0
        self.seqs[s] = np.zeros(0, np.float32)

    def _grow(self, s, by):
        vals = self.seqs[s]
        n = min(len(vals) + by, MAX_LEN)
        need = self.holes(s, n)
        before = self.snapshot()
        can = self.obtainable_for(s, n) >= need if self.lookahead == 0 else None
        try:
            self.kv.reserve(s, n)
        except glake.OutOfMemoryError:
            assert can is not True, "out-of-memory although enough chunks were obtainable"
            if self.lookahead == 0:
                assert self.snapshot() == before
            return
        assert can is not False, "reserve succeeded beyond the budget"
        assert self.kv.capacity(s) >= n
        self.kv.check_writable(s, len(vals), n)  # the engine appends past any shared prefix
        new = self.fresh(n - len(vals))
        put(self.kv, s, len(vals), new)
        self.seqs[s] = np.concatenate([vals, new])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), by=st.integers(1, 250))
    def grow_one(self, data, by):
        self._grow(data.draw(st.sampled_from(sorted(self.seqs))), by)

    @precondition(lambda self: self.seqs)
    @rule(by=st.lists(st.integers(1, 60), min_size=MAX_SEQS, max_size=MAX_SEQS))
    def grow_all(self, by):
        """A few decode steps of the whole batch."""
        for s, b in zip(sorted(self.seqs), by):
            if s in self.seqs:
                self._grow(s, b)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def release(self, data):
        s = data.draw(st.sampled_from(sorted(self.seqs)))
        self.kv.release(s)
        del self.seqs[s]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), frac=st.floats(0, 1))
    def fork(self, data, frac):
        src = data.draw(st.sampled_from(sorted(self.seqs)))
        p = int(frac * len(self.seqs[src]))
        before = self.snapshot()
        try:
            f = self.kv.fork(src, p)
        except glake.OutOfMemoryError:
            if self.lookahead == 0:
                assert self.snapshot() == before
            return
        assert f not in self.seqs
        self.seqs[f] = self.seqs[src][:p].copy()
        lay = self.kv.layout
        shared = lay.full_chunks_of_prefix(p)
        assert self.kv.chunk_ids(f)[:shared] == self.kv.chunk_ids(src)[:shared]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def swap_out(self, data):
        s = data.draw(st.sampled_from(sorted(self.seqs)))
        h = self.kv.swap_out(s)
        assert h.length == len(self.seqs[s])
        self.swapped.append((h, self.seqs.pop(s)))

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        k = data.draw(st.integers(0, len(self.swapped) - 1))
        h, vals = self.swapped[k]
        before = self.snapshot()
        try:
            s = self.kv.swap_in(h)
        except glake.OutOfMemoryError:
            assert not h.consumed
            if self.lookahead == 0:  # nothing changed: not the live sequences, not the released slot it tried
                assert self.snapshot() == before
            return
        del self.swapped[k]
        self.seqs[s] = vals
        assert np.array_equal(get(self.kv, s, 0, len(vals)), vals)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), n=st.integers(0, MAX_LEN))
    def prefetch(self, data, n):
        s = data.draw(st.sampled_from(sorted(self.seqs)))
        self.kv.prefetch(s, n)  # a hint: backing may come later, or never (the budget)

    @precondition(lambda self: self.lookahead)
    @rule()
    def wait_for_mapper(self):
        assert self.kv.wait_mapper()

    @rule()
    def trim(self):
        self.kv.trim()
        assert self.kv.stats()["slots_released"] == 0

    # ---- invariants ----------------------------------------------------------------------------

    @invariant()
    def consistent(self):
        self.kv.check_invariants()
        st_ = self.kv.stats()
        assert st_["slots_active"] == len(self.seqs)
        assert st_["chunks_physical"] <= BUDGET
        self.steps += 1
        for s, vals in self.seqs.items():
            assert self.kv.reserved(s) == len(vals) and self.kv.capacity(s) >= len(vals)
            toks = sample_tokens(self.kv, len(vals), seed=self.steps)  # chunk-boundary rows and a few more
            assert np.array_equal(get_at(self.kv, s, toks), vals[toks]), f"slot {s} lost bytes"

    def teardown(self):
        try:
            self.kv.wait_mapper()
            self.kv.check_invariants()
            for s, vals in self.seqs.items():  # every byte of every live sequence
                assert np.array_equal(get(self.kv, s, 0, len(vals)), vals), f"slot {s} lost bytes"
        finally:
            self.kv.close()


FUZZ = os.environ.get("GLAKE_FUZZ_EXAMPLES")  # scripts/soak.sh raises the example counts below


def examples(default: int) -> int:
    return int(FUZZ) if FUZZ else default


SETTINGS = settings(max_examples=examples(80), stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class SyncMachine(KVMachine):
    lookahead = 0


class MapperMachine(KVMachine):
    lookahead = 37  # with a mapper thread mapping concurrently


TestKVCacheSync = SyncMachine.TestCase
TestKVCacheSync.settings = SETTINGS
TestKVCacheWithMapper = MapperMachine.TestCase
TestKVCacheWithMapper.settings = settings(SETTINGS, max_examples=examples(50))


class CudaMachine(KVMachine):
    backend = "cuda"
    lookahead = 37


TestKVCacheCuda = pytest.mark.gpu(CudaMachine.TestCase)
TestKVCacheCuda.settings = settings(SETTINGS, max_examples=examples(15))
