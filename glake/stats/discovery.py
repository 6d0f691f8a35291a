"""Finding the live glake processes of this user, and cleaning up after dead ones.

Each process serving stats has ``<runtime dir>/<pid>.sock``; a process running the libcuda shim
has ``<runtime dir>/<pid>.shim`` instead (or as well), a shared-memory page (:mod:`glake.stats.shim_page`). A socket is *stale* when its process
is gone: the pid is dead, or the pid now belongs to a process started after the socket was made
(the pid was reused), or nothing listens on it any more. Stale sockets of dead or reused pids are
removed (and reported); a live pid whose socket does not answer is reported, not touched.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from glake.stats import paths

LIVE = "live"                  # answers GetStats
STALE_REMOVED = "stale, removed"  # its process is gone; the socket was deleted
STALE = "stale"                # its process is gone; the socket could not be deleted
NOT_ANSWERING = "not answering"   # the pid lives but the socket does not answer


@dataclass
class ProcessEntry:
    """One ``<pid>.sock`` and what became of it."""

    pid: int
    socket: str
    status: str
    reason: str = ""
    stats: Optional[Dict[str, Any]] = field(default=None, repr=False)  # GetStats reply when live


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (``os.kill(pid, 0)``; another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start_time(pid: int) -> Optional[float]:
    """When ``pid`` started (unix seconds), from /proc; None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of the whole line: starttime, in clock ticks after boot
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def listening(path: str, timeout: float = 1.0) -> Optional[bool]:
    """True if something accepts connections on the unix socket, False if nothing listens
    (ECONNREFUSED / not a socket), None if it cannot be told (e.g. a timeout)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        return True
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOTSOCK, errno.ENOENT):
            return False
        return None
    finally:
        s.close()


def stale_reason(pid: int, path: str) -> Optional[str]:
    """Why the socket of ``pid`` is stale, or None if its process may still own it."""
    if not pid_alive(pid):
        return f"process {pid} is gone"
    started = process_start_time(pid)
    try:
        made = os.lstat(path).st_mtime
    except FileNotFoundError:
        return None
    if started is not None and started > made + 2.0:  # 2 s: /proc's tick resolution and clock slack
        return f"pid {pid} was reused by a process started after the socket was made"
    return None


def discover(clean: bool = True, timeout: float = 2.0) -> List[ProcessEntry]:
    """Every stats socket of this user, with its status (live ones carry their GetStats reply).

    Parameters
    ----------
    clean : bool
        Remove the sockets of processes that are gone.
    timeout : float
        Seconds to wait for each process to answer.
    """
    from glake.stats.client import StatsClient, StatsError

    out: List[ProcessEntry] = []
    for pid, path in paths.list_sockets():
        reason = stale_reason(pid, path)
        if reason is not None:
            out.append(_stale(pid, path, reason, clean))
            continue
        try:
            with StatsClient("unix:" + path, timeout=timeout) as c:
                stats = c.get_stats()
        except StatsError as e:
            if listening(path, timeout) is False and not pid_alive(pid):
                out.append(_stale(pid, path, f"process {pid} is gone", clean))
            else:
                out.append(ProcessEntry(pid, path, NOT_ANSWERING, str(e)))
            continue
        if stats["process"]["pid"] != pid:
            out.append(ProcessEntry(pid, path, NOT_ANSWERING,
                                    f"the socket is served by pid {stats['process']['pid']}, not {pid}"))
            continue
        out.append(ProcessEntry(pid, path, LIVE, "", stats))
    out.extend(_shim_pages(out, clean))
    return sorted(out, key=lambda e: e.pid)


def _shim_pages(entries: List[ProcessEntry], clean: bool) -> List[ProcessEntry]:
    """Entries for the stats pages of shimmed processes (``<pid>.shim``); a process that also serves
    gRPC gets the page's ``shim`` section added to its reply instead (its allocators are already there)."""
    from glake.stats import shim_page

    live = {e.pid: e for e in entries if e.status == LIVE}
    out: List[ProcessEntry] = []
    for pid, path in shim_page.list_pages():
        reason = shim_page.stale_reason(pid, path)
        if reason is not None:
            out.append(_stale(pid, path, reason, clean))
            continue
        try:
            stats = shim_page.read_page(path)
        except (OSError, shim_page.PageError) as e:
            out.append(ProcessEntry(pid, path, NOT_ANSWERING, str(e)))
            continue
        if pid in live and live[pid].stats is not None:
            live[pid].stats["sections"].extend(s for s in stats["sections"] if s["name"] == "shim")
            continue
        out.append(ProcessEntry(pid, path, LIVE, "", stats))
    return out


def _stale(pid: int, path: str, reason: str, clean: bool) -> ProcessEntry:
    if not clean:
        return ProcessEntry(pid, path, STALE, reason)
    try:
        os.unlink(path)
        return ProcessEntry(pid, path, STALE_REMOVED, reason)
    except FileNotFoundError:
        return ProcessEntry(pid, path, STALE_REMOVED, reason + " (already removed)")
    except OSError as e:
        return ProcessEntry(pid, path, STALE, f"{reason}; could not remove the socket: {e}")


def wait_for_socket(pid: int, timeout: float = 10.0) -> str:
    """Wait until ``pid``'s stats socket exists and answers connections; return its path.

    Raises
    ------
    TimeoutError
        It did not, within ``timeout`` seconds.
    """
    path = paths.socket_path(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and listening(path, 0.5):
            return path
        time.sleep(0.05)
    raise TimeoutError(f"no glake stats socket answered at {path} within {timeout} s")


__all__ = ["ProcessEntry", "LIVE", "STALE", "STALE_REMOVED", "NOT_ANSWERING", "pid_alive", "process_start_time",
           "listening", "stale_reason", "discover", "wait_for_socket"]
