"""glake.serve's Triton kernels equal their torch references: on CPU under Triton's interpreter, on CUDA
compiled; the decode kernel never reads rows past a sequence's end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glake.serve.kernels import decode_attention as kernel
from tests.serve.kernel_cases import FUSED_CASES, run_all

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not kernel.available(), reason="needs triton")


# the largest error allowed per kernel and dtype, relative to the reference's largest magnitude: decode
# attention sums in another order; the fused kernels round where torch rounds, so they differ by an ulp
# of the dtype at most (float32 rsqrt/exp ulps); bf16's ulp is 2^-8 relative, fp16's 2^-11
TOL = {"float32": dict(decode=1e-5, rms_norm=1e-5, rope=1e-6, silu_mul=1e-6),
       "float16": dict(decode=5e-3, rms_norm=2e-3, rope=2e-3, silu_mul=2e-3),
       "bfloat16": dict(decode=2e-2, rms_norm=1e-2, rope=1e-2, silu_mul=1e-2)}


def check(errors: dict, dtype: str) -> None:
    for name, errs in errors.items():
        assert all(e < TOL[dtype][name] for e in errs), (name, errs)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_interpreted_kernels_equal_their_references(dtype):
    out = subprocess.run([sys.executable, "-m", "tests.serve.kernel_cases", dtype], cwd=ROOT, text=True,
                         capture_output=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    errors = json.loads(out.stdout.splitlines()[-1])
    assert set(errors) == {"decode", *FUSED_CASES}
    check(errors, dtype)


def test_choose_split_covers_the_gpu():
    # 1 sequence of 4096 tokens with 8 KV heads: 66 splits wanted, capped at 64 -> 64 tokens each
    assert kernel.choose_split(1, 8, 4096, 64) == 64
    # 256 sequences x 8 heads already fill 132 SMs 4 times over: one split of the whole length
    assert kernel.choose_split(256, 8, 2000, 64) == 2048
    assert kernel.choose_split(16, 8, 2048, 64) == 512


def test_bad_shapes_are_refused():
    q = torch.zeros(2, 6, 32)
    cache = torch.zeros(4, 8, 4, 32)
    with pytest.raises(ValueError, match="multiple"):
        kernel.decode_attention(q, cache, cache, torch.zeros(2), torch.ones(2), 8)
    with pytest.raises(ValueError, match="power of two"):
        kernel.decode_attention(torch.zeros(2, 4, 48), torch.zeros(4, 8, 2, 48), torch.zeros(4, 8, 2, 48),
                                torch.zeros(2), torch.ones(2), 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_compiled_kernels_equal_their_references(dtype):
    check(run_all("cuda", getattr(torch, dtype)), dtype)


@pytest.mark.gpu
def test_kernel_over_a_real_kvcache_reads_only_backed_rows():
    """On the cuda backend rows past a sequence's mapped chunks are not backed: a read there faults."""
    from glake.kvcache import KVCache
    from glake.kvcache.attention import decode_attention as reference

    kv = KVCache(num_layers=2, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, max_seqs=8, max_seq_len=8192,
                 backend="cuda")
    lengths = [1, 300, 2047, 5000]
    slots = [kv.allocate() for _ in lengths]
    for s, n in zip(slots, lengths):
        kv.reserve(s, n)
    g = torch.Generator(device="cuda").manual_seed(0)
    for s, n in zip(slots, lengths):
        for layer in range(2):
            kv.k_cache(layer)[s, :n] = torch.randn(n, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16)
            kv.v_cache(layer)[s, :n] = torch.randn(n, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    q = torch.randn(4, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    st = torch.tensor(slots, device="cuda")
    ln = torch.tensor(lengths, device="cuda")
    out = kernel.decode_attention(q, kv.k_cache(1), kv.v_cache(1), st.int(), ln.int(), max(lengths))
    ref = reference(q, kv.k_cache(1), kv.v_cache(1), st, ln, max(lengths))
    torch.cuda.synchronize()
    assert (out.float() - ref.float()).abs().max().item() < 2e-2
    kv.close()
