"""Shared chunks (whole_chunks / share_chunk, gmlake/shared_chunks.cpp: what the shim's dedup uses) on
the host backend and the fake libcuda: another chunk mapped read-only in place of an allocation's own
reads as that chunk, the own one is released, free() maps private writable chunks back before the
cache can reuse the memory, and suspend/resume keeps shared chunks without copying them."""

from __future__ import annotations

import pytest

import glake
from glake import _C, core
from glake.errors import InvalidArgumentError
from tests.gmlake.helpers import BACKEND, MiB, check, fill


def physical() -> int:
    return _C.stats(BACKEND)["physical_bytes.current"]


def new_allocator():
    """A private allocator's core object (whole_chunks and share_chunk are not in glake.Allocator's API)."""
    return glake.Allocator(backend=BACKEND, chunk_bytes="2MiB")._impl


def twin_of(ptr: int, size: int) -> "core.PhysChunk":
    """A new chunk holding the bytes at [ptr, ptr + size): another process's identical chunk."""
    c = core.PhysChunk(size, 0, BACKEND)
    r = core.VirtualRange(size, 0, BACKEND)
    r.map(0, c)
    core.memcpy(r.ptr, ptr, size, 0, BACKEND)
    r.free()
    return c


def test_whole_chunks_are_those_the_range_covers_whole():
    alloc = new_allocator()
    p = alloc.malloc(8 * MiB)
    chunks = alloc.whole_chunks(p, 8 * MiB)
    assert [(at - p, n, shared) for at, n, shared in chunks] == [(i * 2 * MiB, 2 * MiB, False) for i in range(4)]
    assert [at - p for at, _, _ in alloc.whole_chunks(p + 1, 6 * MiB)] == [2 * MiB, 4 * MiB]  # partial ends left out
    with pytest.raises(InvalidArgumentError, match="not inside one live allocation"):
        alloc.whole_chunks(p, 9 * MiB)
    small = alloc.malloc(4096)
    with pytest.raises(InvalidArgumentError, match="small one"):
        alloc.whole_chunks(small, 4096)
    alloc.free(p)
    alloc.free(small)


def test_a_shared_chunk_reads_as_theirs_and_ours_is_released():
    alloc = new_allocator()
    p = alloc.malloc(8 * MiB)
    fill(p, 8 * MiB, 3)
    at = p + 2 * MiB
    theirs = twin_of(at, 2 * MiB)
    before = physical()
    alloc.share_chunk(at, theirs)
    del theirs  # the mapping keeps it, as an imported handle whose fd was closed
    assert physical() == before - 2 * MiB  # ours went back to the backend
    alloc.share_chunk(p, None)  # ours made read-only in place (a canonical chunk)
    assert check(p, 8 * MiB, 3)
    st = alloc.stats()
    assert st["shared_bytes"] == 4 * MiB and st["shared_imported_bytes"] == 2 * MiB
    assert [s for _, _, s in alloc.whole_chunks(p, 8 * MiB)] == [True, True, False, False]
    with pytest.raises(InvalidArgumentError, match="shared already"):
        alloc.share_chunk(at, None)
    with pytest.raises(InvalidArgumentError, match="not the start of a chunk"):
        alloc.share_chunk(p + 4096 + 4 * MiB, None)
    alloc.free(p)
    st = alloc.stats()
    assert st["shared_bytes"] == 0 and st["shared_imported_bytes"] == 0
    q = alloc.malloc(8 * MiB)  # the same memory again: private and writable
    assert q == p
    fill(q, 8 * MiB, 4)
    assert check(q, 8 * MiB, 4)
    alloc.free(q)


def test_record_stream_is_refused_on_an_allocation_with_shared_chunks():
    alloc = new_allocator()
    p = alloc.malloc(4 * MiB)
    alloc.share_chunk(p, None)
    with pytest.raises(InvalidArgumentError, match="shared chunks"):
        alloc.record_stream(p, 7)
    alloc.free(p)


def test_suspend_keeps_shared_chunks_without_copying_them():
    alloc = new_allocator()
    p = alloc.malloc(8 * MiB)
    fill(p, 8 * MiB, 5)
    theirs = twin_of(p + 4 * MiB, 2 * MiB)
    alloc.share_chunk(p + 4 * MiB, theirs)
    alloc.share_chunk(p, None)
    alloc.suspend(None, [])
    assert alloc.stats()["suspended_host_bytes"] == 4 * MiB  # the two private chunks; the shared two are kept
    alloc.resume(None)
    assert check(p, 8 * MiB, 5)
    assert [s for _, _, s in alloc.whole_chunks(p, 8 * MiB)] == [True, False, True, False]
    alloc.free(p)
    theirs.release()


def test_chunks_an_idle_stitch_still_maps_are_not_shared():
    """An idle stitched range keeps the chunks of blocks that are allocated again: sharing one of them
    would leave it writable (and reusable) through the stitch, so it is left out and refused."""
    alloc = new_allocator()
    blocks = [alloc.malloc(4 * MiB) for _ in range(16)]
    for p in blocks[::2]:
        alloc.free(p)
    big = alloc.malloc(32 * MiB)  # stitched over the 8 free blocks
    assert alloc.stats()["num_stitches"] == 1
    alloc.free(big)               # held, then reused shrunk: its tail's blocks go back to the pool
    half = alloc.malloc(16 * MiB)
    rest = [alloc.malloc(4 * MiB) for _ in range(4)]
    stitched = {at for p in rest for at, _, _ in alloc.whole_chunks(p, 4 * MiB)}
    every = {p + o for p in rest for o in (0, 2 * MiB)}
    assert stitched < every  # some chunks of these blocks are mapped by the stitch too: left out
    for at in every - stitched:
        with pytest.raises(InvalidArgumentError, match="stitched range maps that chunk"):
            alloc.share_chunk(at, None)
    for at in stitched:
        alloc.share_chunk(at, None)
    for p in rest + [half] + blocks[1::2]:
        alloc.free(p)
    assert alloc.stats()["shared_bytes"] == 0
    again = alloc.malloc(32 * MiB)
    fill(again, 32 * MiB, 8)  # whatever it reuses is writable
    assert check(again, 32 * MiB, 8)
    alloc.free(again)


def test_free_while_suspended_drops_the_kept_shared_chunks():
    alloc = new_allocator()
    p = alloc.malloc(8 * MiB)
    fill(p, 8 * MiB, 6)
    theirs = twin_of(p, 2 * MiB)
    alloc.share_chunk(p, theirs)
    alloc.share_chunk(p + 2 * MiB, None)
    keep = alloc.malloc(4 * MiB)
    fill(keep, 4 * MiB, 2)
    alloc.suspend(None, [])
    alloc.free(p)  # a shim program's cuMemFree while `glake suspend PID` holds it
    st = alloc.stats()
    assert st["shared_bytes"] == 0 and st["shared_imported_bytes"] == 0
    alloc.resume(None)
    assert check(keep, 4 * MiB, 2)
    q = alloc.malloc(8 * MiB)  # the freed memory comes back private and writable
    fill(q, 8 * MiB, 1)
    assert check(q, 8 * MiB, 1)
    for x in (q, keep):
        alloc.free(x)
    theirs.release()
