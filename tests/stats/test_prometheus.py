"""glake.stats.prometheus: names, types and labels of the metrics; in-process, remote and over HTTP."""

from __future__ import annotations

import urllib.request

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import glake.stats  # noqa: E402
from glake.stats import prometheus, sources  # noqa: E402


def _reply(sections):
    return {"process": {"pid": 7}, "timestamp_unix_ns": 0, "sequence": 0, "sections": sections}


def _sec(name, counters=None, values=None, device=-1, labels=None, error=""):
    return {"name": name, "device": device, "labels": labels or {}, "counters": counters or {},
            "values": values or {}, "error": error}


def test_names_and_types():
    assert prometheus.metric_name("allocator", "allocated_bytes.all.current") == \
        "glake_allocator_allocated_bytes_all_current"
    assert prometheus.metric_name("kv-cache", "9 lives") == "glake_kv_cache_9_lives"
    for key in ("calls.map", "time_ns.total", "num_stitches", "chunks_created", "num_segments_released",
                "allocation.all.allocated", "allocation.all.freed"):
        assert prometheus.is_counter(key), key
    for key in ("allocated_bytes.all.current", "reserved_bytes.all.peak", "chunks_live", "limit_bytes",
                "segment.all.current"):
        assert not prometheus.is_counter(key), key


def test_families_from_replies():
    fams = {f.name: f for f in prometheus.families([_reply([
        _sec("allocator", {"allocated_bytes.all.current": 10, "num_ooms": 2}, {"fragmentation": 0.5}, device=0,
             labels={"pool": "cuda:0"}),
        _sec("allocator", {"allocated_bytes.all.current": 20, "num_ooms": 0}, device=1, labels={"pool": "cuda:1"}),
        _sec("broken", error="boom"),
    ])])}
    alloc = fams["glake_allocator_allocated_bytes_all_current"]
    assert alloc.type == "gauge"
    assert sorted((s.labels["device"], s.labels["pool"], s.value) for s in alloc.samples) == [
        ("0", "cuda:0", 10.0), ("1", "cuda:1", 20.0)]
    assert all(s.labels["pid"] == "7" for s in alloc.samples)
    ooms = fams["glake_allocator_num_ooms"]
    assert ooms.type == "counter" and {s.name for s in ooms.samples} == {"glake_allocator_num_ooms_total"}
    assert fams["glake_allocator_fragmentation"].samples[0].value == 0.5
    up = {s.labels["section"]: s.value for s in fams["glake_section_up"].samples}
    assert up == {"allocator": 1.0, "broken": 0.0}
    assert not any(name.startswith("glake_broken") for name in fams)


def test_exposition_of_this_process():
    glake.stats.register_source("promtest", lambda: {"hits": 5, "ratio": 0.25}, device=2, labels={"model": "x"})
    try:
        text = prometheus.exposition().decode()
    finally:
        sources.unregister("promtest")
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    (hits,) = fams["glake_promtest_hits"].samples
    assert hits.value == 5 and hits.labels["device"] == "2" and hits.labels["model"] == "x"
    assert fams["glake_promtest_ratio"].samples[0].value == 0.25
    assert fams["glake_vmm_chunks_live"].type == "gauge"
    assert fams["glake_vmm_calls_map"].type == "counter"


def test_remote_targets_and_http(child):
    pytest.importorskip("grpc")
    text = prometheus.exposition(targets=[child.pid, 999999999]).decode()  # a missing target is skipped
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    (s,) = [s for s in fams["glake_allocator_allocated_bytes_all_current"].samples
            if s.labels["pool"] == "fragmented"]
    assert s.value == child.info["expect"]["allocated"] and s.labels["pid"] == str(child.pid)
    found = prometheus.exposition(discover=True).decode()
    assert f'pid="{child.pid}"' in found
    server = prometheus.start_http_server(0, targets=[child.pid])
    httpd = server[0] if isinstance(server, tuple) else server
    try:
        host, port = httpd.server_address[:2]
        assert host == "127.0.0.1"
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
        with direct.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert f'glake_demo_requests{{device="0",kind="test",pid="{child.pid}",section="demo"}} 42.0' in body
    finally:
        httpd.shutdown()
        httpd.server_close()
