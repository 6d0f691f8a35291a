"""GPU interop: memory mapped by glake is ordinary device memory to torch and CuPy."""

from __future__ import annotations

import pytest

from glake import core

pytestmark = pytest.mark.gpu


@pytest.fixture
def mapped_range():
    g = core.granularity("cuda")
    chunks = [core.PhysChunk(backend="cuda") for _ in range(2)]
    r = core.VirtualRange(2 * g, backend="cuda")
    r.map_many(0, chunks)
    yield r
    r.free()


def test_torch_reads_and_writes_glake_memory(mapped_range):
    torch = pytest.importorskip("torch")
    r = mapped_range
    t = torch.as_tensor(r, device="cuda")
    assert t.dtype == torch.uint8 and t.numel() == r.size and t.data_ptr() == r.ptr
    f = t.view(torch.float32)
    f.copy_(torch.arange(f.numel(), device="cuda", dtype=torch.float32))
    torch.cuda.synchronize()
    back = torch.frombuffer(bytearray(core.read(r.ptr, r.size, backend="cuda")), dtype=torch.float32)
    assert torch.equal(back, torch.arange(f.numel(), dtype=torch.float32))
    core.write(r.ptr, b"\x00\x00\x80\x3f", backend="cuda")  # 1.0f
    assert f[0].item() == 1.0
    assert (f * 2).sum().item() == pytest.approx(2 * (f.double().sum().item()), rel=1e-6)


def test_cupy_reads_and_writes_glake_memory(mapped_range):
    cupy = pytest.importorskip("cupy")
    r = mapped_range
    a = cupy.asarray(r)
    assert a.data.ptr == r.ptr and a.size == r.size
    a[:] = cupy.arange(a.size, dtype=cupy.uint64).astype(cupy.uint8)
    cupy.cuda.runtime.deviceSynchronize()
    expect = bytes(i & 0xFF for i in range(4096))
    assert core.read(r.ptr, 4096, backend="cuda") == expect
    assert core.read(r.ptr + core.granularity("cuda"), 4096, backend="cuda") == expect


def test_same_chunk_twice_seen_by_torch():
    torch = pytest.importorskip("torch")
    g = core.granularity("cuda")
    c = core.PhysChunk(backend="cuda")
    with core.VirtualRange(2 * g, backend="cuda") as r:
        r.map(0, c)
        r.map(g, c)
        t = torch.as_tensor(r, device="cuda")
        t[:g].fill_(7)
        torch.cuda.synchronize()
        assert bool((t[g:] == 7).all())
        del t
