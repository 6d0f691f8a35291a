"""What a new user sees: a program that only sets GLAKE_STATS=1 and uses glake is visible to every tool.

Each test runs the real `glake` command against a real child process that never calls
glake.stats itself: every Allocator, KVCache and multipath engine publishes itself.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("grpc")

from glake.stats import discovery  # noqa: E402

from .conftest import ROOT  # noqa: E402
from .test_cli import png_size, run_cli  # noqa: E402

GiB = 1 << 30

USER_PROGRAM = textwrap.dedent("""
    import sys
    import glake
    import torch
    import glake.multipath as mp
    from glake.kvcache import KVCache

    a = glake.Allocator(backend="host")                    # never registered by hand
    p = a.malloc(1 << 30)
    kv = KVCache(2, 2, 64, "float32", max_seqs=4, max_seq_len=256, backend="host", memory_budget="64MB")
    kv.reserve(kv.allocate(), 40)
    src = torch.randn(1 << 16)
    mp.copy_(torch.empty_like(src), src)
    print("ready", flush=True)
    sys.stdin.read()
""")

EMPTY_PROGRAM = "import sys, glake\nprint('ready', flush=True)\nsys.stdin.read()\n"


class Program:
    """A user's program run with GLAKE_STATS=1, until its stdin closes."""

    def __init__(self, code: str) -> None:
        env = dict(os.environ, GLAKE_STATS="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the program did not start: {self.proc.stderr.read()}")
        self.pid = self.proc.pid
        discovery.wait_for_socket(self.pid, timeout=60)

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


@pytest.fixture(scope="module")
def program():
    pytest.importorskip("torch")
    p = Program(USER_PROGRAM)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def empty_program():
    p = Program(EMPTY_PROGRAM)
    yield p
    p.stop()


def test_ps_shows_the_private_allocator(program):
    code, out, err = run_cli("ps", "--json")
    assert code == 0, err
    (entry,) = [e for e in json.loads(out) if e["pid"] == program.pid]
    assert entry["totals"]["allocated"] == GiB and entry["totals"]["reserved"] == GiB
    code, out, _ = run_cli("ps")
    (row,) = [line for line in out.splitlines() if line.strip().startswith(str(program.pid))]
    assert "1.00 GiB" in row


def test_stats_has_allocator_kvcache_and_multipath_sections(program):
    code, out, err = run_cli("stats", str(program.pid), "--json")
    assert code == 0, err
    secs = json.loads(out)["sections"]
    (alloc,) = [s for s in secs if s["name"] == "allocator"]
    assert alloc["counters"]["allocated_bytes.all.current"] == GiB
    assert alloc["labels"]["pool"].startswith("host:0/")
    (kv,) = [s for s in secs if s["name"] == "kvcache"]
    assert kv["counters"]["chunks_mapped"] >= 1 and kv["labels"]["backend"] == "host"
    (engine,) = [s for s in secs if s["name"] == "multipath"]
    assert engine["labels"]["engine"] == "host:0" and engine["counters"]["calls"] >= 1


def test_map_and_png_show_the_allocation(program, tmp_path):
    code, out, err = run_cli("map", str(program.pid))
    assert code == 0, err
    assert "no allocator" not in out and "1.00 GiB" in out
    path = str(tmp_path / "map.png")
    code, out, err = run_cli("map", str(program.pid), "--png", path)
    assert code == 0, err
    assert "1 segments" in out and png_size(path)[0] == 1600


def test_top_shows_the_allocation(program):
    code, out, err = run_cli("top", str(program.pid), "-n", "1")
    assert code == 0, err
    (row,) = [line for line in out.splitlines() if line.strip().startswith(str(program.pid))]
    assert "1.00 GiB / 1.00 GiB" in row


def test_a_process_without_allocator_is_not_shown_as_zero(empty_program, tmp_path):
    code, out, _ = run_cli("ps")
    (row,) = [line for line in out.splitlines() if line.strip().startswith(str(empty_program.pid))]
    assert "0 B" not in row and " - " in row
    assert "publishes no allocator" in " ".join(out.split())
    code, out, _ = run_cli("top", str(empty_program.pid), "-n", "1")
    (row,) = [line for line in out.splitlines() if line.strip().startswith(str(empty_program.pid))]
    assert "0 B" not in row and "0.00" not in row
    code, out, _ = run_cli("map", str(empty_program.pid))
    assert code == 0 and f"pid {empty_program.pid} publishes no allocator" in " ".join(out.split())
    code, out, _ = run_cli("stats", str(empty_program.pid), "--json")
    assert not [s for s in json.loads(out)["sections"] if s["name"] == "allocator"]


def test_map_png_wants_a_png_name(program, tmp_path):
    path = tmp_path / "x.jpg"
    code, _, err = run_cli("map", str(program.pid), "--png", str(path))
    assert code == 1 and "name the file *.png" in err
    assert not path.exists()


def test_top_iterations_must_be_positive(program):
    code, out, err = run_cli("top", "-n", "0", timeout=60)
    assert code == 1 and "--iterations must be at least 1" in err and "glake top" not in out


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def _read_until(fd: int, needle: bytes, limit: float = 60.0) -> bytes:
    """What the terminal shows until ``needle`` appears (``limit`` only guards against a hang)."""
    seen = b""
    deadline = time.monotonic() + limit
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} never appeared; the terminal showed: {seen[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the pty closed: the process is gone
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_top_on_an_80_column_terminal_keeps_figures_whole_and_quits_on_q(program):
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 80, 0, 0))
    env = dict(os.environ, TERM="xterm", COLUMNS="80", LINES="40")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    from .test_cli import GLAKE

    proc = subprocess.Popen(GLAKE + ["top", str(program.pid), "--interval", "0.3"], stdin=slave, stdout=slave,
                            stderr=slave, env=env, close_fds=True, start_new_session=True)
    os.close(slave)
    try:
        screen = _read_until(master, b"not reported").decode(errors="replace")  # the whole first frame
        _read_until(master, b"frame 2")  # it refreshes
        os.write(master, b"q")
        assert proc.wait(60) == 0  # q quit it (no -n given: it would otherwise run for ever)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        os.close(master)
    lines = [ANSI.sub("", line) for line in screen.split("\n")]
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    (row,) = {line for line in lines if line.strip().startswith(str(program.pid))}
    assert "1.00 GiB / 1.00 GiB" in row and "…" not in row.split("child")[0]
    header = next(line for line in lines if "PID" in line and "ALLOCATED / PEAK" in line)
    for col in ("RESERVED / PEAK", "FRAG"):
        assert col in header
    words = " ".join(ANSI.sub("", screen).split())
    assert "q quits" in words and "not shown at this width: DEV," in words
