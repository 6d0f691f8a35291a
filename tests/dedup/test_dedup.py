"""Dedup on the host backend: processes with the same bytes share them through the broker (real fds
over SCM_RIGHTS, real shared pages), and nothing else is ever shared."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

import glake.dedup  # noqa: E402
from glake import InvalidArgumentError, core  # noqa: E402
from glake._runtime import runtime_dir  # noqa: E402
from glake.dedup import wire  # noqa: E402
from glake.dedup.broker import Broker  # noqa: E402
from glake.dedup.client import BrokerClient  # noqa: E402
from tests.dedup.util import CHUNKS, ROOT, broker, stop_broker  # noqa: E402

def test_four_processes_share_the_same_bytes_and_read_them_back(sock, workers):
    ws = workers(4)
    for w in ws:
        w.ask("fill 7")
    stats = [w.ask("share") for w in ws]
    assert sum(s["chunks_canonical"] for s in stats) == CHUNKS        # one copy of each chunk ...
    assert sum(s["chunks_imported"] for s in stats) == 3 * CHUNKS     # ... that the three others map
    assert all(s["shared_bytes"] == CHUNKS * (2 << 20) for s in stats)
    assert all(w.ask("check")["intact"] for w in ws)
    b = broker(sock)
    assert b["chunks"] == CHUNKS and b["holds"] == 4 * CHUNKS and b["clients"] == 5  # 4 workers and this query
    for w in ws:
        w.close()
    deadline = time.monotonic() + 10
    while broker(sock)["chunks"] and time.monotonic() < deadline:  # everyone gone: the broker freed them
        time.sleep(0.05)
    assert broker(sock)["chunks"] == 0


def test_one_byte_different_keeps_that_chunk_private(sock, workers):
    a, b, c = workers(3)
    a.ask("fill 7")
    b.ask("fill 7")
    c.ask("fill 7 3")  # byte 12345 of chunk 3 differs in c
    sa, sb, sc = (w.ask("share") for w in (a, b, c))
    assert sc["chunks_imported"] == CHUNKS - 1 and sc["chunks_canonical"] == 1  # its chunk 3 is nobody else's
    assert sa["chunks_imported"] + sb["chunks_imported"] == CHUNKS
    assert all(w.ask("check")["intact"] for w in (a, b, c))
    assert broker(sock)["chunks"] == CHUNKS + 1


def test_a_forced_hash_collision_never_shares_unequal_bytes(sock, workers):
    a, b = workers(2, env={"GLAKE_DEDUP_TEST_COLLIDE": "1"})  # every chunk hashes the same
    a.ask("fill 7")
    b.ask("fill 8")
    sa, sb = a.ask("share"), b.ask("share")
    assert sa["chunks_imported"] == 0 and sb["chunks_imported"] == 0
    assert a.ask("check")["intact"] and b.ask("check")["intact"]
    assert a.ask("stats")["mismatches"] == CHUNKS - 1 and b.ask("stats")["mismatches"] == CHUNKS
    c, = workers(1, env={"GLAKE_DEDUP_TEST_COLLIDE": "1"})
    c.ask("fill 7")  # equal bytes still share, whatever the hash: only a's canonical chunk 0 is under the key
    assert c.ask("share")["chunks_imported"] == 1 and c.ask("check")["intact"]


def test_importer_reads_on_after_the_exporter_is_killed(sock, workers):
    a, b = workers(2)
    a.ask("fill 7")
    assert a.ask("share")["chunks_canonical"] == CHUNKS
    b.ask("fill 7")
    assert b.ask("share")["chunks_imported"] == CHUNKS
    a.kill()
    time.sleep(0.2)
    assert b.ask("check")["intact"]
    assert broker(sock)["chunks"] == CHUNKS  # b holds them
    c, = workers(1)
    c.ask("fill 7")
    assert c.ask("share")["chunks_imported"] == CHUNKS and c.ask("check")["intact"]  # from a's chunks, a dead


def test_a_broker_restart_loses_nothing_mapped(sock, workers):
    a, b = workers(2)
    for w in (a, b):
        w.ask("fill 7")
        w.ask("share")
    pid = broker(sock)["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    assert a.ask("check")["intact"] and b.ask("check")["intact"]
    c, = workers(1)
    c.ask("fill 9")
    c.ask("share")  # starts a new broker
    assert broker(sock)["pid"] != pid
    a.ask("fill 9")  # a's next request reconnects and publishes what it holds again
    assert a.ask("share")["chunks_imported"] == CHUNKS
    assert broker(sock)["chunks"] == 2 * CHUNKS  # seed 9's (c) and seed 7's again (a)
    d, = workers(1)
    d.ask("fill 7")
    assert d.ask("share")["chunks_imported"] == CHUNKS and d.ask("check")["intact"]


def test_a_write_to_a_shared_chunk_faults_and_changes_no_other_process(sock, workers):
    a, b = workers(2)
    for w in (a, b):
        w.ask("fill 7")
        w.ask("share")
    a.proc.stdin.write("write\n")
    a.proc.stdin.flush()
    assert a.proc.wait(20) == -signal.SIGSEGV
    assert b.ask("check")["intact"]


def test_the_socket_and_its_folder_are_the_users(sock, workers, tmp_path, monkeypatch):
    w, = workers(1)
    w.ask("fill 7")
    w.ask("share")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    loose = tmp_path / "xdg"
    loose.mkdir()
    (loose / "glake").mkdir(mode=0o755)
    os.chmod(loose / "glake", 0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(loose))
    with pytest.raises(PermissionError, match="0700"):
        runtime_dir()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
def test_the_broker_refuses_another_uid():
    import tempfile

    d = tempfile.mkdtemp(prefix="glake-uid-test-")
    os.chmod(d, 0o711)  # the other uid may reach the socket: the peer check alone must refuse it
    path = os.path.join(d, "dedup.sock")
    proc = subprocess.Popen([sys.executable, "-m", "glake.dedup.broker", "--socket", path],
                            env=dict(os.environ, PYTHONPATH=ROOT), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.chmod(path, 0o666)
        code = ("import os, socket, sys; sys.path.insert(0, %r); from glake.dedup import wire; os.setuid(65534); "
                "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect(%r); print(wire.recv(s)[0])"
                ) % (ROOT, path)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert "refuses uid 65534" in out.stdout, out.stderr
        assert broker(path)["clients"] == 1  # only this query: the other uid got no connection
    finally:
        stop_broker(path)
        proc.wait(20)


def test_modules_share_their_weights_and_compute_the_same(sock, workers):
    a, b = workers(2)
    ra, rb = a.ask("module 3"), b.ask("module 3")
    assert ra["same_output"] and rb["same_output"]
    assert rb["saved_bytes"] == rb["shared_bytes"] > 0 and rb["private_bytes"] == 0


def test_share_refuses_weights_that_require_grad_and_foreign_memory(sock):
    with pytest.raises(InvalidArgumentError, match="requires grad"):
        glake.dedup.share(torch.nn.Linear(4, 4))
    t = torch.zeros(1 << 22, dtype=torch.uint8)
    with pytest.raises(InvalidArgumentError, match="not in a dedup arena"):
        glake.dedup.share_buffer(t.data_ptr(), t.numel())


def test_share_buffer_shares_only_whole_chunks(sock):
    g = 2 << 20
    with glake.dedup.Arena(4 * g, backend="host") as a, glake.dedup.Arena(4 * g, backend="host") as b:
        for x in (a, b):
            x.tensor().copy_(torch.arange(4 * g, dtype=torch.int32).to(torch.uint8) ^ 0x5A)
            x.tensor()[torch.arange(4) * g] = torch.arange(4, dtype=torch.uint8)  # four distinct chunks
        assert glake.dedup.share_buffer(a.ptr + 100, 3 * g) == 2 * g  # chunks 1 and 2 are covered whole
        assert glake.dedup.share_buffer(b.ptr, 4 * g) == 4 * g
        assert b.stats()["chunks_imported"] == 2 and torch.equal(a.tensor(), b.tensor())
    assert glake.dedup.stats()["arenas"] == 0


def test_the_broker_answers_bad_requests_with_errors(tmp_path):
    b = Broker(str(tmp_path / "s.sock"))
    with pytest.raises(ValueError):
        b.handle(1, {"op": "nonsense"}, [])
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ValueError, match="carries no fd"):
        b.handle(1, {"op": "lookup", "key": "k"}, [r])
    os.close(r)  # handle() kept none of the fds it raised on: they are the caller's
    assert b.handle(1, {"op": "drop", "key": "k"}, []) == ({"ok": False}, [])
    with pytest.raises(ValueError, match="at most 64"):
        b.handle(1, {"op": "lookup", "keys": [str(i) for i in range(65)]}, [])
    with pytest.raises(ValueError, match="one fd per key"):
        b.handle(1, {"op": "publish", "keys": ["a", "b"], "size": 1}, [])


def test_the_broker_answers_a_batch_key_by_key_with_fds_in_key_order(tmp_path):
    b = Broker(str(tmp_path / "s.sock"))
    pipes = [os.pipe() for _ in range(3)]
    try:
        reply, fds = b.handle(1, {"op": "publish", "keys": ["a", "b"], "size": 8}, [pipes[0][0], pipes[1][0]])
        assert reply == {"canonical": [True, True]} and fds == []
        # "a" is known: the fd offered for it is closed and the canonical one comes back; "c" is new
        reply, fds = b.handle(2, {"op": "publish", "keys": ["c", "a"], "size": 8}, [pipes[2][0], os.dup(pipes[0][1])])
        assert reply == {"canonical": [True, False]} and fds == [pipes[0][0]]
        reply, fds = b.handle(2, {"op": "lookup", "keys": ["x", "b", "c"]}, [])
        assert reply == {"found": [False, True, True]} and fds == [pipes[1][0], pipes[2][0]]
        assert b.handle(2, {"op": "hold", "keys": ["b", "x", "a"]}, []) == ({"ok": [True, False, True]}, [])
        assert dict(b.entries["a"].holders) == {1: 1, 2: 1} and dict(b.entries["c"].holders) == {2: 1}
    finally:
        b.close()  # closes the fds it kept (the read ends)
        for _r, w in pipes:
            os.close(w)


def test_a_second_broker_on_the_same_socket_steps_aside(tmp_path):
    path = str(tmp_path / "s.sock")
    first = Broker(path)
    assert first.acquire()
    try:
        out = subprocess.run([sys.executable, "-m", "glake.dedup.broker", "--socket", path], capture_output=True,
                             text=True, timeout=30, env=dict(os.environ, PYTHONPATH=ROOT))
        assert out.returncode == 0 and "already serves" in out.stderr
    finally:
        first.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(OSError):
        s.connect(path)
    s.close()


def test_glake_dedupd_status_and_stop(sock, workers):
    cli = [sys.executable, "-m", "glake.cli", "dedupd"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(cli + ["--status"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1 and "no dedup broker answers" in out.stderr
    w, = workers(1)
    w.ask("fill 7")
    w.ask("share")
    out = subprocess.run(cli + ["--status"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and f"{CHUNKS} chunk(s)" in out.stdout and "by 1 other client(s)" in out.stdout
    out = subprocess.run(cli + ["--stop"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and "stopped" in out.stdout
    assert w.ask("check")["intact"]  # what it mapped stays


def test_an_arena_dropped_without_close_gives_its_holds_back(sock):
    import gc

    a = glake.dedup.Arena(2 * (2 << 20), backend="host")
    a.tensor()[:] = 3
    a.share()
    assert broker(sock)["holds"] == 2
    del a
    gc.collect()
    assert broker(sock)["chunks"] == 0


def test_a_bad_message_with_fds_is_answered_and_the_broker_serves_on(sock, workers):
    w, = workers(1)
    w.ask("fill 7")
    w.ask("share")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sock)
    r, x = os.pipe()
    try:
        wire.send(s, {"op": "lookup", "keys": ["k"]}, [r])  # an fd where none belongs
        reply, fds = wire.recv(s)
        assert "carries no fd" in reply["error"] and fds == []
        s.send(b'{"op": "' + b"x" * 70000 + b'"}')  # longer than a message may be: cut, unreadable
        assert "error" in wire.recv(s)[0]
        wire.send(s, {"op": "nonsense"})
        assert "unknown op" in wire.recv(s)[0]["error"]
    finally:
        for f in (r, x):
            os.close(f)
        s.close()
    assert broker(sock)["chunks"] == CHUNKS and w.ask("check")["intact"]


def test_a_broker_refusal_keeps_the_chunk_private(sock, monkeypatch):
    from glake.dedup import client as client_mod
    from glake.errors import GlakeError

    def refuse(self, keys, size, makers):
        raise GlakeError("dedup broker: a file descriptor was dropped on the way (MSG_CTRUNC)")
    monkeypatch.setattr(client_mod.BrokerClient, "publish", refuse)
    with glake.dedup.Arena(2 << 20, backend="host") as a:
        a.tensor()[:] = 9
        assert a.share() == 0 and a.stats()["chunks_private"] == 1
        assert glake.dedup.stats()["broker_errors"] >= 1 and torch.all(a.tensor() == 9)


def test_a_drop_asked_for_during_a_round_trip_is_sent_before_the_next_request(sock):
    import threading

    c = BrokerClient(sock)
    with glake.dedup.Arena(2 << 20, backend="host") as a:
        a.tensor()[:] = 4
        a.share()
        key, maker = a._keys[0]
        assert c.hold([key], [maker], a.chunk) == [True]
        assert broker(sock)["holds"] == 2
        c._busy_thread = threading.get_ident()  # as if a GC finalizer ran inside a round trip
        c.drop(key, maker)
        c._busy_thread = None
        assert list(c._drops) and broker(sock)["holds"] == 2  # queued, not sent mid-reply
        c.stats()
        assert not c._drops and broker(sock)["holds"] == 1


def test_suspend_releases_the_arenas_chunks_and_resume_maps_them_back(sock):
    from glake import _C

    g = 2 << 20
    pattern = (torch.arange(3 * g, dtype=torch.int32) * 7).to(torch.uint8)
    pattern[torch.arange(3) * g] = torch.arange(3, dtype=torch.uint8)  # three distinct chunks
    with glake.dedup.Arena(3 * g, backend="host") as a, glake.dedup.Arena(3 * g, backend="host") as b:
        a.tensor().copy_(pattern)
        b.tensor().copy_(pattern)
        a.share(g, 2 * g)   # chunks 1 and 2 canonical in a; chunk 0 private
        b.share()           # b imports 1 and 2; its chunk 0 becomes canonical
        a.tensor()[5] = 99  # a's private chunk changes after sharing
        expect_a, expect_b = a.tensor().clone(), b.tensor().clone()
        holds = broker(sock)["holds"]
        before = _C.stats("host")["physical_bytes.current"]
        assert glake.suspend() == [0]
        assert a.suspended and b.suspended
        # every handle of the two arenas is released; the broker's fds keep the shared chunks for the resume
        assert _C.stats("host")["physical_bytes.current"] == before - 6 * g
        assert broker(sock)["holds"] == holds
        with pytest.raises(InvalidArgumentError, match="suspended"):
            a.share()
        assert glake.resume() == [0]
        assert not a.suspended and not b.suspended
        assert torch.equal(a.tensor(), expect_a) and torch.equal(b.tensor(), expect_b)
        assert a.stats() == {"shared_bytes": 2 * g, "saved_bytes": 0, "private_bytes": g, "chunks_canonical": 2,
                             "chunks_imported": 0, "chunks_private": 1}
        a.tensor()[6] = 42  # the private chunk is writable again
        assert int(a.tensor()[6]) == 42
        glake.suspend(discard=[b])
        glake.resume()
        assert torch.equal(b.tensor(), expect_b)  # b has no private chunk: nothing was lost by discarding
        glake.suspend(discard=[a])
        glake.resume()
        assert not a.tensor()[:g].any(), "a discarded private chunk comes back zeroed"
        assert torch.equal(a.tensor()[g:], expect_a[g:])
    assert broker(sock)["chunks"] == 0


def test_a_resume_whose_shared_chunk_is_gone_raises_stays_suspended_and_keeps_nothing(sock):
    from glake import _C
    from glake.errors import GlakeError

    g = 2 << 20
    with glake.dedup.Arena(2 * g, backend="host") as a:
        a.tensor()[:g] = 1
        a.tensor()[g:] = 2
        a.share(0, g)  # chunk 0 shared (canonical), chunk 1 private
        a.suspend()
        suspended = _C.stats("host")["physical_bytes.current"]
        stop_broker(sock)  # its only holder is suspended: the broker's fd was the last handle
        with pytest.raises(GlakeError, match="no longer has shared chunk 0"):
            a.resume()
        assert a.suspended and _C.stats("host")["physical_bytes.current"] == suspended  # nothing made is kept


class _FailingMaps:
    """A VirtualRange whose `fail_at`-th map raises as a driver out of memory would."""

    def __init__(self, real, fail_at: int) -> None:
        self.real, self.fail_at, self.maps = real, fail_at, 0

    def map(self, offset, chunk, set_access=True):
        self.maps += 1
        if self.maps == self.fail_at:
            raise glake.OutOfMemoryError("cuMemMap failed (injected)")
        return self.real.map(offset, chunk, set_access=set_access)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("where", ["scratch", "swap"])
def test_a_map_failing_mid_batch_leaves_every_chunk_readable_and_no_hold_behind(sock, where):
    g = 2 << 20
    with glake.dedup.Arena(3 * g, backend="host") as a:
        for i in range(3):
            a.tensor()[i * g:(i + 1) * g] = i + 1
        a.share()
        b = glake.dedup.Arena(3 * g, backend="host")
        b.tensor().copy_(a.tensor())
        if where == "scratch":  # the 2nd of the 3 chunks found fails to map where they are compared
            b._scratch = core.VirtualRange(64 * g, 0, "host")
            b._scratch_view = b._byte_view(b._scratch)
            b._scratch = _FailingMaps(b._scratch, 2)
        else:  # the 2nd of the 3 confirmed chunks fails to map in place of ours
            b.range = _FailingMaps(b.range, 2)
        with pytest.raises(glake.OutOfMemoryError, match="injected"):
            b.share()
        b.range = getattr(b.range, "real", b.range)
        b._scratch = getattr(b._scratch, "real", b._scratch)
        assert torch.equal(b.tensor(), a.tensor())  # every chunk mapped and readable, shared or not
        assert broker(sock)["holds"] == 3 + b._state.count("imported")
        assert b.share() == 3 * g  # and it can share again
        b.close()
        assert broker(sock)["holds"] == 3
