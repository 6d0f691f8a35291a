"""The gRPC service against a real server in a child process: every RPC, bad requests, sockets."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

grpc = pytest.importorskip("grpc")

from glake.stats import discovery, memmap, paths  # noqa: E402
from glake.stats import glake_stats_pb2 as pb  # noqa: E402
from glake.stats.client import StatsClient, StatsError, sections_named  # noqa: E402

from .conftest import ROOT, Child, wait_gone  # noqa: E402


def test_get_stats_has_every_section(child):
    with StatsClient(child.pid) as c:
        stats = c.get_stats()
    assert stats["process"]["pid"] == child.pid
    assert stats["process"]["server"] == "python"
    assert stats["process"]["listen_addresses"] == child.addresses
    names = {s["name"] for s in stats["sections"]}
    assert {"vmm", "allocator", "demo", "broken"} <= names
    (alloc,) = [s for s in sections_named(stats, "allocator") if s["labels"].get("pool") == "fragmented"]
    expect = child.info["expect"]
    assert alloc["counters"]["allocated_bytes.all.current"] == expect["allocated"]
    assert alloc["counters"]["reserved_bytes.all.current"] == expect["reserved"]
    assert alloc["counters"]["num_stitches"] == expect["num_stitches"] >= 2
    assert 0.0 < alloc["values"]["fragmentation"] < 1.0
    assert alloc["counters"]["largest_free_bytes"] == 12 << 20
    (vmm,) = sections_named(stats, "vmm")
    assert vmm["counters"]["chunks_live"] > 0 and vmm["counters"]["calls.map"] > 0
    (demo,) = sections_named(stats, "demo")
    assert demo["device"] == 0 and demo["labels"] == {"kind": "test"}
    assert demo["counters"] == {"requests": 42, "nested.ok": 1} and demo["values"] == {"hit_rate": 0.75}
    (broken,) = sections_named(stats, "broken")
    assert broken["error"] == "RuntimeError: this source always fails" and not broken["counters"]


def test_get_stats_filters_sections(child):
    with StatsClient(child.pid) as c:
        stats = c.get_stats(["demo", "vmm"])
    assert sorted(s["name"] for s in stats["sections"]) == ["demo", "vmm"]


def test_watch_stats_streams_bounded_updates(child):
    with StatsClient(child.pid) as c:
        updates = list(c.watch(interval=0.05, count=3, sections=["demo"]))
    assert [u["sequence"] for u in updates] == [0, 1, 2]
    stamps = [u["timestamp_unix_ns"] for u in updates]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3
    assert all(u["sections"][0]["counters"]["requests"] == 42 for u in updates)


def test_watch_stats_cancelled_by_client(child):
    with StatsClient(child.pid) as c:
        stream = c.watch(interval=0.05, count=0)  # unbounded: the client stops it
        first = next(stream)
        second = next(stream)
        stream.close()  # cancels the RPC
        assert (first["sequence"], second["sequence"]) == (0, 1)
        assert c.get_stats(["vmm"])["sections"]  # the server goes on answering


def test_memory_map_has_every_state_and_tiles_segments(child):
    with StatsClient(child.pid) as c:
        mm = c.memory_map("fragmented")
    (pool,) = mm["pools"]
    assert pool["name"] == "fragmented" and pool["backend"] == "host" and pool["granularity"] == 2 << 20
    states = {b["state"] for s in pool["segments"] for b in s["blocks"]}
    assert states == {"allocated", "free", "lent", "held", "pending"}
    kinds = {s["kind"] for s in pool["segments"]}
    assert kinds == {"small", "large", "stitched"}
    addresses = [s["address"] for s in pool["segments"]]
    assert addresses == sorted(addresses)
    for seg in pool["segments"]:
        if seg["kind"] == "stitched":
            assert len(seg["blocks"]) == 1 and seg["blocks"][0]["address"] == seg["address"]
            continue
        at = seg["address"]
        for b in seg["blocks"]:  # blocks tile the segment, in order, without gaps
            assert b["address"] == at
            at += b["size"]
        assert at == seg["address"] + seg["size"]
    (held,) = [s for s in pool["segments"] if s["kind"] == "stitched" and s["blocks"][0]["state"] == "held"]
    lent = [b for s in pool["segments"] for b in s["blocks"] if b["state"] == "lent"]
    assert lent and all(b["lent_to"] == held["address"] for b in lent)
    m = memmap.summarize([pool])
    assert m["allocated"] == child.info["expect"]["allocated"]
    assert m["reserved"] == child.info["expect"]["reserved"]
    assert m["largest_free"] == 12 << 20 and m["held"] == held["size"]


def test_memory_map_all_pools(child):
    with StatsClient(child.pid) as c:
        raw = c.memory_map_pb()
    assert isinstance(raw, pb.MemoryMap)
    assert "fragmented" in [p.name for p in raw.pools]
    assert raw.process.pid == child.pid


@pytest.mark.parametrize("call, code", [
    (lambda c: c.get_stats(["no-such-section"]), grpc.StatusCode.NOT_FOUND),
    (lambda c: c.memory_map("no-such-pool"), grpc.StatusCode.NOT_FOUND),
    (lambda c: list(c.watch(interval=0.001, count=2)), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda c: list(c.watch(interval=4_000_000, count=1, timeout=10)), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda c: list(c.watch(interval=0.05, count=2, sections=["nope"])), grpc.StatusCode.NOT_FOUND),
    (lambda c: c.get_stats(["x" * 100_000]), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_bad_requests_get_status_codes(child, call, code):
    with StatsClient(child.pid) as c:
        with pytest.raises(StatsError) as info:
            call(c)
        assert info.value.code == code, str(info.value)
        assert c.get_stats(["vmm"])["process"]["pid"] == child.pid  # still serving


def test_undecodable_request_and_unknown_method(child):
    channel = grpc.insecure_channel("unix:" + child.socket)
    try:
        raw = channel.unary_unary("/glake.stats.v1.GlakeStats/GetStats", request_serializer=None,
                                  response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xff\xff\xff not a protobuf", timeout=5)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        unknown = channel.unary_unary("/glake.stats.v1.GlakeStats/DropTables", request_serializer=None,
                                      response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            unknown(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()
    with StatsClient(child.pid) as c:
        assert c.get_stats(["vmm"])["process"]["pid"] == child.pid


def test_socket_and_directory_are_private(child):
    st = os.lstat(child.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert child.socket == paths.socket_path(child.pid)
    d = os.lstat(paths.runtime_dir())
    assert stat.S_IMODE(d.st_mode) == 0o700 and d.st_uid == os.getuid()


def test_tcp_on_loopback():
    c = Child("--tcp", "127.0.0.1:0", "--no-layout")
    try:
        assert c.tcp is not None and c.tcp.startswith("127.0.0.1:") and not c.tcp.endswith(":0")
        with StatsClient(c.tcp) as client:
            stats = client.get_stats(["demo"])
        assert stats["process"]["pid"] == c.pid and c.tcp in stats["process"]["listen_addresses"]
    finally:
        c.stop()


def test_child_refuses_non_loopback_tcp():
    env = dict(os.environ, PYTHONPATH=ROOT, GLAKE_STATS_ADDR="0.0.0.0:0")
    env.pop("GLAKE_STATS_ALLOW_REMOTE", None)
    code = "import glake.stats as s\ntry:\n    s.serve()\nexcept s.server.RemoteAddressRefused as e:\n    print('refused:', e)\n"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused:") and "0.0.0.0:0" in out.stdout


def test_exit_removes_socket_even_with_a_watcher():
    c = Child("--no-layout")
    with StatsClient(c.pid) as client:
        stream = client.watch(interval=0.05, count=0)
        next(stream)
        assert c.stop(timeout=30) == 0  # a streaming RPC does not hold the process
        stream.close()
    assert wait_gone(c.socket)


def test_killed_process_leaves_a_stale_socket_that_discovery_removes():
    c = Child("--no-layout")
    c.kill()
    assert os.path.exists(c.socket)  # SIGKILL: nothing could clean up
    entries = {e.pid: e for e in discovery.discover(clean=False)}
    assert entries[c.pid].status == discovery.STALE and "gone" in entries[c.pid].reason
    assert os.path.exists(c.socket)
    entries = {e.pid: e for e in discovery.discover()}
    assert entries[c.pid].status == discovery.STALE_REMOVED
    assert not os.path.exists(c.socket)
    with pytest.raises(StatsError) as info:
        StatsClient(c.pid)
    assert info.value.code is None and "publishes no glake stats" in str(info.value)


def test_glake_stats_env_starts_a_server_in_the_background():
    env = dict(os.environ, PYTHONPATH=ROOT, GLAKE_STATS="1")
    code = ("import os, glake.stats\nfrom glake.stats import discovery\nfrom glake.stats.client import StatsClient\n"
            "glake.stats.serve_from_env()\npath = discovery.wait_for_socket(os.getpid(), 30)\n"
            "print(StatsClient(os.getpid()).get_stats(['vmm'])['process']['pid'] == os.getpid(), path)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    ok, path = out.stdout.split()
    assert ok == "True" and not os.path.exists(path)  # removed at exit
