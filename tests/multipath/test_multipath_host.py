"""The multipath copy engine on the host backend: the real pipeline (threads, staging, lanes) host to host.

On the host backend "device" memory is host memory and the copy lanes are threads, so every byte
here really goes source -> staging buffer (CPU worker threads) -> destination (lane threads), with the
same chunking, buffer reuse and ordering code as on a GPU.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import glake
from glake import multipath as mp

KIB, MIB = 1 << 10, 1 << 20
# Small chunks so that a few hundred KiB already cross many chunks, pieces and buffer reuses.
SMALL = dict(chunk_bytes=64 * KIB, piece_bytes=16 * KIB, buffers=2, threads=3, streams=2, small_copy_bytes=0)


def rand_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def addr(a: np.ndarray, offset: int = 0) -> int:
    return a.ctypes.data + offset


@pytest.fixture
def eng():
    e = mp.Engine("host", **SMALL)
    yield e
    e.close()


def roundtrip(e: mp.Engine, n: int, src_off: int = 0, dev_off: int = 0, back_off: int = 0, seed: int = 0) -> None:
    """host -> "device" -> host through both staged directions; every guard byte must stay untouched."""
    guard = 64
    src = rand_bytes(n + src_off + guard, seed)
    dev = np.full(n + dev_off + guard, 0xA5, np.uint8)
    back = np.full(n + back_off + guard, 0x5A, np.uint8)
    e.copy_raw(addr(dev, dev_off), addr(src, src_off), n, "pageable_to_device")
    e.copy_raw(addr(back, back_off), addr(dev, dev_off), n, "device_to_pageable")
    assert np.array_equal(dev[dev_off:dev_off + n], src[src_off:src_off + n])
    assert np.array_equal(back[back_off:back_off + n], src[src_off:src_off + n])
    assert (dev[:dev_off] == 0xA5).all() and (dev[dev_off + n:] == 0xA5).all()
    assert (back[:back_off] == 0x5A).all() and (back[back_off + n:] == 0x5A).all()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4095, 4096, 4097, 16 * KIB - 1, 16 * KIB + 1, 64 * KIB - 1, 64 * KIB,
                               64 * KIB + 1, 128 * KIB - 1, 128 * KIB + 1, 3 * 64 * KIB + 7, 1 * MIB + 12345])
def test_roundtrip_sizes(eng, n):
    roundtrip(eng, n, src_off=3, dev_off=5, back_off=7, seed=n)


@pytest.mark.parametrize("offs", [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (7, 13, 4093), (4095, 1, 63)])
def test_roundtrip_unaligned(eng, offs):
    roundtrip(eng, 5 * 64 * KIB + 3, *offs)


def test_paths_taken(eng):
    src, dst = rand_bytes(MIB), np.zeros(MIB, np.uint8)
    assert eng.plan(addr(dst), addr(src), MIB, "h2d") == "staged_h2d"
    assert eng.plan(addr(dst), addr(src), MIB, "d2h") == "staged_d2h"
    assert eng.plan(addr(dst), addr(src), MIB, "pinned_to_device") == "plain"  # pinned_streams=1
    assert eng.plan(addr(dst), addr(src), MIB, "d2d") == "plain"
    eng.reset_stats()
    eng.copy_raw(addr(dst), addr(src), MIB, "h2d")
    s = eng.stats()
    assert s["calls.staged_h2d"] == 1 and s["bytes.staged_h2d"] == MIB
    assert s["chunks"] == MIB // (64 * KIB)
    assert s["cpu_copy_ns"] > 0 and s["errors"] == 0
    assert np.array_equal(dst, src)


@pytest.mark.parametrize("conf", [
    dict(threads=1, buffers=1),                  # the caller alone, one buffer: strictly serial
    dict(threads=4, buffers=1, streams=1),
    dict(threads=2, buffers=8, streams=3),
    dict(threads=5, buffers=3, piece_bytes=4096),  # many tiny pieces
    dict(threads=3, buffers=2, piece_bytes=40000),  # pieces that do not divide the chunk
])
def test_pipeline_shapes(conf):
    with mp.Engine("host", **{**SMALL, **conf}) as e:
        for seed, n in enumerate([1, 64 * KIB, 777 * KIB + 5]):
            roundtrip(e, n, 1, 2, 3, seed=seed)


def test_large_default_config():
    """Hundreds of MiB through the default (16 MiB x 4) pipeline."""
    n = 300 * MIB + 12345
    src = rand_bytes(n, 1)
    dev = np.empty(n, np.uint8)
    back = np.empty(n, np.uint8)
    with mp.Engine("host", small_copy_bytes=0) as e:
        e.copy_raw(addr(dev), addr(src), n, "h2d")
        e.copy_raw(addr(back), addr(dev), n, "d2h")
        assert e.stats()["chunks"] == 2 * ((n + e.config["chunk_bytes"] - 1) // e.config["chunk_bytes"])
    assert np.array_equal(back, src)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 300 * KIB), src_off=st.integers(0, 64), dev_off=st.integers(0, 64),
       back_off=st.integers(0, 64), chunk=st.sampled_from([4096, 8192, 12288, 65536]),
       buffers=st.integers(1, 4), threads=st.integers(1, 4), streams=st.integers(1, 3))
def test_roundtrip_property(n, src_off, dev_off, back_off, chunk, buffers, threads, streams):
    with mp.Engine("host", chunk_bytes=chunk, buffers=buffers, threads=threads, streams=streams,
                   small_copy_bytes=0, piece_bytes=4096) as e:
        roundtrip(e, n, src_off, dev_off, back_off, seed=n)


def test_non_blocking_source_reusable_at_return(eng):
    """A non-blocking pageable copy has read all of its source when it returns."""
    n = 2 * MIB + 1
    src = rand_bytes(n, 5)
    expect = src.copy()
    dst = np.zeros(n, np.uint8)
    eng.copy_raw(addr(dst), addr(src), n, "h2d", non_blocking=True)
    src[:] = 0  # reuse the source at once
    eng.synchronize()
    assert np.array_equal(dst, expect)


def test_later_copy_sees_non_blocking_result(eng):
    """Copies on one engine are ordered: a copy reading the destination of a non-blocking one sees its data."""
    n = MIB + 3
    src = rand_bytes(n, 6)
    mid, out = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
    eng.copy_raw(addr(mid), addr(src), n, "h2d", non_blocking=True)
    eng.copy_raw(addr(out), addr(mid), n, "d2h", non_blocking=True)  # a pageable destination is complete on return
    assert np.array_equal(out, src)


def test_plain_and_split_copies_wait_for_earlier_non_blocking_ones():
    """The host has no streams: the engine orders a copy after the lane work of earlier ones."""
    conf = {**SMALL, "small_copy_bytes": 4096, "pinned_streams": 3, "pinned_split_min_bytes": 64 * KIB, "streams": 3}
    n = 4 * MIB
    with mp.Engine("host", **conf) as e:
        for seed in range(5):
            src, mid = rand_bytes(n, seed), np.zeros(n, np.uint8)
            e.copy_raw(addr(mid), addr(src), n, "h2d", non_blocking=True)
            tail = np.zeros(1000, np.uint8)
            assert e.plan(addr(tail), addr(mid, n - 1000), 1000, "d2h") == "plain"
            e.copy_raw(addr(tail), addr(mid, n - 1000), 1000, "d2h")
            assert np.array_equal(tail, src[-1000:])
            src2, out = rand_bytes(n, 100 + seed), np.zeros(n, np.uint8)
            e.copy_raw(addr(mid), addr(src2), n, "h2d", non_blocking=True)
            e.copy_raw(addr(out), addr(mid), n, "device_to_pinned")  # split over 3 lanes
            assert np.array_equal(out, src2)


def test_pinned_split_path():
    n = 3 * MIB + 5
    src = rand_bytes(n, 7)
    dst = np.zeros(n + 2, np.uint8)
    with mp.Engine("host", pinned_streams=3, pinned_split_min_bytes=MIB) as e:
        assert e.plan(addr(dst, 1), addr(src), n, "pinned_to_device") == "pinned_split"
        assert e.plan(addr(dst, 1), addr(src), MIB - 1, "pinned_to_device") == "plain"
        e.copy_raw(addr(dst, 1), addr(src), n, "pinned_to_device")
        assert np.array_equal(dst[1:n + 1], src) and dst[0] == 0 and dst[-1] == 0
        back = np.zeros(n, np.uint8)
        e.copy_raw(addr(back), addr(dst, 1), n, "device_to_pinned", non_blocking=True)
        e.synchronize()
        assert np.array_equal(back, src)
        assert e.stats()["calls.pinned_split"] == 2


def test_small_copies_take_plain_path():
    with mp.Engine("host", small_copy_bytes=64 * KIB) as e:
        src, dst = rand_bytes(1000), np.zeros(1000, np.uint8)
        assert e.plan(addr(dst), addr(src), 1000, "h2d") == "plain"
        e.copy_raw(addr(dst), addr(src), 1000, "h2d")
        assert np.array_equal(dst, src) and e.stats()["calls.plain"] == 1


@pytest.mark.parametrize("conf", [SMALL, dict(SMALL, threads=1, buffers=1), dict(SMALL, small_copy_bytes=MIB)])
def test_copy_many_moves_every_run_through_one_pipeline(conf):
    # runs of odd sizes (some below one chunk, some across several), scattered in one "device" array,
    # with gaps between them that must stay untouched; both directions; small ones join the pipeline
    sizes = [1, 4096, 64 * KIB - 1, 64 * KIB, 200 * KIB + 3, 7, 3 * 64 * KIB + 5, 0, 1 * MIB + 11]
    gap = 13
    dev = np.full(sum(sizes) + gap * (len(sizes) + 1), 0xA5, np.uint8)
    srcs = [rand_bytes(n, seed=i) for i, n in enumerate(sizes)]
    backs = [np.full(n, 0x5A, np.uint8) for n in sizes]
    at, offs = gap, []
    for n in sizes:
        offs.append(at)
        at += n + gap
    with mp.Engine("host", **conf) as e:
        e.copy_many_raw([(addr(dev, o), addr(a), n) for o, a, n in zip(offs, srcs, sizes)], "pageable_to_device")
        s = e.stats()
        assert s["calls.staged_h2d"] == len([n for n in sizes if n]) and s["bytes.staged_h2d"] == sum(sizes), s
        chunk = conf["chunk_bytes"]
        assert s["chunks"] == sum((n + chunk - 1) // chunk for n in sizes), s  # each run chunked on its own
        e.copy_many_raw([(addr(b), addr(dev, o), n) for o, b, n in zip(offs, backs, sizes)], "device_to_pageable")
    mask = np.ones(dev.size, bool)
    for o, a, b, n in zip(offs, srcs, backs, sizes):
        assert np.array_equal(dev[o:o + n], a) and np.array_equal(b, a)
        mask[o:o + n] = False
    assert (dev[mask] == 0xA5).all(), "a byte between the runs was written"


def test_copy_many_validates_every_item_before_copying(eng):
    src, dst = rand_bytes(MIB), np.zeros(MIB, np.uint8)
    with pytest.raises(glake.InvalidArgumentError, match="null pointer"):
        eng.copy_many_raw([(addr(dst), addr(src), 1000), (0, addr(src), 10)], "h2d")
    assert not dst.any(), "the first item was copied although the second is bad"
    with pytest.raises(glake.InvalidArgumentError, match="unknown copy kind"):
        eng.copy_many_raw([(addr(dst), addr(src), 10)], "sideways")
    eng.copy_many_raw([], "h2d")  # nothing to do


def test_concurrent_copies_one_engine(eng):
    n, k = 700 * KIB + 11, 6
    srcs = [rand_bytes(n, 100 + i) for i in range(k)]
    dsts = [np.zeros(n, np.uint8) for _ in range(k)]
    backs = [np.zeros(n, np.uint8) for _ in range(k)]
    errors = []

    def worker(i):
        try:
            for _ in range(3):
                eng.copy_raw(addr(dsts[i]), addr(srcs[i]), n, "h2d", non_blocking=bool(i % 2))
                eng.copy_raw(addr(backs[i]), addr(dsts[i]), n, "d2h")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s, b in zip(srcs, backs):
        assert np.array_equal(b, s)


def test_concurrent_engines():
    n = 900 * KIB
    out = {}

    def worker(i):
        with mp.Engine("host", **SMALL) as e:
            src, dst, back = rand_bytes(n, i), np.zeros(n, np.uint8), np.zeros(n, np.uint8)
            e.copy_raw(addr(dst), addr(src), n, "h2d")
            e.copy_raw(addr(back), addr(dst), n, "d2h")
            out[i] = np.array_equal(back, src)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {0: True, 1: True, 2: True, 3: True}


# ---- torch front (CPU tensors go through the host backend's pipeline) ----

torch = pytest.importorskip("torch")


def test_torch_copy_cpu_tensors():
    src = torch.randint(-2**31, 2**31 - 1, (3, 100_003), dtype=torch.int32)
    dst = torch.zeros_like(src)
    before = mp.stats().get("host:0", {}).get("bytes", 0)
    assert mp.copy_(dst, src) is dst
    assert torch.equal(dst, src)
    assert mp.stats()["host:0"]["bytes"] - before == src.numel() * 4


def test_torch_copy_unaligned_views_and_shapes():
    base_src = torch.randint(0, 255, (5 * MIB + 9,), dtype=torch.uint8)
    base_dst = torch.zeros(5 * MIB + 9, dtype=torch.uint8)
    src, dst = base_src[3:3 + 4 * MIB + 1], base_dst[1:1 + 4 * MIB + 1]
    with mp.Engine("host", **SMALL) as e:
        e.copy_(dst, src)
    assert torch.equal(dst, src)
    assert base_dst[0] == 0 and (base_dst[2 + 4 * MIB:] == 0).all()
    a = torch.randn(6, 7)
    b = torch.empty(6, 7)
    mp.copy_(b, a)
    assert torch.equal(b, a)


@pytest.mark.parametrize("dst_shape, src_shape", [((4, 4), (16,)), ((42,), (6, 7)), ((4, 4), (4,))])
def test_torch_copy_rejects_another_shape(dst_shape, src_shape):
    """torch's copy_ refuses the first two (not broadcastable); multipath never broadcasts, so refuses all three."""
    dst, src = torch.zeros(dst_shape), torch.randn(src_shape)
    if src_shape != (4,):
        with pytest.raises(RuntimeError):
            dst.clone().copy_(src)
    with pytest.raises(glake.InvalidArgumentError, match=r"shape mismatch: dst is \(.*\), src is"):
        mp.copy_(dst, src)
    assert not dst.any()  # nothing copied


def test_torch_copy_empty():
    mp.copy_(torch.empty(0), torch.empty(0))


# ---- bad input: a clear error and nothing copied ----

def bad_pair(n=1000):
    return rand_bytes(n, 9), np.zeros(n, np.uint8)


@pytest.mark.parametrize("call, match", [
    (lambda e, s, d: e.copy_raw(addr(d), addr(s), 1000, "sideways"), "unknown copy kind"),
    (lambda e, s, d: e.copy_raw(addr(d), addr(s), 1000, "auto"), "cannot tell device from host"),
    (lambda e, s, d: e.copy_raw(addr(d), addr(s), -1, "h2d"), "nbytes=-1"),
    (lambda e, s, d: e.copy_raw(0, addr(s), 1000, "h2d"), "null pointer"),
    (lambda e, s, d: e.copy_raw(addr(d), 0, 1000, "h2d"), "null pointer"),
    (lambda e, s, d: e.copy_raw(addr(s, 10), addr(s), 100, "h2d"), "overlapping"),
    (lambda e, s, d: e.copy_raw(addr(s), addr(s, 99), 100, "d2h"), "overlapping"),
    (lambda e, s, d: e.copy_raw(addr(s), addr(s), 100, "d2d"), "overlapping"),
    (lambda e, s, d: e._e.copy(addr(d), addr(s), 1000, "pinned", "pageable", 0, False), "both sides are host"),
    (lambda e, s, d: e._e.copy(addr(d), addr(s), 1000, "host", "host", 0, False), "both sides are host"),
    (lambda e, s, d: e._e.copy(addr(d), addr(s), 1000, "device", "gpu", 0, False), "unknown memory kind"),
    (lambda e, s, d: e._e.copy(addr(d), 2**64 - 10, 1000, "device", "pageable", 0, False), "wraps"),
])
def test_bad_raw_input(eng, call, match):
    s, d = bad_pair()
    eng.reset_stats()
    with pytest.raises(glake.InvalidArgumentError, match=match):
        call(eng, s, d)
    assert (d == 0).all() and eng.stats()["calls"] == 0 and eng.stats()["errors"] == 0


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.zeros(10), torch.ones(11)), "shape mismatch"),
    (lambda: (torch.zeros(10), torch.ones(10, dtype=torch.float64)), "dtype mismatch"),
    (lambda: (torch.zeros(10, dtype=torch.int16), torch.ones(5, dtype=torch.int32)), "dtype mismatch"),
    (lambda: (torch.zeros(4, 4).t(), torch.ones(4, 4)), "not contiguous"),
    (lambda: (torch.zeros(4, 4), torch.ones(4, 8)[:, ::2]), "not contiguous"),
    (lambda: (torch.zeros(10), [1.0] * 10), "must be a torch.Tensor"),
    (lambda: (np.zeros(10, np.float32), torch.ones(10)), "must be a torch.Tensor"),
    (lambda: (torch.zeros(10, requires_grad=True), torch.ones(10)), "requires grad"),
    (lambda: (torch.zeros(10).to_sparse(), torch.ones(10).to_sparse()), "layout"),
])
def test_bad_tensor_input(make, match):
    dst, src = make()
    before = dst.clone() if isinstance(dst, torch.Tensor) else None
    with pytest.raises(glake.InvalidArgumentError, match=match):
        mp.copy_(dst, src)
    if before is not None and dst.layout == torch.strided:
        assert torch.equal(dst.detach(), before.detach())


def test_overlapping_tensors_refused():
    base = torch.arange(100, dtype=torch.int64)
    before = base.clone()
    with pytest.raises(glake.InvalidArgumentError, match="overlapping"):
        mp.copy_(base[10:60], base[0:50])
    assert torch.equal(base, before)
    mp.copy_(base[50:100], base[0:50])  # adjacent, not overlapping
    assert torch.equal(base[50:], before[:50])


def test_cpu_tensors_need_a_host_engine_only_on_cuda():
    with mp.Engine("host") as e:
        a, b = torch.ones(10), torch.zeros(10)
        e.copy_(b, a)
        assert torch.equal(a, b)


# ---- configuration ----

def test_config_keywords_and_effective_values():
    with mp.Engine("host", chunk_bytes=MIB, buffers=3, threads=2, streams=1) as e:
        c = e.config
        assert (c["chunk_bytes"], c["buffers"], c["threads"], c["streams"]) == (MIB, 3, 2, 1)
        assert c["piece_bytes"] == 512 * KIB  # chunk / threads
    assert mp.Engine("host", threads=0).config["threads"] == min(16, os.cpu_count())


@pytest.mark.parametrize("conf, match", [
    (dict(chunk_bytes=100), "chunk_bytes"), (dict(buffers=0), "buffers"), (dict(threads=-1), "threads"),
    (dict(streams=0), "streams"), (dict(pinned_streams=17), "pinned_streams"), (dict(piece_bytes=10), "piece_bytes"),
    (dict(chunk_size=4096), "unknown multipath option 'chunk_size'"),
    (dict(buffers=2.5), r"buffers=2.5 \(keyword argument\): not an integer"),
    (dict(peers="maybe"), r"peers=maybe \(keyword argument\): not a boolean"),
    (dict(chunk_bytes=-4096), r"chunk_bytes=-4096 \(keyword argument\): not a byte count"),
    (dict(threads=True), r"threads=true \(keyword argument\): not an integer"),
])
def test_bad_config(conf, match):
    with pytest.raises(glake.InvalidArgumentError, match=match):
        mp.Engine("host", **conf)


def test_env_conf(monkeypatch):
    monkeypatch.setenv(mp.ENV_VAR, "chunk_bytes:2M, buffers:6,threads:2,small_copy_bytes:0,peers:off")
    with mp.Engine("host", buffers=5) as e:  # keywords win over the environment
        c = e.config
        assert (c["chunk_bytes"], c["buffers"], c["threads"], c["small_copy_bytes"], c["peers"]) == (2 * MIB, 5, 2, 0, False)
    with mp.Engine("host", chunk_bytes="4MiB") as e:  # sizes as strings, the same syntax as the variable
        assert e.config["chunk_bytes"] == 4 * MIB
    monkeypatch.setenv(mp.ENV_VAR, "chunk_bytes:lots")
    with pytest.raises(glake.InvalidArgumentError, match=r"chunk_bytes:lots \(GLAKE_MULTIPATH_CONF\): not a byte count"):
        mp.Engine("host")


def test_parse_conf():
    assert mp.parse_conf("") == {}
    assert mp.parse_conf("chunk_bytes:4K,piece_bytes:1MiB,peer_min_bytes:2G,peers:true,peer_devices:1+3,streams:3") == {
        "chunk_bytes": 4096, "piece_bytes": MIB, "peer_min_bytes": 2 << 30, "peers": True, "peer_devices": [1, 3],
        "streams": 3}
    assert mp.parse_conf("chunk_bytes:1T,peer_chunk_bytes:1.5M") == {"chunk_bytes": 1 << 40, "peer_chunk_bytes": 3 * MIB // 2}
    for bad in ["chunk_bytes", "nope:1", "streams:x", "peers:maybe", "chunk_bytes:1Q", "peer_devices:a+b"]:
        with pytest.raises(glake.InvalidArgumentError):
            mp.parse_conf(bad)


def test_closed_engine():
    e = mp.Engine("host")
    e.close()
    e.close()  # idempotent
    assert e.closed and "closed" in repr(e)
    with pytest.raises(glake.InvalidArgumentError, match="closed"):
        e.copy_raw(1, 2, 3, "h2d")


def test_peers_on_host_backend_finds_none():
    with mp.Engine("host", peers=True, peer_min_bytes=0) as e:
        assert e.peer_devices == [] and e.peers_skipped() == []
        src, dst = rand_bytes(MIB), np.zeros(MIB, np.uint8)
        assert e.plan(addr(dst), addr(src), MIB, "pinned_to_device") == "plain"


def test_host_pointer_kind_is_unknown():
    a = np.zeros(10, np.uint8)
    assert glake._C.multipath_pointer_kind(addr(a), 0, "host") == ("unknown", -1)
