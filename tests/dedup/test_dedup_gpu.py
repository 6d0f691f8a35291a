"""Dedup on a GPU: real POSIX-fd handles of cuMemCreate chunks through the broker, chunks hashed on
the GPU, compared there and mapped with CU_MEM_ACCESS_FLAGS_PROT_READ; each process its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_four_processes_loading_the_same_8b_shaped_weights_share_them(tmp_path):
    """benchmarks/dedup.py's workers: Llama-3-8B-shaped bf16 weights (16 GB) made from one seed in 4
    processes alive at once, each shared with glake.dedup.share; the last three map every whole chunk
    from the first (what partial chunks and the packing leave out stays private) and no digest lies."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, GLAKE_BENCH_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "dedup.py"), "--procs", "4"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run = json.loads((tmp_path / "dedup.json").read_text())["runs"][0]
    first, *rest = run["workers"]
    assert first["weight_bytes"] > 15e9 and first["saved_bytes"] == 0
    for w in rest:
        assert w["saved_bytes"] >= 0.999 * w["weight_bytes"] and w["mismatches"] == 0, w
    assert run["weight_bytes_held"] <= 1.1 * first["weight_bytes"]  # one copy of the weights on the device
