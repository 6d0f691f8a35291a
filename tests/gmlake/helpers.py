"""Helpers for allocator tests on the host backend: raw memory views and content canaries."""

from __future__ import annotations

import ctypes

import numpy as np

MiB = 1 << 20


def view(ptr: int, n: int) -> np.ndarray:
    """A numpy uint8 view of n bytes at a host-backend address."""
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
