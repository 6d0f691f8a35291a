"""``glake dedupd``: the per-user broker that lets processes share identical read-only chunks.

It keeps one file descriptor per canonical chunk (a memfd on the host backend, a POSIX-fd handle of a
cuMemCreate allocation on cuda: holding it keeps the physical memory alive), keyed by the content key
the processes compute (backend, device, size, hash), and counts which connected process holds which
chunk. It never maps, reads or writes chunk memory and never calls a driver.

- A process *looks up* keys and gets the canonical chunks' fds (it compares the bytes itself before it
  maps a chunk, and then *holds* it), or *publishes* its own chunks as the canonical ones; each request
  carries up to 64 keys, so a process shares 128 MiB per round trip.
- A chunk stays with the broker while any connected process holds it; when the last holder drops it
  or dies (its connection closes), the broker closes its fd. Processes that mapped the chunk keep
  their own handles, so their memory stays valid whoever dies first, the broker included; a restarted
  broker relearns the chunks from the processes that hold them (they publish them again on reconnect).
- The socket is the user's (mode 0600 in a 0700 folder) and every connection's peer uid is checked.

    python -m glake.dedup.broker [--socket PATH] [--idle-exit SECONDS]

A second broker on the same socket exits at once (a lock file next to the socket).
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import os
import resource
import selectors
import socket
import sys
import time
from typing import Dict, List, Optional

from glake._runtime import peer_uid
from glake.dedup import wire


class Entry:
    """One canonical chunk: its fd, its size and how many holds each connection has on it."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.holders: collections.Counter = collections.Counter()


class Broker:
    """The broker's state and its event loop (one thread: every message is handled in turn)."""

    def __init__(self, path: str, idle_exit: float = 300.0) -> None:
        self.path, self.idle_exit = path, idle_exit
        self.entries: Dict[str, Entry] = {}
        self.clients: Dict[int, socket.socket] = {}
        self.sel = selectors.DefaultSelector()
        self.running = True
        self._lock_fd: Optional[int] = None
        self._listener: Optional[socket.socket] = None

    # ---- start and stop ------------------------------------------------------------------------

    def acquire(self) -> bool:
        """Takes the lock next to the socket; False when another broker holds it."""
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def listen(self) -> None:
        """Binds the socket (mode 0600; a stale one left by a dead broker is replaced)."""
        if os.path.exists(self.path):
            os.unlink(self.path)  # we hold the lock: whoever made it is gone
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
        self._listener = sock
        self.sel.register(sock, selectors.EVENT_READ, None)

    def close(self) -> None:
        for conn in list(self.clients.values()):
            self._disconnect(conn)
        for e in self.entries.values():
            os.close(e.fd)
        self.entries.clear()
        if self._listener is not None:
            self.sel.unregister(self._listener)
            self._listener.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    def serve_forever(self) -> None:
        idle_since = time.monotonic()
        while self.running:
            for key, _ in self.sel.select(timeout=1.0):
                if key.data is None:
                    self._accept()
                else:
                    self._on_message(key.fileobj)
            if self.clients or self.entries:
                idle_since = time.monotonic()
            elif self.idle_exit > 0 and time.monotonic() - idle_since > self.idle_exit:
                break

    # ---- connections ---------------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        uid = peer_uid(conn)
        if uid != os.getuid():
            try:
                wire.send(conn, {"error": f"the dedup broker of uid {os.getuid()} refuses uid {uid}"})
            finally:
                conn.close()
            return
        conn.setblocking(True)
        self.clients[conn.fileno()] = conn
        self.sel.register(conn, selectors.EVENT_READ, conn.fileno())

    def _disconnect(self, conn: socket.socket) -> None:
        cid = conn.fileno()
        self.sel.unregister(conn)
        del self.clients[cid]
        for key in [k for k, e in self.entries.items() if cid in e.holders]:
            del self.entries[key].holders[cid]
            self._drop_if_unheld(key)
        conn.close()

    def _drop_if_unheld(self, key: str) -> None:
        e = self.entries[key]
        if sum(e.holders.values()) <= 0:
            os.close(e.fd)
            del self.entries[key]

    def _on_message(self, conn: socket.socket) -> None:
        try:
            msg, fds = wire.recv(conn)
        except ValueError as e:  # unreadable, or fds dropped: answer, keep the connection
            self._reply(conn, {"error": str(e)[:500]})
            return
        except OSError:
            msg, fds = None, []
        if msg is None:
            self._disconnect(conn)
            return
        try:
            reply, out = self.handle(conn.fileno(), msg, fds)
        except Exception as e:  # noqa: BLE001  (a bad request is answered; the broker serves on)
            for f in fds:  # handle() stored none of them when it raised
                os.close(f)
            reply, out = {"error": f"bad request {repr(msg)[:200]}: {type(e).__name__}: {str(e)[:200]}"}, []
        self._reply(conn, reply, out)

    def _reply(self, conn: socket.socket, reply: dict, fds=()) -> None:
        try:
            wire.send(conn, reply, fds)
        except OSError:
            self._disconnect(conn)

    # ---- requests ------------------------------------------------------------------------------

    def handle(self, cid: int, msg: dict, fds: List[int]):
        """The reply (and the fds to send with it) to one request of connection `cid`. On success it owns
        `fds` (stored or closed); when it raises it has kept none of them (the caller closes them).

        ``lookup``, ``publish`` and ``hold`` take a list of ``keys`` (up to :data:`wire.MAX_FDS`) and answer
        one entry per key, with the fds of the chunks they hand out in the order of their keys."""
        op = msg["op"]
        if op != "publish" and fds:
            raise ValueError(f"{op} carries no fd")
        if op == "hello":
            return {"ok": True, "pid": os.getpid()}, []
        if op in ("lookup", "publish", "hold"):
            keys = [str(k) for k in msg["keys"]]
            if len(keys) > wire.MAX_FDS:
                raise ValueError(f"{op} of {len(keys)} keys: at most {wire.MAX_FDS} per request")
        if op == "lookup":
            found = [self.entries.get(k) for k in keys]
            return {"found": [e is not None for e in found]}, [e.fd for e in found if e is not None]
        if op == "publish":
            size = int(msg["size"])
            if len(fds) != len(keys):
                raise ValueError(f"publish carries one fd per key: {len(keys)} keys, {len(fds)} fds")
            canonical, others = [], []
            for key, fd in zip(keys, fds):
                e = self.entries.get(key)
                canonical.append(e is None)
                if e is not None:  # someone was first: the caller compares with that one
                    os.close(fd)
                    others.append(e.fd)
                else:
                    self.entries[key] = Entry(fd, size)
                    self.entries[key].holders[cid] += 1
            return {"canonical": canonical}, others
        if op == "hold":
            ok = []
            for key in keys:
                e = self.entries.get(key)
                if e is not None:
                    e.holders[cid] += 1
                ok.append(e is not None)
            return {"ok": ok}, []
        if op == "drop":
            key = str(msg["key"])
            e = self.entries.get(key)
            if e is None or e.holders[cid] <= 0:
                return {"ok": False}, []
            e.holders[cid] -= 1
            if e.holders[cid] == 0:
                del e.holders[cid]
            self._drop_if_unheld(key)
            return {"ok": True}, []
        if op == "stats":
            return {"pid": os.getpid(), "chunks": len(self.entries),
                    "bytes": sum(e.size for e in self.entries.values()),
                    "holds": sum(sum(e.holders.values()) for e in self.entries.values()),
                    "clients": len(self.clients)}, []
        if op == "shutdown":
            self.running = False
            return {"ok": True}, []
        raise ValueError(f"unknown op {op!r}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="glake dedupd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", default=None, help="socket path (default: $GLAKE_DEDUP_SOCKET, else the runtime folder's)")
    ap.add_argument("--idle-exit", type=float, default=300.0,
                    help="exit after this many seconds with no client and no chunk (0: never)")
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one fd per shared chunk: 8,000 for 16 GB
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass  # at the limit, publishes are answered with an error and the chunks stay private
    broker = Broker(args.socket or wire.socket_path(), args.idle_exit)
    if not broker.acquire():
        print(f"glake dedupd: a broker already serves {broker.path}", file=sys.stderr)
        return 0
    try:
        broker.listen()
        print(f"glake dedupd: pid {os.getpid()} on {broker.path}", file=sys.stderr, flush=True)
        broker.serve_forever()
    finally:
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
