"""The shim's C++ client of the dedup broker (csrc/shim/dedup_broker.cpp) against the real Python broker
(glake/dedup/broker.py): it speaks glake/dedup/client.py's protocol (memfd chunks over SCM_RIGHTS),
turns the broker's error replies into exceptions with the broker's words, reconnects once after a
broker restart and publishes again what it holds, and leaks no fd on any path."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glake.dedup import wire
from glake.dedup.client import BrokerClient
from tests.shim.conftest import PROGRAMS, ROOT, compile_cpp

TIMEOUT = 10
SIZE = 4096


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    """tests/shim/programs/dedup_broker_client.cpp, linked with the client's sources."""
    sources = [PROGRAMS / "dedup_broker_client.cpp", ROOT / "csrc/shim/dedup_broker.cpp",
               ROOT / "csrc/shim/runtime_dir.cpp", ROOT / "csrc/common/error.cpp"]
    return compile_cpp(tmp_path_factory.mktemp("dedup_client") / "dedup_broker_client", sources, "-Wall", "-Wextra",
                       "-pthread", f"-I{ROOT / 'csrc'}", f"-I{ROOT}")


class Broker:
    """`python -m glake.dedup.broker --socket PATH` in a process of its own."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "glake.dedup.broker", "--socket", self.path,
                                      "--idle-exit", "0"], cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + TIMEOUT
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                try:
                    s.connect(self.path)
                    return
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"no broker on {self.path}: {self.proc.stderr.read()!r}") from None
            time.sleep(0.02)

    def kill(self) -> None:
        """Kills the broker at once (SIGKILL: its connections close, its chunks go)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(TIMEOUT)
        self.proc.stderr.close()

    def stats(self) -> dict:
        c = BrokerClient(self.path, autostart=False)
        try:
            return c.stats()
        finally:
            c.close()

    def lookup(self, keys) -> list:
        """The first byte of each key's chunk as this (Python) process gets it, or None."""
        c = BrokerClient(self.path, autostart=False)
        try:
            fds = c.lookup(keys)
        finally:
            c.close()
        out = []
        for fd in fds:
            out.append(None if fd is None else os.pread(fd, 1, 0)[0])
            if fd is not None:
                os.close(fd)
        return out


@pytest.fixture
def broker(tmp_path):
    d = tmp_path / "rt"
    d.mkdir(mode=0o700)
    b = Broker(str(d / "dedup.sock"))
    b.start()
    yield b
    if b.proc.poll() is None:
        b.kill()


class Driver:
    """The C++ program: one command, one answer line."""

    def __init__(self, program: Path, env: dict) -> None:
        self.proc = subprocess.Popen([str(program)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)

    def answer(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        out = self.proc.stdout.readline() if ready else ""
        if not out:
            self.proc.kill()
            raise RuntimeError(f"the driver gave no answer to {line!r} (exit {self.proc.wait(TIMEOUT)})")
        return out.rstrip("\n")

    def ok(self, line: str) -> list:
        """The answer's values (ints where they are)."""
        out = self.answer(line)
        assert out.startswith("ok"), f"{line!r}: {out}"
        return [int(w) if w.lstrip("-").isdigit() else w for w in out.split()[1:]]

    def error(self, line: str) -> str:
        out = self.answer(line)
        assert out.startswith("error "), f"{line!r} should fail: {out}"
        return out[len("error "):]

    def quit(self) -> int:
        """Destroys the client, closes the memfds: the fds still open."""
        (fds,) = self.ok("quit")
        self.proc.wait(TIMEOUT)
        return fds


@pytest.fixture
def drivers(program, broker):
    made = []

    def make():
        env = dict(os.environ, **{wire.SOCKET_ENV: broker.path})
        made.append(Driver(program, env))
        return made[-1]
    yield make
    for d in made:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(TIMEOUT)


def test_lookup_publish_hold_and_drop_speak_the_python_brokers_protocol(broker, drivers):
    a = drivers()
    (before,) = a.ok("fds")
    a.ok(f"memfd m1 {SIZE} 17")
    a.ok(f"memfd m2 {SIZE} 34")
    assert a.ok("lookup k1") == [-1]
    assert a.ok(f"publish {SIZE} k1=m1") == [-1]  # canonical now, held once
    assert broker.stats()["chunks"] == 1 and broker.stats()["holds"] == 1
    assert a.ok(f"publish {SIZE} k1=m2") == [17]  # the first one's bytes, through the fd it got back
    assert broker.stats()["holds"] == 1
    assert a.ok("lookup k1 nope") == [17, -1]
    assert broker.lookup(["k1"]) == [17]  # a Python client finds the C++ client's chunk
    assert a.ok(f"hold {SIZE} k1=m2 nope=m2") == [1, 0]
    assert broker.stats()["holds"] == 2
    a.ok("drop k1")
    assert broker.stats()["holds"] == 1
    a.ok("drop k1")
    assert broker.stats() | {"pid": 0} == {"pid": 0, "chunks": 0, "bytes": 0, "holds": 0, "clients": 2}
    assert a.ok("lookup k1") == [-1]
    # Quotes, backslashes and control bytes in keys are escaped on the wire: the broker reads the same key.
    assert a.ok(f"publish {SIZE} a%22b%5cc%01d=m2") == [-1]
    assert broker.lookup(['a"b\\c\x01d']) == [34]
    assert a.ok("reconnects") == [0]
    # A forked child connects on its own: what it publishes goes with its connection when it exits.
    assert a.ok(f"fork publish {SIZE} kc=m1 k1=m1") == [-1, -1]
    assert a.ok("lookup kc") == [-1]
    assert broker.stats()["holds"] == 1  # the parent's own hold (a"b\\c\x01d) stays
    assert a.ok("reconnects") == [0]
    assert a.quit() == before


def test_errors_say_which_socket_and_op_and_carry_the_brokers_words(broker, drivers):
    a = drivers()
    (before,) = a.ok("fds")
    a.ok(f"memfd m1 {SIZE} 17")
    assert a.ok(f"publish {SIZE} k1=m1 k2=m1") == [-1, -1]
    # A key that is not UTF-8: the broker cannot read the request and answers with an error.
    err = a.error("lookup bad%ff")
    assert err.startswith(f"dedup broker on {broker.path}, lookup: the broker answered: ")
    assert "'utf-8' codec can't decode byte 0xff" in err
    assert a.ok("lookup k1") == [17]  # the connection serves on
    # More keys than one request carries: refused before anything is sent.
    assert "at most 64 per request" in a.error("lookup " + " ".join(f"k{i}" for i in range(65)))
    # Room for one more fd only: the kernel drops the second (MSG_CTRUNC); the one that came is closed.
    err = a.error("ctrunc k1 k2")
    assert err == (f"dedup broker on {broker.path}, lookup: a file descriptor was dropped on the way (MSG_CTRUNC): "
                   "too many open files (raise `ulimit -n`)")
    # That closed the connection (the broker forgot its holds): the next request publishes them again.
    assert a.ok("lookup k1 k2") == [17, 17]
    assert a.ok("reconnects") == [1]
    assert broker.stats()["holds"] == 2
    broker.kill()
    a.ok("drop k2")  # best effort: the broker that is gone dropped it with the connection
    err = a.error("lookup k1")
    assert err.startswith(f"no dedup broker answers on {broker.path}: start one with `glake dedupd`")
    assert a.quit() == before


def test_a_restarted_broker_relearns_the_chunks_the_client_holds(broker, drivers):
    a, b = drivers(), drivers()
    (before,) = a.ok("fds")
    a.ok(f"memfd m1 {SIZE} 51")
    a.ok(f"memfd m2 {SIZE} 68")
    a.ok(f"memfd m3 {SIZE} 85")
    b.ok(f"memfd mb {SIZE} 51")
    assert a.ok(f"publish {SIZE} k1=m1 k2=m2 k3=m3") == [-1, -1, -1]
    assert a.ok(f"hold {SIZE} k1=m2") == [1]  # a's second hold on k1, through another chunk of its own
    assert b.ok("lookup k1") == [51]
    assert b.ok(f"hold {SIZE} k1=mb") == [1]  # b compared the bytes and maps its own copy
    a.ok("gone m3")  # k3's only holder in a let go of its chunk: nothing to publish again
    assert broker.stats()["holds"] == 5
    broker.kill()
    broker.start()
    assert broker.stats()["chunks"] == 0
    assert a.ok("lookup other") == [-1]  # reconnects: k1 (published, one more hold) and k2 again
    assert a.ok("reconnects") == [1]
    stats = broker.stats()
    assert stats["chunks"] == 2 and stats["holds"] == 3
    assert b.ok("lookup other") == [-1]  # b's publish of k1 finds a's first: it holds that one
    assert b.ok("reconnects") == [1]
    assert broker.stats()["holds"] == 4
    c = drivers()  # a new process finds them
    assert c.ok("lookup k1 k2 k3") == [51, 68, -1]
    assert c.quit() is not None
    a.ok("drop k1")
    a.ok("drop k1")
    b.ok("drop k1")
    a.ok("drop k2")
    assert broker.stats()["chunks"] == 0
    assert b.quit() is not None
    assert a.quit() == before


def test_the_default_socket_is_wire_socket_path(program, tmp_path, monkeypatch):
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.delenv(wire.SOCKET_ENV, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    d = Driver(program, dict(os.environ))
    assert d.ok("path") == [wire.socket_path()] == [str(xdg / "glake" / "dedup-v2.sock")]
    d.quit()
    d = Driver(program, dict(os.environ, **{wire.SOCKET_ENV: str(tmp_path / "elsewhere.sock")}))
    assert d.ok("path") == [str(tmp_path / "elsewhere.sock")]
    d.quit()


def test_a_drop_forgets_the_hold_whose_chunk_is_gone(broker, drivers):
    """Two holds of one key in a process; the holder that drops has let go of its chunk first. The hold
    kept must be the other one, or a broker restart would lose the key (a gone maker exports nothing)."""
    a = drivers()
    a.ok(f"memfd first {SIZE} 51")
    a.ok(f"memfd second {SIZE} 51")
    assert a.ok(f"publish {SIZE} k=first") == [-1]
    assert a.ok(f"hold {SIZE} k=second") == [1]
    a.ok("gone first")  # the first holder unmaps its chunk, then drops its hold
    a.ok("drop k")
    broker.kill()
    broker.start()
    assert a.ok("lookup other") == [-1]  # reconnects and publishes again what it holds: k, by the second
    assert broker.stats()["chunks"] == 1
    assert drivers().ok("lookup k") == [51]
