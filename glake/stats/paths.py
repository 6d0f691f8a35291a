"""Where glake processes put their stats sockets: one per process, in a per-user directory.

``$XDG_RUNTIME_DIR/glake`` when ``XDG_RUNTIME_DIR`` is set (systemd's per-user tmpfs, already
private), else ``/tmp/glake-$UID``. The directory is created 0700 and must be a real directory
owned by the user (not a link, not someone else's: a directory planted in /tmp by another user is
refused rather than used). Each process's socket is ``<pid>.sock``, mode 0600.
"""

from __future__ import annotations

import os
import re
import stat
from typing import List, Tuple

SOCKET_RE = re.compile(r"^(\d+)\.sock$")
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, the last a NUL


def runtime_dir() -> str:
    """The per-user directory of stats sockets (not created here)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "glake")
    return f"/tmp/glake-{os.getuid()}"


def socket_path(pid: int) -> str:
    """The socket of process ``pid``."""
    return os.path.join(runtime_dir(), f"{int(pid)}.sock")


def check_private_dir(path: str) -> None:
    """Raise PermissionError unless ``path`` is a directory (not a link) owned by this user;
    tighten its mode to 0700 if it is looser."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"glake stats: {path} is not a directory (a link or a file is not used)")
    if st.st_uid != os.getuid():
        raise PermissionError(f"glake stats: {path} belongs to uid {st.st_uid}, not to this user ({os.getuid()}); "
                              "refusing to put a socket there")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


def ensure_runtime_dir() -> str:
    """Create the socket directory (0700) if needed, check it is private, return it."""
    path = runtime_dir()
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_private_dir(path)
    return path


def list_sockets() -> List[Tuple[int, str]]:
    """``(pid, path)`` of every ``<pid>.sock`` in the runtime directory, by pid."""
    path = runtime_dir()
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = SOCKET_RE.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(path, name)))
    return sorted(out)


__all__ = ["runtime_dir", "socket_path", "check_private_dir", "ensure_runtime_dir", "list_sockets", "UNIX_PATH_MAX"]
