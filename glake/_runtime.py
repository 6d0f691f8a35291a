"""The per-user runtime directory and the peer check of glake's unix sockets (dedup broker, ...).
"""

from __future__ import annotations

import os
import socket
import stat
import struct

PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def runtime_dir() -> str:
    """``$XDG_RUNTIME_DIR/glake`` (else ``/tmp/glake-<uid>``), created mode 0700 and checked to be
    this user's and closed to others.

    Raises
    ------
    PermissionError
        The folder exists but belongs to another user or is open to group or others.
    """
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(base, "glake") if base and os.path.isdir(base) else f"/tmp/glake-{os.getuid()}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} must be a folder of uid {os.getuid()} with mode 0700 "
                              f"(it has uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); remove it or fix it")
    return path


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    _pid, uid, _gid = PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
    return uid


def peer_pid(conn: socket.socket) -> int:
    """The pid of the process at the other end of a unix socket (SO_PEERCRED)."""
    pid, _uid, _gid = PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
    return pid
