"""Scenarios run in a subprocess against the fake libcuda (tests/fake_cuda/fake_cuda.cpp), not a GPU.

The fake gives CUDA's semantics on host memory with asynchronous streams (a thread each), so the
cuda-backend code of the multipath engine (streams, events, cross-stream ordering, pointer
detection, peer paths, driver errors) runs for real on a machine without a GPU. Usage:

    LD_LIBRARY_PATH=<dir with fake libcuda.so.1> GLAKE_BACKEND=cuda python fake_cuda_scenarios.py NAME

Prints "OK NAME" and exits 0 on success; an assertion error otherwise.
"""

from __future__ import annotations

import ctypes
import sys
import time

import numpy as np

import glake
from glake import _C
from glake import multipath as mp

KIB, MIB = 1 << 10, 1 << 20
fake = ctypes.CDLL("libcuda.so.1")
fake.fake_alloc_device.restype = ctypes.c_void_p
fake.fake_alloc_device.argtypes = [ctypes.c_int, ctypes.c_size_t]
fake.fake_alloc_pinned.restype = ctypes.c_void_p
fake.fake_alloc_pinned.argtypes = [ctypes.c_size_t]
fake.fake_free.argtypes = [ctypes.c_void_p]
fake.fake_stream_create.restype = ctypes.c_void_p
fake.fake_stream_create.argtypes = [ctypes.c_int]
fake.fake_stream_destroy.argtypes = [ctypes.c_void_p]
fake.fake_stream_sleep.argtypes = [ctypes.c_void_p, ctypes.c_uint]
fake.fake_stream_memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
fake.fake_stream_sync.argtypes = [ctypes.c_void_p]
fake.fake_legacy_sync.argtypes = [ctypes.c_int]
CONF = dict(chunk_bytes=256 * KIB, buffers=3, threads=3, streams=2, small_copy_bytes=0, piece_bytes=64 * KIB)


class Mem:
    """A fake device / pinned allocation, or pageable numpy memory, with a numpy view of its bytes."""

    def __init__(self, kind: str, n: int, device: int = 0, fill=None, seed: int = 0):
        self.kind, self.n = kind, n
        if kind == "pageable":
            self._arr = np.empty(max(n, 1), np.uint8)
            self.ptr = self._arr.ctypes.data
        else:
            self.ptr = fake.fake_alloc_device(device, n) if kind == "device" else fake.fake_alloc_pinned(n)
            assert self.ptr
        self.view = np.ctypeslib.as_array((ctypes.c_uint8 * max(n, 1)).from_address(self.ptr))[:n]
        if fill == "random":
            self.view[:] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
        elif fill is not None:
            self.view[:] = fill

    def free(self):
        if self.kind != "pageable":
            assert fake.fake_free(self.ptr) == 0


def roundtrip_pageable():
    with mp.Engine("cuda", 0, **CONF) as e:
        for i, n in enumerate([1, 4097, 256 * KIB - 1, 256 * KIB + 1, 3 * MIB + 7]):
            for off in (0, 3):
                src = Mem("pageable", n + off, fill="random", seed=i)
                dev = Mem("device", n + 16, fill=0xA5)
                back = Mem("pageable", n + off, fill=0x5A)
                assert e.plan(dev.ptr + 5, src.ptr + off, n, "auto") == "staged_h2d"
                e.copy_raw(dev.ptr + 5, src.ptr + off, n, "h2d")
                assert np.array_equal(dev.view[5:5 + n], src.view[off:])
                assert (dev.view[:5] == 0xA5).all() and (dev.view[5 + n:] == 0xA5).all()
                e.copy_raw(back.ptr + off, dev.ptr + 5, n, "d2h")
                assert np.array_equal(back.view[off:], src.view[off:])
                dev.free()
        s = e.stats()
        assert s["calls.staged_h2d"] == 10 and s["calls.staged_d2h"] == 10 and s["errors"] == 0


def roundtrip_pinned_plain_and_split():
    for conf, path in ((dict(CONF), "plain"), (dict(CONF, pinned_streams=3, pinned_split_min_bytes=MIB), "pinned_split")):
        with mp.Engine("cuda", 0, **conf) as e:
            n = 5 * MIB + 3
            src, dev, back = Mem("pinned", n, fill="random", seed=1), Mem("device", n, fill=0), Mem("pinned", n, fill=0)
            assert e.plan(dev.ptr, src.ptr, n, "auto") == path
            e.copy_raw(dev.ptr, src.ptr, n, "auto")
            e.copy_raw(back.ptr, dev.ptr, n, "device_to_pinned")
            assert np.array_equal(back.view, src.view)
            assert e.stats()[f"calls.{path}"] == 2
            for m in (src, dev, back):
                m.free()


def h2d_ordered_on_caller_stream():
    """Earlier work on the caller's stream sees the old bytes, later work the new ones, for every path."""
    confs = [("staged_h2d", "pageable", CONF), ("plain", "pinned", CONF),
             ("pinned_split", "pinned", dict(CONF, pinned_streams=3, pinned_split_min_bytes=MIB))]
    for path, host_kind, conf in confs:
        with mp.Engine("cuda", 0, **conf) as e:
            n = 4 * MIB + 5
            src = Mem(host_kind, n, fill="random", seed=2)
            dev, old, new = Mem("device", n, fill=0), Mem("device", n, fill=7), Mem("device", n, fill=7)
            caller = fake.fake_stream_create(0)
            fake.fake_stream_sleep(caller, 200_000)                       # 0.2 s of "kernel"
            fake.fake_stream_memcpy(caller, old.ptr, dev.ptr, n)          # reads dev before the copy
            assert e.plan(dev.ptr, src.ptr, n, "auto") == path
            e.copy_raw(dev.ptr, src.ptr, n, "auto", caller, non_blocking=True)
            fake.fake_stream_memcpy(caller, new.ptr, dev.ptr, n)          # reads dev after the copy
            fake.fake_stream_sync(caller)
            assert (old.view == 0).all(), f"{path}: the copy overtook earlier work on the caller's stream"
            assert np.array_equal(new.view, src.view), f"{path}: later work on the stream missed the data"
            fake.fake_stream_destroy(caller)
            for m in (src, dev, old, new):
                m.free()


def d2h_waits_for_caller_stream():
    for path, host_kind, conf in (("staged_d2h", "pageable", CONF), ("plain", "pinned", CONF),
                                  ("pinned_split", "pinned", dict(CONF, pinned_streams=2, pinned_split_min_bytes=MIB))):
        with mp.Engine("cuda", 0, **conf) as e:
            n = 3 * MIB + 1
            dev, nines, ones = Mem("device", n, fill=0), Mem("device", n, fill=9), Mem("device", n, fill=1)
            out = Mem(host_kind, n, fill=0)
            caller = fake.fake_stream_create(0)
            fake.fake_stream_sleep(caller, 200_000)
            fake.fake_stream_memcpy(caller, dev.ptr, nines.ptr, n)  # the "kernel" producing the data
            assert e.plan(out.ptr, dev.ptr, n, "auto") == path
            e.copy_raw(out.ptr, dev.ptr, n, "d2h", caller, non_blocking=True)
            fake.fake_stream_memcpy(caller, dev.ptr, ones.ptr, n)   # later work must not leak in
            if host_kind == "pinned":
                fake.fake_stream_sync(caller)  # pinned + non_blocking: complete once the stream gets there
            assert (out.view == 9).all(), f"{path}: read the source before earlier work wrote it, or after later work"
            fake.fake_stream_sync(caller)
            fake.fake_stream_destroy(caller)
            for m in (dev, nines, ones, out):
                m.free()


def non_blocking_pageable_source_reusable():
    with mp.Engine("cuda", 0, **CONF) as e:
        n = 2 * MIB + 3
        src, dev = Mem("pageable", n, fill="random", seed=3), Mem("device", n, fill=0)
        expect = src.view.copy()
        caller = fake.fake_stream_create(0)
        fake.fake_stream_sleep(caller, 200_000)
        e.copy_raw(dev.ptr, src.ptr, n, "h2d", caller, non_blocking=True)
        src.view[:] = 0
        fake.fake_stream_sync(caller)
        assert np.array_equal(dev.view, expect)
        fake.fake_stream_destroy(caller)
        dev.free()


def blocking_returns_after_landing():
    with mp.Engine("cuda", 0, **CONF) as e:
        n = 2 * MIB
        src, dev = Mem("pageable", n, fill="random", seed=4), Mem("device", n, fill=0)
        caller = fake.fake_stream_create(0)
        fake.fake_stream_sleep(caller, 150_000)
        t0 = time.perf_counter()
        e.copy_raw(dev.ptr, src.ptr, n, "h2d", caller, non_blocking=False)
        assert time.perf_counter() - t0 >= 0.14, "a blocking copy returned before the stream reached it"
        assert np.array_equal(dev.view, src.view)
        fake.fake_stream_destroy(caller)
        dev.free()


def pointer_kinds_and_errors():
    dev0, dev1 = Mem("device", MIB, 0, fill=0), Mem("device", MIB, 1, fill=0)
    pin, pg = Mem("pinned", MIB, fill=1), Mem("pageable", MIB, fill=2)
    assert _C.multipath_pointer_kind(dev1.ptr + 10, 0, "cuda") == ("device", 1)
    assert _C.multipath_pointer_kind(pin.ptr, 0, "cuda")[0] == "pinned"
    assert _C.multipath_pointer_kind(pg.ptr, 0, "cuda")[0] == "pageable"
    with mp.Engine("cuda", 0, **CONF) as e:
        cases = [
            (lambda: e.copy_raw(dev0.ptr, pg.ptr, MIB, "pinned_to_device"), "not pinned"),
            (lambda: e.copy_raw(dev1.ptr, pg.ptr, MIB, "h2d"), "device 1"),
            (lambda: e.copy_raw(pg.ptr, pin.ptr, MIB, "h2d"), "not device memory"),
            (lambda: e.copy_raw(dev0.ptr, dev1.ptr, MIB, "h2d"), "not host memory"),
            (lambda: e.copy_raw(pg.ptr, pin.ptr, MIB, "auto"), "host memory"),
            (lambda: e.copy_raw(dev0.ptr + 8, dev0.ptr, 100, "d2d"), "overlapping"),
        ]
        for call, match in cases:
            try:
                call()
            except glake.InvalidArgumentError as err:
                assert match in str(err), (match, str(err))
            else:
                raise AssertionError(f"no error for {match}")
        assert (dev0.view == 0).all() and (pg.view == 2).all() and (pin.view == 1).all()
        assert e.stats()["calls"] == 0
    for m in (dev0, dev1, pin):
        m.free()


def driver_error_in_pipeline():
    """A copy running past the end of a device allocation fails in a lane; the engine stays usable."""
    with mp.Engine("cuda", 0, **CONF) as e:
        n = 2 * MIB
        src, dev = Mem("pageable", n, fill="random", seed=5), Mem("device", n - 4096, fill=0)
        for kind in ("h2d", "d2h"):
            try:
                if kind == "h2d":
                    e.copy_raw(dev.ptr, src.ptr, n, kind)
                else:
                    e.copy_raw(src.ptr, dev.ptr, n, kind)
            except glake.GlakeError as err:
                assert "cuMemcpyAsync" in str(err) and "CUDA_ERROR_INVALID_VALUE" in str(err), str(err)
            else:
                raise AssertionError("the out-of-range copy did not fail")
        assert e.stats()["errors"] == 2
        ok_src = Mem("pageable", n - 4096, fill="random", seed=6)
        e.copy_raw(dev.ptr, ok_src.ptr, n - 4096, "h2d")
        assert np.array_equal(dev.view, ok_src.view)
        dev.free()


def peer_paths():
    before = fake.fake_live_allocations()
    with mp.Engine("cuda", 0, **CONF, peers=True, peer_min_bytes=MIB, peer_chunk_bytes=256 * KIB) as e:
        assert e.peer_devices == [1], e.peers_skipped()
        assert fake.fake_peer_enabled(0, 1) and fake.fake_peer_enabled(1, 0)
        n = 3 * MIB + 5
        src, dev, back = Mem("pinned", n, fill="random", seed=7), Mem("device", n, fill=0), Mem("pinned", n, fill=0)
        old = Mem("device", n, fill=3)
        caller = fake.fake_stream_create(0)
        fake.fake_stream_sleep(caller, 150_000)
        fake.fake_stream_memcpy(caller, old.ptr, dev.ptr, n)
        assert e.plan(dev.ptr, src.ptr, n, "auto") == "peer"
        e.copy_raw(dev.ptr, src.ptr, n, "auto", caller, non_blocking=True)
        e.copy_raw(back.ptr, dev.ptr, n, "auto", caller, non_blocking=True)
        fake.fake_stream_sync(caller)
        assert (old.view == 0).all(), "the peer path overtook earlier work on the caller's stream"
        assert np.array_equal(back.view, src.view)
        assert np.array_equal(dev.view, src.view)
        e.copy_raw(back.ptr, dev.ptr, MIB - 1, "auto", caller)  # below peer_min_bytes: plain
        s = e.stats()
        assert s["calls.peer"] == 2 and s["calls.plain"] == 1, s
        fake.fake_stream_destroy(caller)
        for m in (src, dev, back, old):
            m.free()
    assert fake.fake_live_allocations() == before, "peer buffers or staging leaked"


def peers_need_access():
    import os
    assert os.environ.get("FAKE_CUDA_DEVICES") == "1"
    with mp.Engine("cuda", 0, peers=True) as e:
        assert e.peer_devices == []
    with mp.Engine("cuda", 0, peers=True, peer_devices=[0, 3]) as e:
        assert e.peer_devices == [] and e.peers_skipped() == ["device 3: does not exist"]


def close_frees_everything():
    base = fake.fake_live_allocations()
    e = mp.Engine("cuda", 0, **CONF)
    n = MIB
    src, dev = Mem("pageable", n, fill="random", seed=8), Mem("device", n, fill=0)
    e.copy_raw(dev.ptr, src.ptr, n, "h2d", non_blocking=True)
    assert fake.fake_live_allocations() == base + 1 + CONF["buffers"]  # dev + staging buffers
    e.close()  # the caller's stream may still be due to wait on the engine's (now destroyed) events
    assert fake.fake_live_allocations() == base + 1
    fake.fake_legacy_sync(0)  # ... and reaches those waits now
    assert np.array_equal(dev.view, src.view)
    dev.free()


def concurrent_threads():
    import threading
    with mp.Engine("cuda", 0, **CONF) as e:
        errors, n = [], MIB + 17

        def worker(i):
            try:
                src, dev, back = Mem("pageable", n, fill="random", seed=i), Mem("device", n, fill=0), Mem("pageable", n, fill=0)
                for _ in range(3):
                    e.copy_raw(dev.ptr, src.ptr, n, "h2d", non_blocking=True)
                    e.copy_raw(back.ptr, dev.ptr, n, "d2h")
                    assert np.array_equal(back.view, src.view)
                dev.free()
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors


if __name__ == "__main__":
    name = sys.argv[1]
    assert _C.backend_name() == "cuda", "run with GLAKE_BACKEND=cuda and the fake libcuda on LD_LIBRARY_PATH"
    globals()[name]()
    print(f"OK {name}")
