"""The dedup broker's messages: one JSON object per SOCK_SEQPACKET datagram, a chunk's fd riding along
(SCM_RIGHTS)."""

from __future__ import annotations

import json
import os
import socket
from typing import List, Optional, Tuple

MAX_MESSAGE = 1 << 16
SOCKET_ENV = "GLAKE_DEDUP_SOCKET"  # overrides the socket path (tests, several brokers)


def socket_path() -> str:
    """The broker's socket: ``$GLAKE_DEDUP_SOCKET``, else ``dedup.sock`` in the per-user runtime folder."""
    from glake._runtime import runtime_dir

    return os.environ.get(SOCKET_ENV) or os.path.join(runtime_dir(), "dedup.sock")


def send(sock: socket.socket, msg: dict, fd: Optional[int] = None) -> None:
    """Sends one message (and `fd`, which stays the caller's)."""
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"dedup message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    socket.send_fds(sock, [data], [fd] if fd is not None else [])


def recv(sock: socket.socket) -> Tuple[Optional[dict], List[int]]:
    """One message and the fds it carried (now the caller's); (None, []) when the peer closed."""
    data, fds, flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
    if flags & socket.MSG_CTRUNC:  # the kernel dropped fds: this process is at its open-files limit
        for fd in fds:
            os.close(fd)
        raise ValueError("a file descriptor was dropped on the way (MSG_CTRUNC): too many open files "
                         "(raise `ulimit -n`)")
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        msg = json.loads(data)
        if not isinstance(msg, dict):
            raise ValueError("not an object")
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    return msg, fds
