"""Helpers shared by the kvcache tests: small model shapes, and writing/reading token values."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
import torch

# One intra-op thread: the tests move a few KiB per op, and on a loaded 2-CPU machine OpenMP's
# barrier waits made every such op cost ~8 ms (200x slower than single-threaded).
torch.set_num_threads(1)

MiB = 1 << 20
CHUNK = 2 * MiB

# row = 2 layers x 2 x 16 heads x 512 x 4 B = 128 KiB: 16 tokens per chunk, like Llama-3-8B in bf16
LLAMA_LIKE = dict(num_layers=2, num_kv_heads=16, head_dim=512, dtype=torch.float32)
# row = 3 x 2 x 8 x 120 x 4 B = 23040 B: 91.02 tokens per chunk, rows straddle chunk boundaries
ODD_ROW = dict(num_layers=3, num_kv_heads=8, head_dim=120, dtype=torch.float32)
# row = 3 x 2 x 32 x 4096 x 4 B = 3 MiB: one token spans 1.5 chunks
HUGE_ROW = dict(num_layers=3, num_kv_heads=32, head_dim=4096, dtype=torch.float32)


def put(kv, slot: int, start: int, values: Sequence[float]) -> None:
    """Writes token values through the views: K of layer l = value + l, V = -(value + l), every head/dim."""
    n = len(values)
    if n == 0:
        return
    t = torch.as_tensor(np.asarray(values, dtype=np.float32), device=kv.torch_device).to(kv.dtype)[:, None, None]
    for layer in range(kv.layout.num_layers):
        kv.k_cache(layer)[slot, start:start + n] = t + layer
        kv.v_cache(layer)[slot, start:start + n] = -(t + layer)


def _read_uniform(kv, slot: int, rows) -> np.ndarray:
    """The values of the given rows (a slice or an index tensor), checking every layer/head/dim agrees."""
    out = None
    for layer in range(kv.layout.num_layers):
        k = kv.k_cache(layer)[slot, rows].float().cpu()
        v = kv.v_cache(layer)[slot, rows].float().cpu()
        vals = k[:, 0, 0] - layer
        assert torch.equal(k, (vals + layer)[:, None, None].expand_as(k)), f"layer {layer} K rows are not uniform"
        assert torch.equal(v, -(vals + layer)[:, None, None].expand_as(v)), f"layer {layer} V disagrees with K"
        if out is None:
            out = vals
        else:
            assert torch.equal(out, vals), f"layer {layer} holds other values than layer 0"
    return out.numpy() if out is not None else np.zeros(0, np.float32)


def get(kv, slot: int, start: int, end: int) -> np.ndarray:
    """Reads tokens [start, end) back through the views, checking every layer/head/dim agrees."""
    return _read_uniform(kv, slot, slice(start, end))


def sample_tokens(kv, n: int, extra: int = 16, seed: int = 0) -> np.ndarray:
    """Tokens worth checking in a sequence of n: both ends, every row on a chunk boundary, a few random ones."""
    if n == 0:
        return np.zeros(0, np.int64)
    lay = kv.layout
    # the last token touching chunk c - 1, and the one after it
    bounds = [lay.first_token_after_chunks(c) - 1 for c in range(1, lay.chunks_for(n) + 1)]
    bounds += [b + 1 for b in bounds]
    rnd = np.random.default_rng(seed).integers(0, n, extra)
    toks = np.unique(np.clip(np.array([0, n - 1] + bounds + list(rnd)), 0, n - 1))
    return toks


def get_at(kv, slot: int, tokens: np.ndarray) -> np.ndarray:
    """Like get(), for the given tokens only."""
    return _read_uniform(kv, slot, torch.as_tensor(tokens, device=kv.torch_device))


def ramp(base: float, start: int, end: int) -> np.ndarray:
    """Distinct, exactly representable values for tokens [start, end) of one sequence."""
    return (base + np.arange(start, end)).astype(np.float32)


# ---- fixtures: test modules import make_kv_fixture / make_host_kv_fixture and take make_kv /
# ---- make_host_kv. (No conftest.py here: tests/conftest.py must stay the only module named
# ---- "conftest", or `from conftest import HAS_CUDA` in tests/test_backend.py would find this one.)

def _maker(backend):
    from glake.kvcache import KVCache

    made = []

    def make(**kw):
        args = dict(LLAMA_LIKE, max_seqs=4, max_seq_len=128, lookahead_tokens=0)
        args.update(kw)
        kv = KVCache(backend=backend, **args)
        made.append(kv)
        return kv

    return make, made


@pytest.fixture(name="make_kv")
def make_kv_fixture(backend):
    """``make_kv(**overrides)``: a KVCache on the test's backend (LLAMA_LIKE shape, 4 slots of 128
    tokens, no mapper thread by default), closed at teardown, before the leak check."""
    make, made = _maker(backend)
    yield make
    for kv in made:
        kv.close()


@pytest.fixture(name="make_host_kv")
def make_host_kv_fixture():
    """Like make_kv, on the host backend only (for tests whose subject is not the backend)."""
    make, made = _maker("host")
    yield make
    for kv in made:
        kv.close()
