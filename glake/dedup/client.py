"""This process's connection to the dedup broker (glake/dedup/broker.py), started on demand."""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

from glake.dedup import wire
from glake.errors import GlakeError

START_TIMEOUT_S = 15.0
#: Exports a chunk as a new fd (the caller closes it), or None once the chunk's owner is gone.
FdMaker = Callable[[], Optional[int]]


class BrokerClient:
    """Requests to the broker, one at a time. Starts the broker when none answers; after a broker
    restart it reconnects and publishes again every chunk this process holds, so the new broker knows
    them (nothing mapped is lost either way: each process holds its own handles).

    Every hold is recorded with the FdMaker of its holder (an arena's chunk), so that any live holder
    can export the chunk again for the republish. Drops asked for while a request is on the wire (a
    garbage-collected arena's finalizer, on this very thread) are queued and sent before the next
    request, so replies never get mixed up."""

    def __init__(self, path: Optional[str] = None, autostart: bool = True) -> None:
        self.path = path or wire.socket_path()
        self.autostart = autostart
        self._sock: Optional[socket.socket] = None
        self._lock = threading.RLock()
        self._busy_thread: Optional[int] = None  # the thread whose round trip is on the wire
        self._held: Dict[str, Tuple[int, List[FdMaker]]] = {}  # key -> (size, one maker per hold)
        self._drops: Deque[Tuple[str, FdMaker]] = collections.deque()
        self.reconnects = 0

    # ---- connection ----------------------------------------------------------------------------

    def _connect_once(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            raise
        return s

    def _start_broker(self) -> None:
        log = open(self.path + ".log", "ab")
        try:
            subprocess.Popen([sys.executable, "-m", "glake.dedup.broker", "--socket", self.path],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                             start_new_session=True, close_fds=True)
        finally:
            log.close()

    def _connect(self) -> socket.socket:
        try:
            return self._connect_once()
        except (FileNotFoundError, ConnectionRefusedError):
            if not self.autostart:
                raise GlakeError(f"no dedup broker answers on {self.path} (start one with `glake dedupd`)") from None
        self._start_broker()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                return self._connect_once()
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise GlakeError(f"the dedup broker did not start on {self.path} within {START_TIMEOUT_S:.0f} s "
                                     f"(see {self.path}.log)") from None
                time.sleep(0.05)

    def _ensure(self) -> None:
        if self._sock is None:
            self._sock = self._connect()
            if self._held:
                self._republish()

    def _republish(self) -> None:
        """Publishes every held chunk to a new broker (once per hold); on failure the connection is
        dropped and what is left is republished on the next attempt."""
        self.reconnects += 1
        for key, (size, makers) in list(self._held.items()):
            live: List[FdMaker] = []
            fd: Optional[int] = None
            for m in list(makers):  # a holder whose arena is gone no longer counts
                f = m()
                if f is None:
                    continue
                live.append(m)
                if fd is None:
                    fd = f
                else:
                    os.close(f)
            if fd is None:
                del self._held[key]
                continue
            try:
                _reply, others = self._roundtrip({"op": "publish", "keys": [key], "size": size}, [fd])
            finally:
                os.close(fd)
            for other in others:
                os.close(other)  # another holder published it first: the same bytes, hold that one
                self._roundtrip({"op": "hold", "keys": [key]})
            for _ in live[1:]:
                self._roundtrip({"op": "hold", "keys": [key]})
            self._held[key] = (size, live)

    def _roundtrip(self, msg: dict, fds: Sequence[int] = ()) -> Tuple[dict, List[int]]:
        self._busy_thread = threading.get_ident()
        try:
            wire.send(self._sock, msg, fds)
            reply, got = wire.recv(self._sock)
        finally:
            self._busy_thread = None
        if reply is None:
            raise ConnectionResetError("the dedup broker closed the connection")
        if "error" in reply:
            for fd in got:
                os.close(fd)
            raise GlakeError(f"dedup broker: {reply['error']}")
        return reply, got

    def _flush_drops(self) -> None:
        while self._drops:
            key, maker = self._drops.popleft()
            self._drop_now(key, maker)

    def request(self, msg: dict, fds: Sequence[int] = ()) -> Tuple[dict, List[int]]:
        """One request and its reply (with the fds it carried, now the caller's). Reconnects once."""
        with self._lock:
            for attempt in (0, 1):
                try:
                    self._ensure()
                    self._flush_drops()
                    return self._roundtrip(msg, fds)
                except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError):
                    self.close()
                    if attempt:
                        raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    # ---- the operations ------------------------------------------------------------------------

    def lookup(self, keys: Sequence[str]) -> List[Optional[int]]:
        """For each key, an fd of its canonical chunk (the caller's to close), or None."""
        reply, fds = self.request({"op": "lookup", "keys": list(keys)})
        it = iter(fds)
        return [next(it) if found else None for found in reply["found"]]

    def publish(self, keys: Sequence[str], size: int, makers: Sequence[FdMaker]) -> List[Optional[int]]:
        """Offers this process's chunks (``makers[i]()`` exports the one of ``keys[i]``) as the canonical
        ones. For each key, None: it is canonical now, held once by this process; else an fd of the chunk
        someone published first (the caller's to close)."""
        with self._lock:
            mine: List[int] = []
            try:
                for m in makers:
                    fd = m()
                    if fd is None:
                        raise GlakeError("dedup: a chunk to publish is gone")
                    mine.append(fd)
                reply, others = self.request({"op": "publish", "keys": list(keys), "size": size}, mine)
            finally:
                for fd in mine:
                    os.close(fd)
            it = iter(others)
            out: List[Optional[int]] = []
            for key, maker, canonical in zip(keys, makers, reply["canonical"]):
                if canonical:
                    self._remember(key, size, maker)
                out.append(None if canonical else next(it))
            return out

    def hold(self, keys: Sequence[str], makers: Sequence[FdMaker], size: int) -> List[bool]:
        """Counts one more hold of this process on each key (after it compared the bytes and mapped
        them); ``makers[i]`` exports that holder's chunk should the broker need it again. False where the
        chunk is gone (its last holder let go meanwhile)."""
        with self._lock:
            ok = [bool(x) for x in self.request({"op": "hold", "keys": list(keys)})[0]["ok"]]
            for key, maker, held in zip(keys, makers, ok):
                if held:
                    self._remember(key, size, maker)
            return ok

    def drop(self, key: str, maker: FdMaker) -> None:
        """Gives back the hold that ``maker``'s owner has on `key` (queued when a request is on the wire)."""
        if self._busy_thread == threading.get_ident():  # a finalizer run by GC in the middle of a round trip
            self._drops.append((key, maker))
            return
        with self._lock:
            self._flush_drops()
            self._drop_now(key, maker)

    def _drop_now(self, key: str, maker: FdMaker) -> None:
        size, makers = self._held.get(key, (0, []))
        if maker in makers:
            makers.remove(maker)
        if not makers:
            self._held.pop(key, None)
        if self._sock is not None:
            try:
                self._roundtrip({"op": "drop", "key": key})
            except (OSError, GlakeError):
                self.close()  # the broker is gone: it dropped our holds with the connection

    def stats(self) -> dict:
        """The broker's figures: chunks, bytes, holds, clients, pid."""
        return self.request({"op": "stats"})[0]

    def shutdown(self) -> None:
        """Asks the broker to exit (``glake dedupd --stop``): chunks mapped in processes stay valid."""
        self.request({"op": "shutdown"})

    def _remember(self, key: str, size: int, maker: FdMaker) -> None:
        self._held.setdefault(key, (size, []))[1].append(maker)


def stop_broker(path: str) -> bool:
    """Asks the broker on `path` to exit (``glake dedupd --stop``); False when none answers there."""
    try:
        BrokerClient(path, autostart=False).shutdown()
    except (GlakeError, OSError):
        return False
    return True


_client: Optional[BrokerClient] = None
_client_lock = threading.Lock()


def client() -> BrokerClient:
    """This process's broker client (one per process; a forked child gets its own)."""
    global _client
    with _client_lock:
        if _client is None or _client.path != wire.socket_path():
            _client = BrokerClient()
        return _client


def _forget_after_fork() -> None:
    global _client, _client_lock
    _client, _client_lock = None, threading.Lock()  # the parent's connection, holds and lock are the parent's


os.register_at_fork(after_in_child=_forget_after_fork)
