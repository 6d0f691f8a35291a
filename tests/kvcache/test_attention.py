"""Attention over the cache views equals attention over dense copies of the same K/V."""

from __future__ import annotations

import math

import pytest

import torch  # noqa: E402,F401  (a test extra: a missing torch is an error, not a skip)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from glake.kvcache import decode_attention  # noqa: E402
from kv_util import make_kv_fixture  # noqa: F401,E402  (fixtures)


def dense_reference(q, ks, vs):
    """Per sequence, in float64: softmax(q k^T / sqrt(d)) v with each query head on its KV head."""
    out = []
    b, hq, d = q.shape
    for i in range(b):
        k, v = ks[i].double(), vs[i].double()  # [n, hkv, d]
        g = hq // k.shape[1]
        kq = k.repeat_interleave(g, dim=1)     # [n, hq, d]
        vq = v.repeat_interleave(g, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i].double(), kq) / math.sqrt(d)
        out.append(torch.einsum("hn,nhd->hd", s.softmax(-1), vq))
    return torch.stack(out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_decode_attention_over_views_matches_dense_copies(make_kv, dtype, tol):
    heads, dim, q_heads = 4, 64, 8
    kv = make_kv(num_layers=2, num_kv_heads=heads, head_dim=dim, dtype=dtype, max_seqs=5, max_seq_len=300,
                 lookahead_tokens=4)
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 17, 300, 129, 64]
    slots = [kv.allocate() for _ in lengths]
    for s, n in zip(slots, lengths):
        kv.reserve(s, n)
        for layer in range(2):
            kv.k_cache(layer)[s, :n] = torch.randn(n, heads, dim, generator=gen).to(dtype).to(kv.torch_device)
            kv.v_cache(layer)[s, :n] = torch.randn(n, heads, dim, generator=gen).to(dtype).to(kv.torch_device)
    order = [2, 0, 4, 1]  # a batch in any slot order, not all slots
    q = torch.randn(len(order), q_heads, dim, generator=gen).to(dtype).to(kv.torch_device)
    st = torch.tensor([slots[i] for i in order], device=kv.torch_device)
    ln = torch.tensor([lengths[i] for i in order], device=kv.torch_device)
    for layer in range(2):
        kc, vc = kv.k_cache(layer), kv.v_cache(layer)
        got = decode_attention(q, kc, vc, st, ln, max_len=max(lengths[i] for i in order))
        ks = [kc[slots[i], :lengths[i]].clone() for i in order]  # dense copies
        vs = [vc[slots[i], :lengths[i]].clone() for i in order]
        ref = dense_reference(q, ks, vs)
        assert got.shape == (4, q_heads, dim)
        assert torch.allclose(got.double().cpu(), ref.cpu(), atol=tol, rtol=tol)


def test_sdpa_reads_a_strided_slot_view_directly(make_kv):
    """Any kernel that takes strided K/V works on a slot's view without a copy."""
    kv = make_kv(num_layers=3, num_kv_heads=2, head_dim=32, dtype=torch.float32, max_seq_len=100)
    s = kv.allocate()
    kv.reserve(s, 70)
    gen = torch.Generator().manual_seed(1)
    kv.k_cache(1)[s, :70] = torch.randn(70, 2, 32, generator=gen).to(kv.torch_device)
    kv.v_cache(1)[s, :70] = torch.randn(70, 2, 32, generator=gen).to(kv.torch_device)
    k = kv.k_cache(1)[s, :70].transpose(0, 1)  # [heads, 70, dim], row stride = the whole row
    v = kv.v_cache(1)[s, :70].transpose(0, 1)
    assert not k.is_contiguous()
    q = torch.randn(2, 5, 32, generator=gen).to(kv.torch_device)
    got = F.scaled_dot_product_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k.contiguous(), v.contiguous())
    assert torch.allclose(got, ref, atol=1e-5)
