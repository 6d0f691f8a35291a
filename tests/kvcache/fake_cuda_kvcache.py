"""Scenarios of the KV-cache manager on the cuda backend, run against the fake libcuda (no GPU).

glake._C.KvManager directly (KVCache's views need a CUDA torch): the fake's device memory is host
memory at the same addresses, so the bytes are read and written through ctypes. Usage:

    LD_LIBRARY_PATH=<dir with fake libcuda.so.1> GLAKE_BACKEND=cuda python fake_cuda_kvcache.py NAME

Prints "OK NAME" and exits 0 on success; an assertion error otherwise.
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

import glake
import glake.multipath
from glake import _C

MiB = 1 << 20
ROW = 128 << 10  # 16 tokens per 2 MiB chunk
fake = ctypes.CDLL("libcuda.so.1")


def view(ptr: int, n: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))


def tokens(m, slot: int, start: int, end: int) -> np.ndarray:
    return view(m.range.ptr + slot * m.slot_bytes + start * ROW, (end - start) * ROW)


def pattern(n: int, seed: int) -> np.ndarray:
    return (np.arange(n, dtype=np.uint32) * 2654435761 + seed * 97).astype(np.uint8)


def suspend_resume_retry():
    """A resume the device cannot serve raises OutOfMemoryError, holds no VMM handle and stays
    suspended; a later one maps a fork's prefix as one chunk in both slots again and restores the bytes."""
    handles = fake.fake_live_vmm_handles()
    m = _C.KvManager(4, 64, ROW, None, 0, 0, "cuda")
    a = m.allocate()
    m.reserve(a, 40)  # 3 chunks
    tokens(m, a, 0, 40)[:] = pattern(40 * ROW, 1)
    f = m.fork(a, 32)[0]  # chunks 0 and 1 shared, no tail to copy
    m.reserve(f, 48)
    tokens(m, f, 32, 48)[:] = pattern(16 * ROW, 2)
    assert m.stats()["chunks_shared"] == 2 and fake.fake_live_vmm_handles() == handles + 4
    engine = glake.multipath.engine("cuda", 0)
    m.suspend(False, engine.handle)
    assert m.suspended and fake.fake_live_vmm_handles() == handles, "every chunk went back to the driver"
    assert m.stats()["suspended_host_bytes"] == 4 * 2 * MiB
    os.environ["FAKE_CUDA_MAX_CHUNK"] = str(MiB)  # no 2 MiB chunk to be had now
    try:
        m.resume(engine.handle)
        raise AssertionError("resume succeeded without memory")
    except glake.OutOfMemoryError as e:
        assert "still suspended" in str(e), e
    finally:
        del os.environ["FAKE_CUDA_MAX_CHUNK"]
    assert m.suspended and fake.fake_live_vmm_handles() == handles and m.check_invariants() == ""
    try:
        m.reserve(a, 41)
        raise AssertionError("reserve worked while suspended")
    except glake.GlakeError as e:
        assert "suspended" in str(e), e
    m.resume()  # the driver's memcpy this time
    assert not m.suspended and m.check_invariants() == ""
    assert m.chunk_ids(f)[:2] == m.chunk_ids(a)[:2] and sorted(m.chunk_refs().values()) == [1, 1, 2, 2]
    assert np.array_equal(tokens(m, a, 0, 40), pattern(40 * ROW, 1))
    assert np.array_equal(tokens(m, f, 0, 32), pattern(40 * ROW, 1)[:32 * ROW])
    assert np.array_equal(tokens(m, f, 32, 48), pattern(16 * ROW, 2))
    m.release(f)
    m.release(a)
    m.close()
    assert fake.fake_live_vmm_handles() == handles and fake.fake_violations() == 0


def lengths_published_in_stream_order():
    """Every publish_lengths is seen, in order, by the work queued after it on its stream: the host
    writes each publish into a staging buffer, so a buffer reused while its copy still waits in a
    lagging stream would hand a later step's lengths to an earlier kernel. Two streams whose copies
    lag (FAKE_CUDA_COPY_DELAY_US: 2 ms a copy, the host's step is far shorter), switching every 7 steps;
    150 publishes wrap the staging ring (64) twice."""
    os.environ["FAKE_CUDA_COPY_DELAY_US"] = "2000"  # read when each stream is made
    m = _C.KvManager(8, 512, 4096, None, 0, 0, "cuda")  # 512 tokens a chunk: no mapping after the first step
    slots = [m.allocate() for _ in range(8)]
    streams, dst = [ctypes.c_void_p(), ctypes.c_void_p()], [ctypes.c_uint64(), ctypes.c_uint64()]
    steps, n = 150, 8 * 4
    seen = ctypes.c_uint64()
    for k in range(2):
        assert fake.cuStreamCreate(ctypes.byref(streams[k]), 0) == 0
        assert fake.cuMemAlloc_v2(ctypes.byref(dst[k]), n) == 0
    assert fake.cuMemAlloc_v2(ctypes.byref(seen), steps * n) == 0
    for step in range(steps):
        k = (step // 7) % 2
        m.reserve_batch(np.asarray(slots, np.int64), np.asarray([step + 1 + i for i in range(8)], np.int64))
        m.publish_lengths(dst[k].value, streams[k].value)
        # what a kernel queued next on this stream reads: a copy of the lengths, in the stream's order
        assert fake.cuMemcpyAsync(ctypes.c_uint64(seen.value + step * n), dst[k], ctypes.c_size_t(n), streams[k]) == 0
    # the host ran a whole ring ahead of a stream: a staging buffer was due while its copy still waited
    assert m.stats()["lengths_waits"] > 0, "the copies never lagged a ring behind: the test tests nothing"
    assert fake.cuCtxSynchronize() == 0
    got = np.ctypeslib.as_array((ctypes.c_int32 * (steps * 8)).from_address(seen.value)).reshape(steps, 8)
    want = np.arange(1, steps + 1)[:, None] + np.arange(8)[None, :]
    bad = np.nonzero((got != want).any(axis=1))[0]
    assert bad.size == 0, f"steps {bad[:10].tolist()} saw {got[bad[0]].tolist()}, not {want[bad[0]].tolist()}"
    for k in range(2):
        fake.cuMemFree_v2(dst[k])
        fake.cuStreamDestroy_v2(streams[k])
    fake.cuMemFree_v2(seen)
    m.close()
    assert fake.fake_violations() == 0


if __name__ == "__main__":
    name = sys.argv[1]
    assert _C.backend_name() == "cuda", "run with GLAKE_BACKEND=cuda and the fake libcuda on LD_LIBRARY_PATH"
    globals()[name]()
    print(f"OK {name}")
