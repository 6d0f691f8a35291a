"""This process's connection to the dedup broker (glake/dedup/broker.py), started on demand."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, Optional, Tuple

from glake.dedup import wire
from glake.errors import GlakeError

START_TIMEOUT_S = 15.0


class BrokerClient:
    """Requests to the broker, one at a time. Starts the broker when none answers; after a broker
    restart it reconnects and publishes again every chunk this process holds, so the new broker knows
    them (nothing mapped is lost either way: each process holds its own handles)."""

    def __init__(self, path: Optional[str] = None, autostart: bool = True) -> None:
        self.path = path or wire.socket_path()
        self.autostart = autostart
        self._sock: Optional[socket.socket] = None
        self._lock = threading.RLock()
        # key -> (holds, a function giving a new fd of the chunk or None once its owner is gone, size):
        # what to publish again on reconnect
        self._held: Dict[str, Tuple[int, Callable[[], Optional[int]], int]] = {}
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

    def _ensure(self) -> socket.socket:
        if self._sock is None:
            self._sock = self._connect()
            if self._held:
                self._republish()
        return self._sock

    def _republish(self) -> None:
        self.reconnects += 1
        held, self._held = self._held, {}
        for key, (holds, new_fd, size) in held.items():
            fd = new_fd()
            if fd is None:
                continue  # its arena is gone
            try:
                reply, other = self._roundtrip({"op": "publish", "key": key, "size": size}, fd)
            finally:
                os.close(fd)
            if other is not None:
                os.close(other)  # another holder published it first: the same bytes, hold that one
                self._roundtrip({"op": "hold", "key": key})
            for _ in range(holds - 1):
                self._roundtrip({"op": "hold", "key": key})
            self._held[key] = (holds, new_fd, size)

    def _roundtrip(self, msg: dict, fd: Optional[int] = None) -> Tuple[dict, Optional[int]]:
        wire.send(self._sock, msg, fd)
        reply, fds = wire.recv(self._sock)
        if reply is None:
            raise ConnectionResetError("the dedup broker closed the connection")
        for extra in fds[1:]:
            os.close(extra)
        if "error" in reply:
            if fds:
                os.close(fds[0])
            raise GlakeError(f"dedup broker: {reply['error']}")
        return reply, (fds[0] if fds else None)

    def request(self, msg: dict, fd: Optional[int] = None) -> Tuple[dict, Optional[int]]:
        """One request and its reply (with the fd it carried, now the caller's). Reconnects once."""
        with self._lock:
            for attempt in (0, 1):
                self._ensure()
                try:
                    return self._roundtrip(msg, fd)
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

    def lookup(self, key: str) -> Optional[int]:
        """An fd of the canonical chunk of `key` (the caller's to close), or None."""
        _reply, fd = self.request({"op": "lookup", "key": key})
        return fd

    def publish(self, key: str, size: int, new_fd: Callable[[], Optional[int]]) -> Optional[int]:
        """Offers this process's chunk (``new_fd()`` exports it) as the canonical one of `key`. None: it
        is canonical now, held once by this process; else an fd of the chunk someone published first."""
        with self._lock:
            fd = new_fd()
            try:
                reply, other = self.request({"op": "publish", "key": key, "size": size}, fd)
            finally:
                os.close(fd)
            if reply.get("canonical"):
                self._remember(key, new_fd, size)
                return None
            return other

    def hold(self, key: str, new_fd: Callable[[], Optional[int]], size: int) -> bool:
        """Counts one more hold of this process on `key` (after it compared the bytes and mapped them)."""
        with self._lock:
            ok = bool(self.request({"op": "hold", "key": key})[0].get("ok"))
            if ok:
                self._remember(key, new_fd, size)
            return ok

    def drop(self, key: str) -> None:
        """Gives back one hold on `key`."""
        with self._lock:
            holds, new_fd, size = self._held.get(key, (0, None, 0))
            if holds <= 1:
                self._held.pop(key, None)
            else:
                self._held[key] = (holds - 1, new_fd, size)
            if self._sock is not None:
                try:
                    self._roundtrip({"op": "drop", "key": key})
                except (OSError, GlakeError):
                    self.close()  # the broker is gone: it dropped our holds with the connection

    def stats(self) -> dict:
        """The broker's figures: chunks, bytes, holds, clients, pid."""
        return self.request({"op": "stats"})[0]

    def _remember(self, key: str, new_fd: Callable[[], Optional[int]], size: int) -> None:
        holds = self._held.get(key, (0, new_fd, size))[0]
        self._held[key] = (holds + 1, new_fd, size)


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
    global _client
    _client = None  # the parent's connection and holds are the parent's


os.register_at_fork(after_in_child=_forget_after_fork)
