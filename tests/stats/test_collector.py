"""The collector, the source registry and the memory-map figures, in this process (no server)."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

import glake
import glake.stats
from glake import _C
from glake.stats import collector, memmap, sources

from .conftest import ROOT

M = 1 << 20


@pytest.fixture(autouse=True)
def clean_registry():
    before = {s.name for s in sources.registered()}
    yield
    for s in sources.registered():
        if s.name not in before:
            sources.unregister(s.name)


def test_importing_glake_stats_imports_no_grpc_or_protobuf():
    code = ("import sys, glake, glake.stats, glake.cli\nglake.stats.register_source('x', dict)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google', 'rich', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_split_figures():
    class NpInt:
        def __index__(self):
            return 7

    counters, values = collector.split_figures({"a": 1, "b": 2.5, "c": True, "d": {"e": 3, "f": {"g": 0.5}},
                                                "s": "text", "n": None, "big": 1 << 70, "np": NpInt()})
    assert counters == {"a": 1, "c": 1, "d.e": 3, "np": 7}
    assert values == {"b": 2.5, "d.f.g": 0.5, "big": float(1 << 70)}


def test_registered_source_and_its_failure_are_isolated():
    glake.stats.register_source("good", lambda: {"hits": 3, "ratio": 0.5}, device=1, labels={"model": "m"})
    glake.stats.register_source("bad", lambda: 1 / 0)
    secs = {s["name"]: s for s in glake.stats.collect(["good", "bad"])}
    assert secs["good"] == {"name": "good", "device": 1, "labels": {"model": "m"}, "counters": {"hits": 3},
                            "values": {"ratio": 0.5}, "error": ""}
    assert secs["bad"]["error"].startswith("ZeroDivisionError") and secs["bad"]["counters"] == {}
    with pytest.raises(collector.UnknownNameError, match="no section 'nope'"):
        glake.stats.collect(["nope"])


def test_registry_names():
    glake.stats.register_source("dup", dict)
    with pytest.raises(ValueError, match="already registered"):
        glake.stats.register_source("dup", dict)
    glake.stats.register_source("dup", lambda: {"v": 1}, replace=True)
    assert glake.stats.collect(["dup"])[0]["counters"] == {"v": 1}
    assert glake.stats.unregister("dup") and not glake.stats.unregister("dup")
    for bad in ("", "has space", "x" * 200, None):
        with pytest.raises(ValueError):
            glake.stats.register_source(bad, dict)
    with pytest.raises(TypeError):
        glake.stats.register_source("notcallable", 3)
    with pytest.raises(TypeError):
        glake.stats.register_allocator(object())


def test_registered_allocator_section_and_map_and_weak_reference():
    a = glake.Allocator(backend="host")
    ptrs = [a.malloc(4 * M) for _ in range(4)]
    a.free(ptrs[1])
    name = glake.stats.register_allocator(a, "mine")
    assert name == "mine"
    (sec,) = [s for s in glake.stats.collect(["allocator"]) if s["labels"].get("pool") == "mine"]
    st = a.stats()
    assert sec["counters"]["allocated_bytes.all.current"] == st["allocated_bytes.all.current"] == 12 * M
    assert sec["counters"]["free_bytes"] == 4 * M and sec["values"]["utilization"] == 0.75
    (pool,) = glake.stats.memory_map("mine")
    assert [s["kind"] for s in pool["segments"]] == ["large"] * 4
    m = memmap.summarize([pool])
    assert (m["allocated"], m["reserved"], m["free"], m["largest_free"]) == (12 * M, 16 * M, 4 * M, 4 * M)
    assert m["fragmentation"] == 0.0 and m["chunks"] == 8
    for p in (ptrs[0], ptrs[2], ptrs[3]):
        a.free(p)
    del a
    gc.collect()
    assert "mine" not in [s.name for s in sources.registered()]  # held weakly: gone with the allocator
    with pytest.raises(collector.UnknownNameError, match="no pool 'mine'"):
        glake.stats.memory_map("mine")


def test_collecting_never_creates_the_global_allocator():
    if _C.gmlake_global_exists(0):
        pytest.skip("this test process already has a global allocator")
    glake.stats.collect()
    glake.stats.memory_map()
    assert not _C.gmlake_global_exists(0)


def _block(addr, size, state, lent_to=0):
    return {"address": addr, "size": size, "requested": 0, "state": state, "stream": 0, "lent_to": lent_to}


def _seg(kind, addr, blocks, active=True):
    return {"kind": kind, "address": addr, "size": sum(b["size"] for b in blocks), "active": active, "blocks": blocks}


def test_summarize_by_hand():
    pool = {"name": "p", "device": 0, "backend": "host", "granularity": 2 * M, "segments": [
        _seg("large", 0x1000_0000, [_block(0x1000_0000, 4 * M, "allocated"), _block(0x1040_0000, 2 * M, "free"),
                                    _block(0x1060_0000, 2 * M, "lent")]),
        _seg("large", 0x2000_0000, [_block(0x2000_0000, 6 * M, "free"), _block(0x2060_0000, 2 * M, "pending")]),
        _seg("stitched", 0x3000_0000, [_block(0x3000_0000, 2 * M, "held")], active=False),
    ]}
    m = memmap.summarize([pool])
    assert (m["reserved"], m["allocated"], m["pending"], m["free"], m["lent"], m["held"]) == (
        16 * M, 4 * M, 2 * M, 8 * M, 2 * M, 2 * M)
    assert m["largest_free"] == 6 * M and m["fragmentation"] == pytest.approx(1 - 6 / 8)
    assert m["utilization"] == pytest.approx(4 / 16)
    assert (m["segments"], m["stitched_ranges"], m["blocks"], m["chunks"]) == (2, 1, 6, 8)
    empty = memmap.summarize([])
    assert empty["fragmentation"] == 0.0 and empty["utilization"] == 0.0


def test_links_only_when_certain():
    def snapshot(stitch_states):
        segs = [{"kind": "large", "address": 0x1000, "size": 4 * M, "active": True, "blocks": [
            {"address": 0x1000, "size": 4 * M, "requested": 0, "state": "stitched", "stream": 0}]}]
        for i, st in enumerate(stitch_states):
            segs.append({"kind": "stitched", "address": 0x9000 + i, "size": 4 * M, "active": st == "allocated",
                         "blocks": [{"address": 0x9000 + i, "size": 4 * M, "requested": 0, "state": st, "stream": 0}]})
        return memmap.pool_from_snapshot("p", 0, "host", 2 * M, segs)

    one = snapshot(["held", "free"])  # the detached ("free") range holds no chunks
    lent = [b for s in one["segments"] for b in s["blocks"] if b["state"] == "lent"]
    assert [b["lent_to"] for b in lent] == [0x9000]
    two = snapshot(["held", "allocated"])
    assert [b["lent_to"] for s in two["segments"] for b in s["blocks"] if b["state"] == "lent"] == [0]


def test_kvcache_and_multipath_sections_when_in_use():
    torch = pytest.importorskip("torch")
    import glake.multipath as mp
    from glake.kvcache import KVCache

    with KVCache(2, 2, 64, "float32", max_seqs=4, max_seq_len=256, backend="host") as kv:
        s = kv.allocate()
        kv.reserve(s, 40)
        src = torch.randn(1 << 18)
        mp.copy_(torch.empty_like(src), src)
        secs = collector.collect_sections(["kvcache", "multipath"])
        kv_secs = [x for x in secs if x["name"] == "kvcache"]
        mp_secs = [x for x in secs if x["name"] == "multipath"]
        assert len(kv_secs) >= 1 and kv_secs[-1]["labels"]["backend"] == "host"
        assert any(x["counters"].get("chunks_mapped", 0) >= 1 for x in kv_secs)
        assert any(x["labels"]["engine"] == "host:0" and x["counters"]["calls.plain"] + x["counters"]["calls.staged_h2d"] >= 1
                   for x in mp_secs)
        assert len({x["labels"]["cache"] for x in kv_secs}) == len(kv_secs)  # one section per open cache
    assert "kvcache" not in collector.section_names()  # a closed cache leaves the stats
    with pytest.raises(collector.UnknownNameError, match="no section 'kvcache'"):
        collector.collect_sections(["kvcache"])
