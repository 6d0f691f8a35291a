"""fork(): full prefix chunks are the same physical chunks (refcounted), the tail chunk is a copy."""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: E402,F401  (a test extra: a missing torch is an error, not a skip)

import glake  # noqa: E402
from kv_util import CHUNK, ODD_ROW, get, put, ramp, make_kv_fixture  # noqa: F401,E402  (fixtures)


def test_fork_shares_full_chunks_and_copies_the_tail(make_kv, backend):
    kv = make_kv()
    src = kv.allocate()
    kv.reserve(src, 40)
    vals = ramp(100, 0, 40)
    put(kv, src, 0, vals)
    f = kv.fork(src, 37)  # chunks 0 and 1 (tokens 0..31) shared; tokens 32..36 copied into a new chunk
    assert f != src and kv.reserved(f) == 37 and kv.capacity(f) == 48
    ids_s, ids_f = kv.chunk_ids(src), kv.chunk_ids(f)
    assert ids_f[:2] == ids_s[:2] and ids_f[2] != ids_s[2]
    st = kv.stats()
    assert st["chunks_shared"] == 2 and st["maps_shared"] == 2
    assert st["chunks_physical"] == 4 and st["chunks_mapped"] == 6
    assert st["fork_tail_bytes"] == 5 * kv.layout.row_bytes
    rng = kv.range
    assert rng.chunk_at(kv.layout.chunk_offset(src, 0)).mappings == 2
    assert rng.chunk_at(kv.layout.chunk_offset(src, 2)).mappings == 1
    assert np.array_equal(get(kv, f, 0, 37), vals[:37])
    # one physical chunk: a write before the fork point in a shared chunk shows through both views
    put(kv, src, 5, [-1.0])
    assert get(kv, f, 5, 6)[0] == -1.0
    put(kv, f, 20, [-2.0])
    assert get(kv, src, 20, 21)[0] == -2.0
    # the copied tail is independent
    put(kv, src, 33, [-3.0])
    assert get(kv, f, 33, 34)[0] == vals[33]
    put(kv, f, 36, [-4.0])
    assert get(kv, src, 36, 37)[0] == vals[36]
    kv.check_invariants()


def test_refcounts_return_to_zero(make_kv):
    kv = make_kv(max_seqs=4)
    src = kv.allocate()
    kv.reserve(src, 64)
    forks = [kv.fork(src, 48) for _ in range(3)]  # 3 shared chunks each, no tail
    rng = kv.range
    shared = [rng.chunk_at(kv.layout.chunk_offset(src, i)) for i in range(3)]
    assert [c.mappings for c in shared] == [4, 4, 4]
    assert kv.stats()["chunks_physical"] == 4 and kv.stats()["fork_tail_bytes"] == 0
    for f in forks:
        kv.release(f)
    kv.release(src)
    kv.trim()
    assert [c.mappings for c in shared] == [0, 0, 0]
    assert kv.chunk_refs() == {} and kv.stats()["chunks_mapped"] == 0
    del shared, rng
    kv.check_invariants()  # the pool has nothing in use


def test_engine_may_not_write_into_shared_chunks(make_kv):
    kv = make_kv()
    src = kv.allocate()
    kv.reserve(src, 40)
    f = kv.fork(src, 37)
    assert kv.first_writable(f) == 32 and kv.first_writable(src) == 32
    refusal = "refusing to write tokens \\[31, 33\\).*chunk 1 is shared by 2"
    with pytest.raises(glake.InvalidArgumentError, match=refusal):
        kv.check_writable(f, 31, 33)
    kv.check_writable(f, 32, 37)  # the copied tail
    kv.reserve(f, 40)
    k = torch_zeros(kv, 3)
    kv.write(0, f, 37, k, k)  # appending past the prefix is fine
    with pytest.raises(glake.InvalidArgumentError, match="refusing"):
        kv.write(0, src, 10, k, k)
    with pytest.raises(glake.InvalidArgumentError, match="not all backed"):
        kv.check_writable(f, 40, 49)
    assert kv.first_writable(kv.allocate()) == 0


def torch_zeros(kv, n):
    import torch
    return torch.zeros(n, kv.layout.num_kv_heads, kv.layout.head_dim, dtype=kv.dtype, device=kv.torch_device)


def test_fork_of_a_fork_and_release_of_the_source(make_kv):
    kv = make_kv()
    src = kv.allocate()
    kv.reserve(src, 50)
    vals = ramp(7, 0, 50)
    put(kv, src, 0, vals)
    f1 = kv.fork(src, 50)
    kv.reserve(f1, 70)
    put(kv, f1, 50, ramp(-500, 50, 70))
    f2 = kv.fork(f1, 60)
    assert kv.chunk_ids(f2)[:3] == kv.chunk_ids(src)[:3]
    kv.release(src)
    kv.release(f1)
    assert np.array_equal(get(kv, f2, 0, 50), vals)
    assert np.array_equal(get(kv, f2, 50, 60), ramp(-500, 50, 60))
    # a new sequence in a released slot never keeps a chunk that another slot still maps
    s = kv.allocate()
    assert all(kv.chunk_refs()[i] == 1 for i in kv.chunk_ids(s) if i is not None)
    kv.check_invariants()


def test_fork_into_a_released_sibling_reuses_its_mappings(make_kv, backend):
    from glake import core
    kv = make_kv()
    src = kv.allocate()
    kv.reserve(src, 48)
    f = kv.fork(src, 48)  # 3 shared chunks
    kv.reserve(f, 64)     # + 1 own chunk
    kv.release(f)
    maps = core.stats(backend)["calls.map"]
    g = kv.fork(src, 48)  # lands in f's slot: the prefix is still mapped there, and so is its own chunk
    assert g == f and kv.capacity(g) == 64
    assert core.stats(backend)["calls.map"] == maps
    kv.check_invariants()


def test_fork_with_straddling_rows(make_kv):
    kv = make_kv(**ODD_ROW, max_seq_len=400)
    src = kv.allocate()
    kv.reserve(src, 300)
    vals = ramp(11, 0, 300)
    put(kv, src, 0, vals)
    f = kv.fork(src, 92)  # token 91 straddles chunk 0 (shared) and chunk 1 (copied)
    assert kv.chunk_ids(f)[0] == kv.chunk_ids(src)[0] and kv.chunk_ids(f)[1] != kv.chunk_ids(src)[1]
    assert np.array_equal(get(kv, f, 0, 92), vals[:92])
    assert kv.first_writable(f) == 92
    kv.reserve(f, 200)
    put(kv, f, 92, ramp(0, 92, 200))
    assert np.array_equal(get(kv, src, 92, 200), vals[92:200])
    kv.check_invariants()


def test_fork_tail_out_of_budget_changes_nothing(make_kv):
    kv = make_kv(memory_budget=3 * CHUNK)
    src = kv.allocate()
    kv.reserve(src, 40)
    before = (kv.stats(), kv.chunk_ids(src))
    with pytest.raises(glake.OutOfMemoryError, match="tail of fork"):
        kv.fork(src, 37)
    assert (kv.stats(), kv.chunk_ids(src)) == before
    f = kv.fork(src, 32)  # no tail: no new chunk
    assert kv.capacity(f) == 32
    kv.check_invariants()


def test_prefix_zero_is_a_plain_allocation(make_kv):
    kv = make_kv()
    src = kv.allocate()
    kv.reserve(src, 10)
    f = kv.fork(src, 0)
    assert kv.reserved(f) == 0 and kv.stats()["chunks_shared"] == 0
