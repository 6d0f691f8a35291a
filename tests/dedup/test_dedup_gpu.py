"""Dedup on a GPU: real POSIX-fd handles of cuMemCreate chunks through the broker, chunks hashed on
the GPU, compared there and mapped with CU_MEM_ACCESS_FLAGS_PROT_READ; each process its own."""

from __future__ import annotations

import pytest

from tests.dedup.util import CHUNKS, broker

pytestmark = pytest.mark.gpu
CUDA = {"DEDUP_TEST_BACKEND": "cuda", "GLAKE_BACKEND": "cuda"}


def test_gpu_processes_share_equal_chunks_and_keep_unequal_ones(sock, workers):
    a, b, c = workers(3, env=CUDA)
    a.ask("fill 7")
    b.ask("fill 7")
    c.ask("fill 7 2")  # one byte of chunk 2 differs
    sa, sb, sc = (w.ask("share") for w in (a, b, c))
    assert sa["chunks_canonical"] == CHUNKS and sb["chunks_imported"] == CHUNKS
    assert sc["chunks_imported"] == CHUNKS - 1 and sc["chunks_canonical"] == 1
    assert all(w.ask("check")["intact"] for w in (a, b, c))
    assert broker(sock)["chunks"] == CHUNKS + 1
    a.kill()  # the exporter dies: the importers read on
    assert b.ask("check")["intact"] and c.ask("check")["intact"]


def test_gpu_hash_collision_never_shares(sock, workers):
    a, b = workers(2, env={**CUDA, "GLAKE_DEDUP_TEST_COLLIDE": "1"})
    a.ask("fill 7")
    b.ask("fill 8")
    a.ask("share")
    assert b.ask("share")["chunks_imported"] == 0 and b.ask("check")["intact"] and a.ask("check")["intact"]


def test_gpu_modules_share_weights_and_compute_the_same(sock, workers):
    a, b = workers(2, env=CUDA)
    ra, rb = a.ask("module 3"), b.ask("module 3")
    assert ra["same_output"] and rb["same_output"]
    assert rb["saved_bytes"] == rb["shared_bytes"] > 0
    s = b.ask("stats")
    assert s["hash_bytes"] > 0 and s["compare_bytes"] > 0 and s["mismatches"] == 0
