"""The benchmark scripts that can run without a GPU, run small on the host backend.

These check that the scripts work end to end (arguments, tables, JSON) so they do not rot between
GPU sessions; the numbers they print on a host are not GPU results and nothing here times anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(tmp_path: Path, script: str, *args: str) -> str:
    env = dict(os.environ, GLAKE_BENCH_DIR=str(tmp_path), GLAKE_BACKEND="host",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_vmm_latency(tmp_path):
    out = run_benchmark(tmp_path, "vmm_latency.py", "--backend", "host", "--chunks", "16", "--repeats", "1")
    assert "create" in out
    assert json.loads((tmp_path / "vmm_latency_host.json").read_text())["backend"] == "host"


def test_kv_growth_utilisation_never_above_its_bound(tmp_path):
    """The bound is an ideal manager's utilisation on the same steps: glake's must not exceed it,
    and the bound itself must be a fraction."""
    pytest.importorskip("torch")
    run_benchmark(tmp_path, "kv_growth.py", "--backend", "host", "--seqs", "8", "--steps", "30", "--warmup", "5",
                  "--layers", "4", "--dtype", "float32", "--max-seq-len", "512", "--lookahead", "2",
                  "--fork-seqs", "4", "--system-prompt", "100", "--profile-steps", "2")
    summary = {r["mode"]: r for r in json.loads((tmp_path / "kv_growth_host.json").read_text())["summary"]}
    assert set(summary) == {"premapped", "sync", "lookahead=2"}
    assert summary["premapped"]["utilisation_bound"] is None
    for mode in ("sync", "lookahead=2"):
        r = summary[mode]
        assert 0 < r["utilisation"] <= r["utilisation_bound"] + 1e-9 <= 1 + 1e-9, r
        assert 0 < r["utilisation_at_sync"] <= r["utilisation_bound_at_sync"] + 1e-9 <= 1 + 1e-9, r


def test_multipath_host_dry_run(tmp_path):
    pytest.importorskip("torch")
    run_benchmark(tmp_path, "multipath.py", "--host-dry-run", "--sizes", "4M", "--repeats", "1")
    assert (tmp_path / "multipath_host_dry_run.json").exists()


def test_trace_replay_counts_fewer_driver_calls_with_larger_chunks(tmp_path):
    """The recorded H200 trace replays on the host backend; 32 MiB chunks make fewer cuMemCreate and
    cuMemMap calls than 2 MiB ones, and every configuration's smallest cap lies between the trace's
    peak allocation and its peak reserved memory."""
    run_benchmark(tmp_path, "trace_replay.py", "--confs", "chunk_bytes:2MiB;chunk_bytes:32MiB", "--min-cap")
    res = json.loads((tmp_path / "trace_replay.json").read_text())["results"]
    fine, coarse = res["chunk_bytes:2MiB"], res["chunk_bytes:32MiB"]
    assert coarse["calls"]["create"] < fine["calls"]["create"] and coarse["calls"]["map"] < fine["calls"]["map"]
    for r in (fine, coarse):
        assert r["allocated_peak"] <= r["min_cap"] <= r["reserved_peak"] + (16 << 20)


def test_serve_offline_tiny(tmp_path):
    """The offline serving benchmark end to end on a tiny random model: every drawn output token comes out."""
    pytest.importorskip("transformers")
    out = run_benchmark(tmp_path, "serve_offline.py", "--tiny", "--requests", "12", "--max-num-seqs", "8",
                        "--no-progress", "--timeline")
    assert "Offline throughput" in out and "steps by kind" in out
    g = json.loads((tmp_path / "serve_offline.json").read_text())["results"]["glake"]
    assert g["output_tokens"] > 0 and g["steps"] > 0
    assert sum(r["steps"] for r in g["timeline"]) == g["steps"]  # every step of the run, in one group
    assert any(r["kind"] == "prefill (+decode)" for r in g["timeline"])


def test_serve_online_tiny(tmp_path):
    """The online benchmark through a real server process on a tiny random model (glake only)."""
    for mod in ("transformers", "fastapi", "uvicorn", "httpx"):
        pytest.importorskip(mod)
    out = run_benchmark(tmp_path, "serve_online.py", "--tiny", "--requests", "8", "--rates", "50,inf",
                        "--max-num-seqs", "8")
    assert "Online serving" in out
    rows = json.loads((tmp_path / "serve_online.json").read_text())["rows"]
    assert [r["rate"] for r in rows] == [50.0, float("inf")]
    assert all(r["output_tokens"] > 0 and r["ttft_p99_ms"] >= r["ttft_p50_ms"] > 0 for r in rows)


def test_dedup_tiny(tmp_path):
    """The dedup benchmark's processes on the host backend: every later process saves what the first holds."""
    out = run_benchmark(tmp_path, "dedup.py", "--tiny", "--procs", "1,2")
    assert "Dedup: N processes" in out
    runs = json.loads((tmp_path / "dedup.json").read_text())["runs"]
    two = runs[1]["workers"]
    assert two[1]["saved_bytes"] == two[1]["shared_bytes"] > 0 and two[0]["chunks_canonical"] > 0


def test_shim_trace_host(tmp_path):
    out = run_benchmark(tmp_path, "shim_trace_host.py", "--seeds", "1", "--steps", "200", "--chunks", "2MiB,32MiB")
    assert "physical / live" in out
    runs = json.loads((tmp_path / "shim_trace_host.json").read_text())["runs"]
    assert [r["chunk_bytes"] for r in runs] == ["2MiB", "32MiB"]
    assert all(r["peak_physical_bytes"] >= r["peak_live_bytes"] > 0 for r in runs)


def test_detokenize_tiny(tmp_path):
    out = run_benchmark(tmp_path, "detokenize.py", "--seqs", "4", "--lengths", "20,40", "--steps", "2")
    assert "Text upkeep" in out
    runs = json.loads((tmp_path / "detokenize.json").read_text())["runs"]
    assert [r["length"] for r in runs] == [20, 40]


def test_gpu_trace_summary_counts_busy_time_once_and_finds_the_gaps():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _gpu_trace import device_events, summarize

    trace = {"traceEvents": [
        {"cat": "kernel", "ph": "X", "ts": 0, "dur": 10, "name": "gemm_a"},
        {"cat": "kernel", "ph": "X", "ts": 5, "dur": 7, "name": "norm"},          # overlaps the first
        {"cat": "gpu_memcpy", "ph": "X", "ts": 112, "dur": 8, "name": "Memcpy HtoD"},  # after 100 us idle
        {"cat": "kernel", "ph": "X", "ts": 123, "dur": 17, "name": "gemm_b"},
        {"cat": "cpu_op", "ph": "X", "ts": 0, "dur": 500, "name": "host work"},   # not device activity
    ]}
    s = summarize(device_events(trace), 2, lambda n: "gemm" if "gemm" in n else "other")
    assert s["span_ms"] == pytest.approx(0.140 / 2) and s["busy_ms"] == pytest.approx(0.037 / 2)
    assert s["classes"] == pytest.approx({"gemm": 0.027 / 2, "other": 0.015 / 2})
    assert [g["us"] for g in s["largest_gaps"]] == [100.0, 3.0]
    assert s["largest_gaps"][0] == {"us": 100.0, "after": "norm", "before": "Memcpy HtoD"}
    assert s["gaps"][">= 100 us"]["count_per_step"] == 0.5
