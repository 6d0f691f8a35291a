"""The dedup broker's messages: one JSON object per SOCK_SEQPACKET datagram, the fds of up to
:data:`MAX_FDS` chunks riding along (SCM_RIGHTS), in the order of the keys they answer."""

from __future__ import annotations

import json
import os
import socket
from typing import List, Optional, Sequence, Tuple

MAX_MESSAGE = 1 << 16
MAX_FDS = 64  # chunks per request (the kernel allows 253 fds per message)
#: The protocol's version, in the default socket's name: a broker of another glake version, still
#: serving the holds of its processes, keeps its own socket instead of refusing every request.
PROTOCOL = 2
SOCKET_ENV = "GLAKE_DEDUP_SOCKET"  # overrides the socket path (tests, several brokers)


def socket_path() -> str:
    """The broker's socket: ``$GLAKE_DEDUP_SOCKET``, else ``dedup-v2.sock`` (the protocol's version) in the
    per-user runtime folder."""
    from glake._runtime import runtime_dir

    return os.environ.get(SOCKET_ENV) or os.path.join(runtime_dir(), f"dedup-v{PROTOCOL}.sock")


def send(sock: socket.socket, msg: dict, fds: Sequence[int] = ()) -> None:
    """Sends one message (and `fds`, which stay the caller's)."""
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"dedup message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    if len(fds) > MAX_FDS:
        raise ValueError(f"dedup message with {len(fds)} fds exceeds {MAX_FDS}")
    socket.send_fds(sock, [data], list(fds))


def recv(sock: socket.socket) -> Tuple[Optional[dict], List[int]]:
    """One message and the fds it carried (now the caller's); (None, []) when the peer closed."""
    data, fds, flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
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
