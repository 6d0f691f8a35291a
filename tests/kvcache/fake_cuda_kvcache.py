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


if __name__ == "__main__":
    name = sys.argv[1]
    assert _C.backend_name() == "cuda", "run with GLAKE_BACKEND=cuda and the fake libcuda on LD_LIBRARY_PATH"
    globals()[name]()
    print(f"OK {name}")
