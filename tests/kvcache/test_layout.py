"""KVLayout arithmetic, and that the views tile each row exactly in [layer][k|v][head][dim] order."""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: E402,F401  (a test extra: a missing torch is an error, not a skip)
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import glake  # noqa: E402
from glake import core  # noqa: E402
from glake.kvcache import KVLayout  # noqa: E402
from kv_util import CHUNK, HUGE_ROW, ODD_ROW, make_host_kv_fixture  # noqa: F401,E402  (fixtures)


def lay(layers, heads, dim, itemsize, seqs=4, seq_len=100):
    return KVLayout(layers, heads, dim, itemsize, seqs, seq_len, CHUNK)


def test_llama3_8b_shape_is_16_tokens_per_chunk():
    L = lay(32, 8, 128, 2, seqs=256, seq_len=8192)
    assert L.row_bytes == 128 * 1024
    assert L.tokens_per_chunk == 16 and isinstance(L.tokens_per_chunk, int) and L.row_divides_chunk
    assert L.slot_bytes == 8192 * 128 * 1024 and L.va_waste_bytes_per_slot == 0
    assert L.total_bytes == 256 * L.slot_bytes
    assert L.chunks_for(0) == 0 and L.chunks_for(1) == 1 and L.chunks_for(16) == 1 and L.chunks_for(17) == 2
    assert L.tokens_backed(3) == 48
    assert L.view_strides == (L.slot_bytes // 2, 64 * 1024, 128, 1)
    assert L.view_storage_offset(0, 1) == 8 * 128 and L.view_storage_offset(1, 0) == 2 * 8 * 128


def test_slot_stride_rounds_up_to_a_chunk_without_padding_rows():
    L = lay(32, 8, 128, 2, seq_len=100)  # 100 tokens = 6.25 chunks
    assert L.row_bytes == 128 * 1024  # rows are never padded
    assert L.slot_bytes == 7 * CHUNK and L.va_waste_bytes_per_slot == 7 * CHUNK - 100 * L.row_bytes
    assert L.tokens_backed(7) == 100  # capped at max_seq_len


def test_odd_row_straddles_chunks():
    L = lay(3, 8, 120, 4, seq_len=400)
    assert L.row_bytes == 23040 and not L.row_divides_chunk
    assert L.tokens_per_chunk == pytest.approx(CHUNK / 23040)
    # token 91 starts in chunk 0 and ends in chunk 1
    assert 91 * 23040 < CHUNK < 92 * 23040
    assert L.chunk_span(91, 92) == (0, 2)
    assert L.tokens_backed(1) == 91 and L.chunks_for(91) == 1 and L.chunks_for(92) == 2
    assert L.full_chunks_of_prefix(92) == 1 and L.full_chunks_of_prefix(91) == 0
    assert L.first_token_after_chunks(1) == 92


def test_row_larger_than_a_chunk():
    L = lay(3, 32, 4096, 4, seq_len=10)
    assert L.row_bytes == 3 * CHUNK // 2
    assert L.chunks_for(1) == 1 + 1 and L.chunks_for(2) == 3 and L.tokens_backed(1) == 0 and L.tokens_backed(2) == 1


@given(layers=st.integers(1, 80), heads=st.integers(1, 16), dim=st.sampled_from([8, 40, 64, 96, 120, 128, 256]),
       itemsize=st.sampled_from([1, 2, 4]), seq_len=st.integers(1, 5000), n=st.integers(0, 5000))
@settings(max_examples=300, deadline=None)
def test_chunk_arithmetic_is_consistent(layers, heads, dim, itemsize, seq_len, n):
    L = lay(layers, heads, dim, itemsize, seq_len=seq_len)
    n = min(n, seq_len)
    c = L.chunks_for(n)
    assert c * CHUNK >= n * L.row_bytes and (c == 0 or (c - 1) * CHUNK < n * L.row_bytes)  # minimal
    assert L.tokens_backed(c) >= n  # enough
    assert L.slot_bytes % CHUNK == 0 and L.slot_bytes >= seq_len * L.row_bytes > L.slot_bytes - CHUNK
    assert L.chunks_for(seq_len) <= L.chunks_per_slot
    full = L.full_chunks_of_prefix(n)
    assert full * CHUNK <= n * L.row_bytes < (full + 1) * CHUNK
    assert L.first_token_after_chunks(full) * L.row_bytes >= full * CHUNK


@pytest.mark.parametrize("kw", [dict(num_layers=0), dict(num_kv_heads=-1), dict(head_dim=1.5), dict(max_seqs=True)])
def test_bad_shapes_are_invalid_arguments(kw):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=8, itemsize=2, max_seqs=2, max_seq_len=8, chunk_bytes=CHUNK)
    args.update(kw)
    with pytest.raises(glake.InvalidArgumentError):
        KVLayout(**args)


@pytest.mark.parametrize("shape", [dict(num_layers=2, num_kv_heads=16, head_dim=512, dtype=torch.float32),
                                   ODD_ROW, dict(num_layers=2, num_kv_heads=3, head_dim=8, dtype=torch.bfloat16)],
                         ids=["llama-like", "odd-row", "bf16"])
def test_views_tile_each_row_in_layer_kv_head_dim_order(make_host_kv, shape):
    kv = make_host_kv(**shape, max_seq_len=200)
    lay = kv.layout
    s = kv.allocate()
    t = 150 if lay.row_divides_chunk else 91  # odd row: token 91 straddles chunks 0 and 1
    kv.reserve(s, t + 1)
    # a distinct value per (layer, k|v, head, dim)
    n_el = lay.row_bytes // lay.itemsize
    expect = torch.arange(n_el, dtype=torch.float32).to(kv.dtype)
    per = lay.num_kv_heads * lay.head_dim
    for layer in range(lay.num_layers):
        for kvi, view in enumerate((kv.k_cache(layer), kv.v_cache(layer))):
            assert view.shape == (lay.max_seqs, lay.max_seq_len, lay.num_kv_heads, lay.head_dim)
            block = expect[(2 * layer + kvi) * per:(2 * layer + kvi + 1) * per]
            view[s, t] = block.view(lay.num_kv_heads, lay.head_dim)
    raw = core.read(kv.base_ptr + lay.token_offset(s, t), lay.row_bytes, backend="host")
    got = torch.frombuffer(bytearray(raw), dtype=kv.dtype)
    assert torch.equal(got, expect)


def test_huge_row_tokens_span_several_chunks(make_host_kv):
    kv = make_host_kv(**HUGE_ROW, max_seqs=2, max_seq_len=4)
    s = kv.allocate()
    kv.reserve(s, 2)
    assert kv.capacity(s) == 2 and len(kv.chunk_ids(s)) == 3
    vals = np.array([7.0, 9.0], np.float32)
    from kv_util import get, put
    put(kv, s, 0, vals)
    assert np.array_equal(get(kv, s, 0, 2), vals)
