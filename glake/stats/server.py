"""Starting and stopping this process's stats server.

One server per process, started by :func:`serve` (idempotent) or ``GLAKE_STATS=1`` at
``import glake``. It always listens on the unix socket ``<runtime dir>/<pid>.sock`` (mode 0600,
in a 0700 directory: only this user can connect), where ``glake ps`` finds it; TCP only when an
address is given (``serve(address=...)`` / ``GLAKE_STATS_ADDR=host:port``), and then only on a
loopback address unless remote access is explicitly allowed (``allow_remote=True`` /
``GLAKE_STATS_ALLOW_REMOTE=1``): the service has no authentication and no TLS.

The server answers from grpc's threads; the program's threads, the allocator's hot path
included, never run any of it. The socket is removed when the server stops or the process exits
normally; a killed process leaves it behind, and ``glake ps`` removes it.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor  # imported now: see the exit hooks at the end
from pathlib import Path
from typing import List, Optional, Tuple

from glake.stats import paths

MAX_REQUEST_BYTES = 64 * 1024   # requests are a few bytes; anything bigger is refused (RESOURCE_EXHAUSTED)
DEFAULT_WORKERS = 8             # concurrent RPCs (each WatchStats holds one while it streams)


class RemoteAddressRefused(ValueError):
    """A non-loopback TCP address was asked for without allowing remote access."""


def parse_address(address: str) -> Tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"glake stats: bad TCP address {address!r} (expected host:port, e.g. 127.0.0.1:50051)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"glake stats: bad port in {address!r}") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"glake stats: port out of range in {address!r}")
    return host, p


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost``, 127.0.0.0/8, ::1). Names other than
    ``localhost`` are not resolved: they count as remote."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_tcp_address(address: str, allow_remote: bool) -> Tuple[str, int]:
    """Validate a TCP address against the loopback-only policy; returns ``(host, port)``."""
    host, port = parse_address(address)
    if not is_loopback(host) and not allow_remote:
        raise RemoteAddressRefused(
            f"glake stats: refusing to listen on {address!r}: not a loopback address, and the stats service has no "
            "authentication. Use 127.0.0.1 / [::1], or allow it explicitly (serve(allow_remote=True) or "
            "GLAKE_STATS_ALLOW_REMOTE=1).")
    return host, port


class StatsServer:
    """A running stats server (what :func:`serve` returns)."""

    def __init__(self, grpc_server, addresses: List[str], socket_path: Optional[str], stopping: threading.Event,
                 start_time_ns: int) -> None:
        self._server = grpc_server
        self.addresses = addresses
        self.socket_path = socket_path
        self.pid = os.getpid()
        self.start_time_ns = start_time_ns
        self._stopping = stopping

    @property
    def tcp_address(self) -> Optional[str]:
        """The TCP address (``host:port``, the real port when 0 was asked), if any."""
        return next((a for a in self.addresses if not a.startswith("unix:")), None)

    def stop(self, grace: Optional[float] = 0.5) -> None:
        """Stop serving (streams end at once) and remove the socket."""
        self._stopping.set()
        if os.getpid() == self.pid:  # a forked child must not take its parent's socket down
            self._server.stop(grace).wait(5)
            if self.socket_path:
                Path(self.socket_path).unlink(missing_ok=True)


_lock = threading.Lock()
_current: Optional[StatsServer] = None


def current() -> Optional[StatsServer]:
    """The running server of this process, or None."""
    s = _current
    return s if s is not None and s.pid == os.getpid() else None


def serve(address: Optional[str] = None, *, unix: bool = True, allow_remote: Optional[bool] = None,
          max_workers: int = DEFAULT_WORKERS) -> StatsServer:
    """Start this process's stats server, or return the one running.

    Parameters
    ----------
    address : str, optional
        Also listen on TCP ``host:port`` (port 0: any free port). Default ``$GLAKE_STATS_ADDR``.
        Must be a loopback address unless remote access is allowed.
    unix : bool
        Listen on the per-process unix socket (the default; ``glake ps`` finds processes by it).
    allow_remote : bool, optional
        Allow a non-loopback TCP address. Default: ``GLAKE_STATS_ALLOW_REMOTE=1``.
    max_workers : int
        RPCs served at once; more are answered RESOURCE_EXHAUSTED.

    Raises
    ------
    RemoteAddressRefused
        A non-loopback address without ``allow_remote``.
    RuntimeError
        Already serving with other addresses, or an address could not be bound.
    """
    global _current
    if address is None:
        address = os.environ.get("GLAKE_STATS_ADDR") or None
    if allow_remote is None:
        allow_remote = os.environ.get("GLAKE_STATS_ALLOW_REMOTE") == "1"
    unix_path = None
    if address and address.startswith("unix:"):
        unix_path, address = address[len("unix:"):], None
    if address:
        check_tcp_address(address, allow_remote)
    if not address and not unix:
        raise ValueError("glake stats: nothing to listen on (unix=False and no address)")
    with _lock:
        running = current()
        if running is not None:
            if address and not any(a == address or _same_tcp(a, address) for a in running.addresses):
                raise RuntimeError(f"glake stats: already serving on {', '.join(running.addresses)}; "
                                   f"stop() it before serving on {address}")
            return running
        _current = _start(address, unix, unix_path, max_workers)
        return _current


def _same_tcp(bound: str, asked: str) -> bool:
    try:
        (bh, bp), (ah, ap) = parse_address(bound), parse_address(asked)
    except ValueError:
        return False
    return bh == ah and (ap == 0 or ap == bp)


def _start(address: Optional[str], unix: bool, unix_path: Optional[str], max_workers: int) -> StatsServer:
    import grpc

    from glake.stats import collector
    from glake.stats import glake_control_pb2_grpc as control_grpc
    from glake.stats import glake_stats_pb2_grpc as pb_grpc
    from glake.stats.control import ControlService
    from glake.stats.service import StatsService

    stopping = threading.Event()
    start_ns = time.time_ns()
    addresses: List[str] = []
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="glake-stats")
    server = grpc.server(pool, maximum_concurrent_rpcs=max_workers,
                         options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                                  ("grpc.so_reuseport", 0)])
    pb_grpc.add_GlakeStatsServicer_to_server(
        StatsService(lambda: collector.process_info(addresses, start_ns), stopping), server)
    control_grpc.add_GlakeControlServicer_to_server(ControlService(), server)
    sock = None
    try:
        if unix:
            if unix_path is None:
                paths.ensure_runtime_dir()
                unix_path = paths.socket_path(os.getpid())
            unix_path = os.path.abspath(unix_path)
            if len(unix_path.encode()) > paths.UNIX_PATH_MAX:
                raise RuntimeError(f"glake stats: socket path too long for a unix socket ({unix_path})")
            Path(unix_path).unlink(missing_ok=True)  # a stale socket of an earlier process that had this pid
            _bind(server, "unix:" + unix_path)
            sock = unix_path
            addresses.append("unix:" + unix_path)
        if address:
            host, _ = parse_address(address)
            port = _bind(server, address)
            addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        server.start()
        if sock:
            os.chmod(sock, 0o600)  # the directory is 0700 already: nobody else could reach it meanwhile
    except BaseException:
        server.stop(None)
        if sock:
            Path(sock).unlink(missing_ok=True)
        raise
    return StatsServer(server, addresses, sock, stopping, start_ns)


def _bind(server, address: str) -> int:
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise RuntimeError(f"glake stats: cannot listen on {address}: {e}") from e
    if port == 0 and not address.startswith("unix:"):
        raise RuntimeError(f"glake stats: cannot listen on {address}")
    return port


def stop() -> None:
    """Stop this process's stats server, if one runs (``serve()`` may start a new one later)."""
    global _current
    with _lock:
        running, _current = current(), None
    if running is not None:
        running.stop()


def serve_from_env() -> None:
    """What ``GLAKE_STATS=1`` does at ``import glake``: start the server in a daemon thread, so the
    import does not wait for grpc; a failure (grpc not installed, a refused address) is a warning,
    never an import error."""

    def start() -> None:
        try:
            serve()
        except Exception as e:  # the program must run on without stats
            from glake.errors import GlakeWarning

            warnings.warn(f"GLAKE_STATS=1 but the stats server did not start: {type(e).__name__}: {e}",
                          GlakeWarning, stacklevel=1)

    threading.Thread(target=start, name="glake-stats-start", daemon=True).start()


def _forget_after_fork() -> None:
    global _current, _lock
    _current = None  # the child has no server; serve() there starts its own, on its own socket
    _lock = threading.Lock()


def _at_exit() -> None:
    running = current()
    if running is not None:
        running.stop(grace=0)


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(_at_exit)
# threading's exit hooks run before it joins worker threads (among them grpc's): stopping here lets
# streaming RPCs end at once instead of holding the interpreter's exit.
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_at_exit)

__all__ = ["StatsServer", "RemoteAddressRefused", "serve", "stop", "current", "serve_from_env", "parse_address",
           "is_loopback", "check_tcp_address"]
