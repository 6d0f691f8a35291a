"""`glake ps / stats / top / map`: the real command, run as a process, against a real server in a child process."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

pytest.importorskip("grpc")
pytest.importorskip("rich")

from .conftest import ROOT, Child  # noqa: E402

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "glake")
GLAKE = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "glake.cli"]  # the installed command


def run_cli(*argv: str, timeout: float = 120):
    """Run ``glake ARGV`` as a process; returns (exit code, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
    out = subprocess.run(GLAKE + list(argv), capture_output=True, text=True, timeout=timeout, env=env)
    return out.returncode, out.stdout, out.stderr


def png_size(path: str):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _fragmentation(child) -> float:
    from glake.stats import memmap
    from glake.stats.client import StatsClient

    with StatsClient(child.pid) as c:
        return memmap.summarize(c.memory_map("fragmented")["pools"])["fragmentation"]


def test_ps_lists_the_child(child):
    code, out, _ = run_cli("ps")
    assert code == 0
    line = next(line for line in out.splitlines() if line.strip().startswith(str(child.pid)))
    assert "live" in line and "host" in line and "child_server.py" in line


def test_ps_json(child):
    code, out, _ = run_cli("ps", "--json")
    assert code == 0
    (entry,) = [e for e in json.loads(out) if e["pid"] == child.pid]
    assert entry["status"] == "live" and entry["socket"] == child.socket
    assert entry["totals"]["allocated"] == child.info["expect"]["allocated"]
    assert entry["totals"]["reserved"] == child.info["expect"]["reserved"]


def test_ps_reports_and_removes_a_stale_socket():
    c = Child("--no-layout")
    c.kill()
    code, out, _ = run_cli("ps")
    assert code == 0
    assert f"removed stale socket {c.socket}: process {c.pid} is gone" in " ".join(out.split())
    assert not os.path.exists(c.socket)


def test_stats_table(child):
    code, out, _ = run_cli("stats", str(child.pid))
    assert code == 0
    assert f"pid {child.pid}" in out
    for text in ("allocator · fragmented · device 0", "allocated_bytes.all", "num_stitches", "largest_free_bytes",
                 "fragmentation", "vmm · backend=host · driver calls", "set_access", "demo", "hit_rate",
                 "this source always fails"):
        assert text in out, text
    (row,) = [line.split() for line in out.splitlines() if line.split()[:1] == ["allocated_bytes.all"]]
    assert row[1:3] == ["46.10", "MiB"]  # current, formatted


def test_stats_json(child):
    code, out, _ = run_cli("stats", str(child.pid), "--json", "--section", "allocator")
    assert code == 0
    stats = json.loads(out)
    (sec,) = [s for s in stats["sections"] if s["labels"].get("pool") == "fragmented"]
    assert sec["counters"]["allocated_bytes.all.current"] == child.info["expect"]["allocated"]
    assert {s["name"] for s in stats["sections"]} == {"allocator"}


def test_stats_prometheus(child):
    pytest.importorskip("prometheus_client")
    code, out, _ = run_cli("stats", str(child.pid), "--prometheus")
    assert code == 0
    expect = child.info["expect"]["allocated"]
    line = next(l for l in out.splitlines() if l.startswith("glake_allocator_allocated_bytes_all_current{")
                and 'pool="fragmented"' in l)
    assert f'pid="{child.pid}"' in line and float(line.rsplit(" ", 1)[1]) == expect


def test_stats_errors_are_messages_not_tracebacks():
    code, _, err = run_cli("stats", "999999999")
    assert code == 1 and "publishes no glake stats" in err
    code, _, err = run_cli("stats", "unix:/nonexistent/x.sock", "--timeout", "2")
    assert code == 1 and "nothing answers at unix:/nonexistent/x.sock" in err and "Traceback" not in err
    code, _, err = run_cli("stats", "abc")  # was a raw gRPC resolver error
    assert code == 1 and "'abc' is not a pid, a socket path, unix:PATH or host:port" in err


def test_stats_of_a_killed_process_says_it_is_gone():
    c = Child("--no-layout")
    c.kill()  # its socket stays behind
    assert os.path.exists(c.socket)
    code, _, err = run_cli("stats", str(c.pid))
    assert code == 1 and f"process {c.pid} is gone" in err and "UNAVAILABLE" not in err, err
    code, _, err = run_cli("map", str(c.pid))
    assert code == 1 and f"process {c.pid} is gone" in err


def test_stats_unknown_section(child):
    code, _, err = run_cli("stats", str(child.pid), "--section", "nope")
    assert code == 1 and "NOT_FOUND" in err and "no section 'nope'" in err


def test_top_runs_to_completion(child):
    code, out, _ = run_cli("top", "--iterations", "2", "--interval", "0.2")
    assert code == 0
    assert out.count("glake top") == 2 and "frame 1" in out and "frame 2" in out
    rows = [line for line in out.splitlines() if line.strip().startswith(str(child.pid))]
    assert len(rows) == 2 and all("fragmented" in r for r in rows)
    frag = _fragmentation(child)
    assert 0.2 < frag < 0.3  # the layout's free memory: 12 MiB in one block, ~3.9 MiB in small pieces
    assert f" {frag:.2f} " in rows[0]


def test_top_named_target_and_missing_one(child):
    code, out, _ = run_cli("top", str(child.pid), "999999999", "--iterations", "1", "--interval", "0.1")
    assert code == 0
    assert "1 process " in out and "publishes no glake stats" in " ".join(out.split())


def test_map_png_has_the_asked_size(child, tmp_path):
    pytest.importorskip("matplotlib")
    path = str(tmp_path / "map.png")
    code, out, _ = run_cli("map", str(child.pid), "--png", path, "--width", "900", "--height", "700")
    assert code == 0 and f"wrote {path} (900x700)" in out and "2 stitched ranges" in out
    assert png_size(path) == (900, 700)
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (700, 900)
    assert len({tuple(px) for px in img[::7, ::7, :3].reshape(-1, 3).round(2)}) > 8  # a picture, not a blank


def test_map_png_default_height_grows_with_bands(child, tmp_path):
    pytest.importorskip("matplotlib")
    path = str(tmp_path / "auto.png")
    assert run_cli("map", str(child.pid), "--png", path, "--scale", "fit")[0] == 0
    w, h = png_size(path)
    assert w == 1600 and h >= 420


def test_map_json_and_table(child):
    code, out, _ = run_cli("map", str(child.pid), "--json", "--pool", "fragmented")
    assert code == 0
    mm = json.loads(out)
    assert [p["name"] for p in mm["pools"]] == ["fragmented"] and mm["process"]["pid"] == child.pid
    code, out, _ = run_cli("map", str(child.pid))
    assert code == 0 and f"fragmented (host, device 0): fragmentation {_fragmentation(child):.2f}" in " ".join(
        out.split())
    code, _, err = run_cli("map", str(child.pid), "--pool", "nope")
    assert code == 1 and "NOT_FOUND" in err
    code, _, err = run_cli("map", str(child.pid), "--png", "x.png", "--width", "0")
    assert code == 1 and "--width" in err


def test_console_entry_point_and_run_still_works(child):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "glake.cli", "ps", "--json"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert child.pid in [e["pid"] for e in json.loads(out.stdout)]
    out = subprocess.run([sys.executable, "-m", "glake.cli", "run"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "nothing to run" in out.stderr
    out = subprocess.run([sys.executable, "-m", "glake.cli", "run", "--", sys.executable, "-c", "print('ran')"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ran"
