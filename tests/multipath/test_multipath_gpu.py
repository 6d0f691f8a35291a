"""The multipath copy engine on a GPU: byte-exact copies, stream ordering, non-blocking semantics."""

from __future__ import annotations

import gc

import pytest

import glake
from glake import _C
from glake import multipath as mp

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

KIB, MIB = 1 << 10, 1 << 20
CONF = dict(chunk_bytes=MIB, buffers=3, threads=4, streams=2, small_copy_bytes=0)
SLEEP_CYCLES = 200_000_000  # torch.cuda._sleep: ~0.1 s of GPU time, far longer than any copy here


@pytest.fixture(autouse=True)
def need_torch_cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")


@pytest.fixture
def eng():
    e = mp.Engine("cuda", 0, **CONF)
    yield e
    e.close()


def host_bytes(n: int, pinned: bool, seed: int, offset: int = 0) -> "torch.Tensor":
    """n random bytes on the host, starting `offset` bytes into their allocation (unaligned views)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 256, (n + offset,), dtype=torch.uint8, generator=g)
    if pinned:
        t = t.pin_memory()
    return t[offset:]


def empty_host(n: int, pinned: bool, fill: int = 0) -> "torch.Tensor":
    t = torch.full((n,), fill, dtype=torch.uint8)
    return t.pin_memory() if pinned else t


@pytest.mark.parametrize("pinned", [False, True], ids=["pageable", "pinned"])
@pytest.mark.parametrize("n", [1, 4097, MIB - 1, 3 * MIB + 5, 64 * MIB + 3])
@pytest.mark.parametrize("offset", [0, 3])
def test_h2d_d2h_exact(eng, pinned, n, offset):
    src = host_bytes(n, pinned, seed=n + offset, offset=offset)
    base = torch.full((n + 16,), 0xA5, dtype=torch.uint8, device="cuda")
    dev = base[5:5 + n]
    before = eng.stats()
    mp_path = "plain" if pinned else "staged_h2d"
    eng.copy_(dev, src)
    assert torch.equal(dev.cpu(), src)
    assert bool((base[:5] == 0xA5).all()) and bool((base[5 + n:] == 0xA5).all())
    back = empty_host(n + offset, pinned, 0x5A)[offset:]
    eng.copy_(back, dev)
    assert torch.equal(back, src)
    after = eng.stats()
    assert after[f"calls.{mp_path}"] - before[f"calls.{mp_path}"] >= 1
    if not pinned:
        assert after["calls.staged_d2h"] - before["calls.staged_d2h"] == 1


def test_large_pageable_roundtrip_default_config():
    n = 512 * MIB + 77
    src = host_bytes(n, False, seed=1)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    back = torch.empty(n, dtype=torch.uint8)
    with mp.Engine("cuda", 0) as e:
        e.copy_(dev, src)
        e.copy_(back, dev)
        s = e.stats()
    assert torch.equal(back, src)
    assert s["calls.staged_h2d"] == 1 and s["calls.staged_d2h"] == 1


def test_module_copy_uses_cuda_engine():
    src = host_bytes(8 * MIB, False, seed=2)
    dev = torch.empty_like(src, device="cuda")
    mp.copy_(dev, src)
    assert torch.equal(dev.cpu(), src)
    assert mp.stats()["cuda:0"]["bytes"] >= 8 * MIB


@pytest.mark.parametrize("pinned", [False, True], ids=["pageable", "pinned"])
def test_h2d_ordered_between_kernels(eng, pinned):
    """Work on the stream before the copy still sees the old bytes; work after it sees the new ones."""
    n = 96 * MIB
    src = host_bytes(n, pinned, seed=3)
    expect = int(src.sum(dtype=torch.int64))
    dev = torch.zeros(n, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(SLEEP_CYCLES)
        old = dev.sum(dtype=torch.int64)  # runs ~0.1 s after the copy was issued
        eng.copy_(dev, src, non_blocking=True)
        new = dev.sum(dtype=torch.int64)
    s.synchronize()
    assert int(old) == 0, "the copy overwrote the destination before earlier work on the stream read it"
    assert int(new) == expect, "work enqueued after the copy did not see its data"


@pytest.mark.parametrize("pinned", [False, True], ids=["pageable", "pinned"])
def test_d2h_waits_for_kernels_before(eng, pinned):
    n = 96 * MIB
    dev = torch.zeros(n, dtype=torch.uint8, device="cuda")
    out = empty_host(n, pinned)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(SLEEP_CYCLES)
        dev.fill_(9)
        eng.copy_(out, dev, non_blocking=pinned)  # pageable: complete on return; pinned: after the stream
        dev.fill_(1)  # later work must not leak into the copy
    if pinned:
        s.synchronize()
    assert bool((out == 9).all())


def test_non_blocking_pageable_source_reusable(eng):
    n = 64 * MIB + 1
    src = host_bytes(n, False, seed=4)
    expect = src.clone()
    dev = torch.zeros(n, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(SLEEP_CYCLES)  # the device side lags: the call must still have read all of src
        eng.copy_(dev, src, non_blocking=True)
    src.zero_()
    s.synchronize()
    assert torch.equal(dev.cpu(), expect)


def test_non_blocking_pinned_source_kept_alive(eng):
    """A pinned source dropped right after a non-blocking copy must not be recycled under the copy."""
    n = 32 * MIB
    src = host_bytes(n, True, seed=5)
    expect = src.clone()
    dev = torch.zeros(n, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(SLEEP_CYCLES)
        eng.copy_(dev, src, non_blocking=True)
    del src
    gc.collect()
    reuse = [torch.zeros(n, dtype=torch.uint8).pin_memory() for _ in range(2)]  # would get the freed block
    s.synchronize()
    assert torch.equal(dev.cpu(), expect)
    del reuse
    eng.synchronize()


def test_pinned_split_exact():
    n = 96 * MIB + 3
    src = host_bytes(n, True, seed=6)
    with mp.Engine("cuda", 0, pinned_streams=3, pinned_split_min_bytes=MIB) as e:
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        e.copy_(dev, src)
        back = empty_host(n, True)
        e.copy_(back, dev, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        assert torch.equal(back, src)
        assert e.stats()["calls.pinned_split"] == 2


def test_pointer_kinds_and_auto(eng):
    n = 2 * MIB
    pg, pn = host_bytes(n, False, 7), host_bytes(n, True, 8)
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    assert _C.multipath_pointer_kind(pg.data_ptr(), 0, "cuda")[0] == "pageable"
    assert _C.multipath_pointer_kind(pn.data_ptr() + 5, 0, "cuda")[0] == "pinned"
    assert _C.multipath_pointer_kind(d.data_ptr(), 0, "cuda") == ("device", 0)
    assert eng.plan(d.data_ptr(), pg.data_ptr(), n, "auto") == "staged_h2d"
    assert eng.plan(d.data_ptr(), pn.data_ptr(), n, "auto") == "plain"
    assert eng.plan(pg.data_ptr(), d.data_ptr(), n, "d2h") == "staged_d2h"
    stream = torch.cuda.current_stream().cuda_stream
    eng.copy_raw(d.data_ptr(), pg.data_ptr(), n, "auto", stream)
    eng.copy_raw(pn.data_ptr(), d.data_ptr(), n, "auto", stream)
    assert torch.equal(pn, pg)


def test_glake_mapped_memory_is_device_memory(eng):
    from glake import core
    g = core.granularity("cuda")
    with core.VirtualRange(2 * g, backend="cuda") as r:
        r.map_many(0, [core.PhysChunk(backend="cuda") for _ in range(2)])
        assert _C.multipath_pointer_kind(r.ptr, 0, "cuda") == ("device", 0)
        src = host_bytes(2 * g, False, 9)
        eng.copy_raw(r.ptr, src.data_ptr(), 2 * g, "h2d", torch.cuda.current_stream().cuda_stream)
        back = torch.empty(2 * g, dtype=torch.uint8)
        eng.copy_raw(back.data_ptr(), r.ptr, 2 * g, "d2h", torch.cuda.current_stream().cuda_stream)
        assert torch.equal(back, src)


@pytest.mark.parametrize("what, match", [
    ("pinned_claim_on_pageable", "not pinned"),
    ("host_as_device", "not device memory"),
    ("device_as_host", "not host memory"),
    ("overlap_device", "overlapping"),
    ("two_cpu_tensors_on_cuda_engine", "host-backend engine"),
])
def test_bad_input_gpu(eng, what, match):
    n = MIB
    pg = host_bytes(n, False, 10)
    d = torch.zeros(n, dtype=torch.uint8, device="cuda")
    d2 = torch.zeros(n, dtype=torch.uint8, device="cuda")
    out = torch.zeros(n, dtype=torch.uint8)
    with pytest.raises(glake.InvalidArgumentError, match=match):
        if what == "pinned_claim_on_pageable":
            eng.copy_raw(d.data_ptr(), pg.data_ptr(), n, "pinned_to_device")
        elif what == "host_as_device":
            eng.copy_raw(out.data_ptr(), pg.data_ptr(), n, "h2d")
        elif what == "device_as_host":
            eng.copy_raw(d.data_ptr(), d2.data_ptr(), n, "h2d")
        elif what == "overlap_device":
            eng.copy_raw(d.data_ptr() + 10, d.data_ptr(), 100, "d2d")
        else:
            eng.copy_(out, pg)
    torch.cuda.synchronize()
    assert int(d.sum()) == 0 and int(out.sum()) == 0


def test_refuses_capturing_stream(eng):
    src = host_bytes(MIB, True, 11)
    d = torch.zeros(MIB, dtype=torch.uint8, device="cuda")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.graph(g, stream=s, capture_error_mode="relaxed"):
        d.add_(1)
        with pytest.raises(glake.InvalidArgumentError, match="capturing"):
            eng.copy_(d, src)
    g.replay()
    torch.cuda.synchronize()
    assert bool((d == 1).all())


def test_wrong_device_refused():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with mp.Engine("cuda", 0) as e:
        d1 = torch.zeros(MIB, dtype=torch.uint8, device="cuda:1")
        src = host_bytes(MIB, False, 12)
        with pytest.raises(glake.InvalidArgumentError, match="cuda:1"):
            e.copy_(d1, src)
        with pytest.raises(glake.InvalidArgumentError, match="device 1"):
            e.copy_raw(d1.data_ptr(), src.data_ptr(), MIB, "h2d")


def test_peer_paths_exact():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with mp.Engine("cuda", 0, peers=True, peer_min_bytes=MIB, peer_chunk_bytes=4 * MIB) as e:
        if not e.peer_devices:
            pytest.skip(f"no peer access: {e.peers_skipped()}")
        n = 96 * MIB + 5
        src = host_bytes(n, True, 13)
        dev = torch.zeros(n, dtype=torch.uint8, device="cuda:0")
        assert e.plan(dev.data_ptr(), src.data_ptr(), n, "auto") == "peer"
        e.copy_(dev, src)
        assert torch.equal(dev.cpu(), src)
        back = empty_host(n, True)
        e.copy_(back, dev, non_blocking=True)
        torch.cuda.current_stream(0).synchronize()
        assert torch.equal(back, src)
        assert e.stats()["calls.peer"] == 2


@pytest.mark.parametrize("pinned", [False, True], ids=["pageable", "pinned"])
def test_copy_many_scatters_and_gathers_exactly(eng, pinned):
    # runs below, at and across the 1 MiB staging chunk, at odd offsets of one device buffer
    sizes = [1, 4097, MIB, 3 * MIB + 5, 7, 2 * MIB - 1]
    gap = 11
    base = torch.full((sum(sizes) + gap * (len(sizes) + 1),), 0xA5, dtype=torch.uint8, device="cuda")
    srcs = [host_bytes(n, pinned, seed=i, offset=i % 3) for i, n in enumerate(sizes)]
    backs = [empty_host(n, pinned, 0x5A) for n in sizes]
    offs, at = [], gap
    for n in sizes:
        offs.append(at)
        at += n + gap
    d0 = base.data_ptr()
    eng.copy_many_raw([(d0 + o, s.data_ptr(), n) for o, s, n in zip(offs, srcs, sizes)],
                      "pinned_to_device" if pinned else "pageable_to_device")
    eng.copy_many_raw([(b.data_ptr(), d0 + o, n) for o, b, n in zip(offs, backs, sizes)],
                      "device_to_pinned" if pinned else "device_to_pageable")
    mask = torch.ones(base.numel(), dtype=torch.bool, device="cuda")
    for o, s, b, n in zip(offs, srcs, backs, sizes):
        assert torch.equal(base[o:o + n].cpu(), s) and torch.equal(b, s)
        mask[o:o + n] = False
    assert bool((base[mask] == 0xA5).all()), "a byte between the runs was written"
