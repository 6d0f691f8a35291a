"""The VMM core on every backend: chunks, ranges, pools, sharing, counters and bad input."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import textwrap

import pytest

import glake
from glake import core

MiB = 1 << 20


@pytest.fixture
def g(backend: str) -> int:
    return core.granularity(backend)


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


def test_granularity_is_2mib_on_host():
    assert core.granularity("host") == 2 * MiB


def test_chunk_lifecycle_updates_counters(backend, g):
    s0 = core.stats(backend)
    c = core.PhysChunk(backend=backend)
    assert c.size == g and c.backend == backend and c.mappings == 0 and not c.released
    s1 = core.stats(backend)
    assert s1["chunks_live"] == s0["chunks_live"] + 1
    assert s1["physical_bytes.current"] == s0["physical_bytes.current"] + g
    assert s1["calls.create"] == s0["calls.create"] + 1
    c.release()
    assert c.released
    s2 = core.stats(backend)
    assert s2["chunks_live"] == s0["chunks_live"]
    assert s2["chunks_released"] == s0["chunks_released"] + 1


def test_write_read_through_mapping(backend, g):
    c = core.PhysChunk(2 * g, backend=backend)
    with core.VirtualRange(4 * g, backend=backend) as r:
        r.map(g, c)
        data = pattern(2 * g, 7)
        core.write(r.ptr + g, data, backend=backend)
        assert core.read(r.ptr + g, 2 * g, backend=backend) == data
        assert r.mapped_bytes == 2 * g
        assert r.chunk_at(g).id == c.id and r.chunk_at(3 * g - 1).id == c.id
        assert r.chunk_at(0) is None and r.chunk_at(3 * g) is None
        assert [(o, ch.id) for o, ch in r.mappings()] == [(g, c.id)]
        assert c.mappings == 1
    assert c.mappings == 0


def test_one_chunk_at_two_addresses_shows_same_bytes(backend, g):
    c = core.PhysChunk(backend=backend)
    with core.VirtualRange(2 * g, backend=backend) as r1, core.VirtualRange(g, backend=backend) as r2:
        r1.map(g, c)
        r2.map(0, c)
        assert c.mappings == 2
        core.write(r1.ptr + g + 100, b"glake shares pages", backend=backend)
        assert core.read(r2.ptr + 100, 18, backend=backend) == b"glake shares pages"
        core.write(r2.ptr, b"\x01\x02\x03", backend=backend)
        assert core.read(r1.ptr + g, 3, backend=backend) == b"\x01\x02\x03"


def test_host_range_is_a_numpy_array():
    np = pytest.importorskip("numpy")
    g = core.granularity("host")
    c = core.PhysChunk(backend="host")
    with core.VirtualRange(2 * g, backend="host") as r:
        r.map(0, c)
        r.map(g, c)
        a = np.asarray(r)
        assert a.shape == (2 * g,) and a.dtype == np.uint8
        a[:g] = np.arange(g, dtype=np.uint64).astype(np.uint8)
        assert np.array_equal(a[:g], a[g:])
        assert not hasattr(r, "__cuda_array_interface__")
        del a


def test_map_many_and_unmap_return_chunks(backend, g):
    chunks = [core.PhysChunk(backend=backend) for _ in range(3)]
    with core.VirtualRange(3 * g, backend=backend) as r:
        maps_before = core.stats(backend)["calls.map"]
        r.map_many(0, chunks)
        assert core.stats(backend)["calls.map"] == maps_before + 3
        assert [o for o, _ in r.mappings()] == [0, g, 2 * g]
        core.write(r.ptr + 3 * g - 4, b"tail", backend=backend)
        back = r.unmap(2 * g)
        assert back.id == chunks[2].id and r.mapped_bytes == 2 * g
        with core.VirtualRange(g, backend=backend) as r2:
            r2.map(0, back)
            assert core.read(r2.ptr + g - 4, 4, backend=backend) == b"tail"


def test_map_without_access_then_set_access(backend, g):
    c = core.PhysChunk(backend=backend)
    with core.VirtualRange(g, backend=backend) as r:
        r.map(0, c, set_access=False)
        r.set_access(0, g)
        core.write(r.ptr, b"ok", backend=backend)
        assert core.read(r.ptr, 2, backend=backend) == b"ok"


def test_read_only_access_reads_the_bytes_written_through_another_mapping(backend, g):
    c = core.PhysChunk(backend=backend)
    with core.VirtualRange(g, backend=backend) as rw, core.VirtualRange(g, backend=backend) as ro:
        rw.map(0, c)
        core.write(rw.ptr, b"shared", backend=backend)
        ro.map(0, c, set_access=False)
        ro.set_access(0, g, read_only=True)
        assert core.read(ro.ptr, 6, backend=backend) == b"shared"
        core.write(rw.ptr, b"SH", backend=backend)  # the read-write mapping still writes
        assert core.read(ro.ptr, 6, backend=backend) == b"SHared"


def test_host_read_only_mapping_faults_on_write():
    g = core.granularity("host")
    code = ("from glake import core; c = core.PhysChunk(backend='host'); r = core.VirtualRange(%d, backend='host'); "
            "r.map(0, c); r.set_access(0, %d, read_only=True); print(core.read(r.ptr, 1), flush=True); "
            "core.write(r.ptr, b'x')") % (g, g)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # the fake-libcuda suite preloads ASan
    env["ASAN_OPTIONS"] = "handle_segv=0"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == -signal.SIGSEGV and out.stdout.strip() == "b'\\x00'"


def test_chunk_outlives_owner_while_mapped(backend, g):
    c = core.PhysChunk(backend=backend)
    live = core.stats(backend)["chunks_live"]
    r = core.VirtualRange(g, backend=backend)
    r.map(0, c)
    core.write(r.ptr, b"kept", backend=backend)
    del c  # the mapping still holds the physical memory
    assert core.stats(backend)["chunks_live"] == live
    assert core.read(r.ptr, 4, backend=backend) == b"kept"
    r.free()
    assert core.stats(backend)["chunks_live"] == live - 1
    assert r.freed


def _state(r) -> list:
    return [(o, c.id) for o, c in r.mappings()]


def test_bad_mappings_are_refused_and_change_nothing(backend, g):
    c1, c2 = core.PhysChunk(backend=backend), core.PhysChunk(2 * g, backend=backend)
    with core.VirtualRange(4 * g, backend=backend) as r:
        r.map(g, c2)
        core.write(r.ptr + g, b"canary", backend=backend)
        before = _state(r)
        cases = [
            (lambda: r.map(4 * g, c1), "outside the range"),
            (lambda: r.map(3 * g, c2), "outside the range"),
            (lambda: r.map(100 * g, c1), "outside the range"),
            (lambda: r.map(g, c1), "overlaps the chunk already mapped at offset"),
            (lambda: r.map(2 * g, c1), "overlaps the chunk already mapped at offset"),
            (lambda: r.map(0, c2), "overlaps the chunk already mapped at offset"),
            (lambda: r.map(4096, c1), "not a multiple of the granularity"),
            (lambda: r.map(-g, c1), "must be non-negative"),
            (lambda: r.map_many(0, [c1, c1]), "overlaps"),
            (lambda: r.unmap(0), "no chunk is mapped at that offset"),
            (lambda: r.unmap(2 * g), "no chunk is mapped at that offset"),
            (lambda: r.set_access(0, g), "is not mapped"),
            (lambda: r.set_access(g, 0), "must be positive"),
        ]
        for call, message in cases:
            with pytest.raises(glake.InvalidArgumentError, match=message):
                call()
            assert _state(r) == before
        assert core.read(r.ptr + g, 6, backend=backend) == b"canary"
        assert c1.mappings == 0


def test_bad_sizes_are_refused(backend, g):
    for size in (0, -1, -g):
        with pytest.raises(glake.InvalidArgumentError, match="must be positive"):
            core.PhysChunk(size, backend=backend)
        with pytest.raises(glake.InvalidArgumentError, match="must be positive"):
            core.VirtualRange(size, backend=backend)
    with pytest.raises(glake.InvalidArgumentError, match="multiple of the granularity"):
        core.PhysChunk(g + 4096, backend=backend)
    with pytest.raises(glake.InvalidArgumentError, match="multiple of the granularity"):
        core.VirtualRange(g // 2, backend=backend)
    with pytest.raises(glake.InvalidArgumentError, match="power of two"):
        core.VirtualRange(g, backend=backend, alignment=3 * g)
    with pytest.raises(glake.InvalidArgumentError, match="device 7 does not exist"):
        core.PhysChunk(backend=backend, device=7)


def test_release_rules(backend, g):
    c = core.PhysChunk(backend=backend)
    with core.VirtualRange(g, backend=backend) as r:
        r.map(0, c)
        with pytest.raises(glake.InvalidArgumentError, match="still mapped at 1 place"):
            c.release()
        assert c.mappings == 1 and not c.released
        r.unmap(0)
    c.release()
    with pytest.raises(glake.InvalidArgumentError, match="double release"):
        c.release()
    with pytest.raises(glake.InvalidArgumentError, match="was released"):
        c.size
    with core.VirtualRange(g, backend=backend) as r:
        with pytest.raises(glake.InvalidArgumentError, match="released"):
            r.map(0, c)


def test_freed_range_refuses_work(backend, g):
    r = core.VirtualRange(g, backend=backend)
    r.free()
    r.free()  # idempotent
    with pytest.raises(glake.InvalidArgumentError, match="was freed"):
        r.map(0, core.PhysChunk(backend=backend))


def test_import_rejects_what_is_not_a_chunk(backend, g):
    with tempfile.TemporaryFile() as f:
        f.truncate(g)
        with pytest.raises(glake.GlakeError):
            core.PhysChunk.import_fd(f.fileno(), g, backend=backend)
    rd, wr = os.pipe()
    try:
        with pytest.raises(glake.GlakeError):
            core.PhysChunk.import_fd(rd, g, backend=backend)
    finally:
        os.close(rd)
        os.close(wr)
    with pytest.raises(glake.InvalidArgumentError, match="not a file descriptor"):
        core.PhysChunk.import_fd(-1, g, backend=backend)


def test_host_import_messages_are_precise():
    g = core.granularity("host")
    with tempfile.TemporaryFile() as f:
        with pytest.raises(glake.InvalidArgumentError, match="not a glake chunk"):
            core.PhysChunk.import_fd(f.fileno(), g, backend="host")
    c = core.PhysChunk(backend="host")
    fd = c.export_fd()
    try:
        with pytest.raises(glake.InvalidArgumentError, match="holds 2097152 bytes"):
            core.PhysChunk.import_fd(fd, 2 * g, backend="host")
    finally:
        os.close(fd)


def test_export_import_in_process(backend, g):
    c = core.PhysChunk(backend=backend)
    fd = c.export_fd()
    try:
        twin = core.PhysChunk.import_fd(fd, g, backend=backend)
    finally:
        os.close(fd)
    with core.VirtualRange(g, backend=backend) as r1, core.VirtualRange(g, backend=backend) as r2:
        r1.map(0, c)
        r2.map(0, twin)
        core.write(r1.ptr, b"twin", backend=backend)
        assert core.read(r2.ptr, 4, backend=backend) == b"twin"


CHILD = textwrap.dedent(
    """
    import socket, sys
    from glake import core
    backend = sys.argv[2]
    sock = socket.socket(fileno=int(sys.argv[1]))
    (chunk,) = core.recv_chunks(sock, backend=backend)
    with core.VirtualRange(chunk.size, backend=backend) as r:
        r.map(0, chunk)
        seen = core.read(r.ptr, 6, backend=backend)
        core.write(r.ptr + 1000, b"written by the child", backend=backend)
    sock.sendall(seen)
    """
)


def test_chunk_shared_with_child_process(backend, g):
    c = core.PhysChunk(backend=backend)
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with parent_sock, child_sock, core.VirtualRange(g, backend=backend) as r:
        r.map(0, c)
        core.write(r.ptr, b"parent", backend=backend)
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(child_sock.fileno()), backend],
                                pass_fds=[child_sock.fileno()], stderr=subprocess.PIPE, text=True)
        child_sock.close()  # the child holds its end: if it dies, recv() sees EOF instead of waiting
        parent_sock.settimeout(120)
        core.send_chunks(parent_sock, [c])
        seen = parent_sock.recv(6)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert seen == b"parent"
        assert core.read(r.ptr + 1000, 20, backend=backend) == b"written by the child"


def test_pool_reuses_and_limits(backend, g):
    pool = core.ChunkPool(limit_bytes=3 * g, backend=backend)
    a, b = pool.acquire(), pool.acquire()
    assert pool.stats()["in_use_chunks"] == 2 and pool.stats()["created"] == 2
    a_id = a.id
    del a  # no owner, no mapping: back to the cache
    st = pool.stats()
    assert st["cached_chunks"] == 1 and st["in_use_chunks"] == 1
    again = pool.acquire()
    assert again.id == a_id and pool.stats()["hits"] == 1
    c = pool.acquire()
    with pytest.raises(glake.OutOfMemoryError, match="limit of 6291456"):
        pool.acquire()
    assert pool.stats()["in_use_chunks"] == 3
    del again, b, c
    assert pool.stats()["cached_chunks"] == 3
    assert pool.trim(g) == 2 * g
    assert pool.stats()["cached_chunks"] == 1 and pool.stats()["released"] == 2


def test_pool_chunk_returns_only_after_unmap(backend, g):
    pool = core.ChunkPool(backend=backend)
    with core.VirtualRange(g, backend=backend) as r:
        c = pool.acquire()
        r.map(0, c)
        del c  # dropping the owner's reference: the mapping still holds it
        assert pool.stats()["cached_chunks"] == 0
        r.unmap(0)
        assert pool.stats()["cached_chunks"] == 1


def test_pool_acquire_many_is_all_or_nothing(backend, g):
    pool = core.ChunkPool(limit_bytes=4 * g, backend=backend)
    assert pool.prefill(2) == 2
    held = pool.acquire_many(3)
    assert len(held) == 3
    with pytest.raises(glake.OutOfMemoryError):
        pool.acquire_many(2)
    assert pool.stats()["in_use_chunks"] == 3 and pool.stats()["cached_chunks"] == 0
    del held
    pool.set_limit(2 * g)
    assert pool.stats()["cached_chunks"] == 2
    with pytest.raises(glake.InvalidArgumentError, match="must be non-negative"):
        pool.acquire_many(-1)
    with pytest.raises(glake.InvalidArgumentError, match="multiple of the granularity"):
        core.ChunkPool(chunk_size=g + 1, backend=backend)


def test_pool_chunks_survive_pool(backend, g):
    pool = core.ChunkPool(backend=backend)
    c = pool.acquire()
    del pool
    with core.VirtualRange(g, backend=backend) as r:
        r.map(0, c)
        core.write(r.ptr, b"x", backend=backend)


def test_concurrent_map_unmap(backend, g):
    n_threads, per_thread = 4, 8
    pool = core.ChunkPool(backend=backend)
    r = core.VirtualRange(n_threads * per_thread * g, backend=backend)
    errors = []

    def worker(t: int) -> None:
        try:
            for rep in range(5):
                for i in range(per_thread):
                    off = (t * per_thread + i) * g
                    r.map(off, pool.acquire())
                    core.write(r.ptr + off, bytes([t, i, rep]), backend=backend)
                for i in range(per_thread):
                    off = (t * per_thread + i) * g
                    assert core.read(r.ptr + off, 3, backend=backend) == bytes([t, i, rep])
                    r.unmap(off)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert r.mapped_bytes == 0
    assert pool.stats()["created"] <= n_threads * per_thread
    r.free()


def test_stats_and_reset(backend, g):
    c = core.PhysChunk(backend=backend)
    with core.VirtualRange(g, backend=backend) as r:
        r.map(0, c)
        s = core.stats(backend)
        assert s["backend"] == backend
        assert s["mapped_bytes.current"] >= g and s["mapped_bytes.peak"] >= s["mapped_bytes.current"]
        assert s["time_ns.map"] > 0 and s["time_ns.total"] >= s["time_ns.map"]
    core.reset_peak_stats(backend)
    s = core.stats(backend)
    assert s["calls.map"] == 0 and s["mapped_bytes.peak"] == s["mapped_bytes.current"]


def test_mem_info_and_device_count(backend):
    free, total = core.mem_info(backend)
    assert 0 < free <= total
    assert core.device_count(backend) >= 1
