"""Helpers for the allocator unit tests: the backend they run on, raw memory views, content canaries."""

from __future__ import annotations

import ctypes
import os

import numpy as np

MiB = 1 << 20
# The host backend by default. tests/test_fake_cuda_backend.py runs the same tests on the cuda backend
# against the fake libcuda (GLAKE_TEST_FAKE_CUDA=1), whose device memory is host memory, so the views
# below work there too. (On a real GPU the allocator is tested through torch: test_torch_gpu.py.)
ON_FAKE_CUDA = os.environ.get("GLAKE_TEST_FAKE_CUDA") == "1"
BACKEND = "cuda" if ON_FAKE_CUDA else "host"
_streams: dict = {}


def stream(i: int) -> int:
    """Stream number i (0: the default stream). Any int names a stream on the host backend; on the
    fake libcuda, a real (fake) CUstream, made once per number."""
    if i == 0 or not ON_FAKE_CUDA:
        return i
    if i not in _streams:
        fake = ctypes.CDLL("libcuda.so.1")
        fake.fake_stream_create.restype = ctypes.c_void_p
        fake.fake_stream_create.argtypes = [ctypes.c_int]
        _streams[i] = fake.fake_stream_create(0)
    return _streams[i]


def view(ptr: int, n: int) -> np.ndarray:
    """A numpy uint8 view of n bytes at an address of host memory (host backend, or the fake libcuda)."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))


def fill(ptr: int, n: int, seed: int) -> None:
    v = view(ptr, n)
    v[:] = (np.arange(n, dtype=np.uint32) * 2654435761 + seed * 97).astype(np.uint8)


def check(ptr: int, n: int, seed: int) -> bool:
    return bool(np.array_equal(view(ptr, n), (np.arange(n, dtype=np.uint32) * 2654435761 + seed * 97).astype(np.uint8)))


def rounded(size: int, small_size: int = MiB) -> int:
    if size <= small_size:
        return (size + 511) // 512 * 512
    return (size + 2 * MiB - 1) // (2 * MiB) * (2 * MiB)
