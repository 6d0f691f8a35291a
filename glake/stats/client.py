"""A client of the GlakeStats service of another process (or this one).

>>> from glake.stats.client import StatsClient
>>> with StatsClient(4242) as c:            # a pid, a socket path, "unix:PATH" or "host:port"
...     stats = c.get_stats()               # {"process": {...}, "sections": [{name, device, counters, ...}]}
...     pools = c.memory_map()["pools"]
...     for update in c.watch(interval=0.5, count=3): ...

Every call has a deadline; failures raise :class:`StatsError` with the gRPC status code.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import grpc

from glake.stats import glake_control_pb2 as control_pb
from glake.stats import glake_control_pb2_grpc as control_grpc
from glake.stats import glake_stats_pb2 as pb
from glake.stats import glake_stats_pb2_grpc as pb_grpc
from glake.stats import paths, wire

Target = Union[int, str]
MAX_REPLY_BYTES = 512 * 1024 * 1024  # a memory map of a busy allocator can be large


class StatsError(RuntimeError):
    """A stats call failed: ``code`` is the grpc.StatusCode (None: no such process/socket)."""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None) -> None:
        super().__init__(message)
        self.code = code


def resolve_target(target: Target) -> str:
    """A pid, a socket path, ``unix:PATH`` or ``host:port`` -> a gRPC target string.

    Raises
    ------
    StatsError
        A pid with no stats socket, the socket of a process that is gone, or text that is none of these.
    """
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        pid = int(target)
        path = paths.socket_path(pid)
        if not os.path.exists(path):
            raise StatsError(f"process {pid} publishes no glake stats (no {path}); start it with "
                             "GLAKE_STATS=1 or call glake.stats.serve() in it")
        from glake.stats.discovery import stale_reason

        gone = stale_reason(pid, path)
        if gone:
            raise StatsError(f"{gone}: its stats socket {path} was left behind (glake ps removes it)")
        return "unix:" + path
    target = str(target)
    if target.startswith("unix:"):
        return target
    if "/" in target:
        return "unix:" + os.path.abspath(target)
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise StatsError(f"{target!r} is not a pid, a socket path, unix:PATH or host:port")
    return target


class StatsClient:
    """A connection to one process's stats service.

    Parameters
    ----------
    target : int or str
        Pid, socket path, ``unix:PATH`` or ``host:port``.
    timeout : float
        Deadline of each unary call, in seconds.
    """

    def __init__(self, target: Target, timeout: float = 5.0) -> None:
        self.target = resolve_target(target)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(self.target, options=[
            ("grpc.max_receive_message_length", MAX_REPLY_BYTES), ("grpc.enable_retries", 0)])
        self._stub = pb_grpc.GlakeStatsStub(self._channel)
        self._control = control_grpc.GlakeControlStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "StatsClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _fail(self, e: grpc.RpcError, what: str) -> StatsError:
        code = e.code() if hasattr(e, "code") else None
        detail = e.details() if hasattr(e, "details") else str(e)
        if code == grpc.StatusCode.UNAVAILABLE:  # nothing listens: the usual reason is a process that exited
            return StatsError(f"nothing answers at {self.target}: the process has exited or does not serve stats "
                              "(glake ps lists the live ones)", code)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return StatsError(f"{self.target} did not answer {what} within {self.timeout:g} s (--timeout)", code)
        return StatsError(f"{what} on {self.target}: {code.name if code else 'error'}: {detail}", code)

    def get_stats_pb(self, sections: Sequence[str] = ()) -> "pb.StatsReply":
        """GetStats, as the protobuf message."""
        try:
            return self._stub.GetStats(pb.StatsRequest(sections=list(sections)), timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._fail(e, "GetStats") from None

    def get_stats(self, sections: Sequence[str] = ()) -> Dict[str, Any]:
        """``{"process", "timestamp_unix_ns", "sequence", "sections": [...]}`` (see :mod:`glake.stats.wire`)."""
        return wire.stats_from_pb(self.get_stats_pb(sections))

    def watch(self, interval: float = 1.0, count: int = 0, sections: Sequence[str] = (),
              timeout: Optional[float] = None) -> Iterator[Dict[str, Any]]:
        """WatchStats: a reply every ``interval`` seconds, ``count`` of them (0: until the caller stops).

        ``timeout`` bounds the whole stream (default: long enough for ``count`` replies, else none).
        """
        if timeout is None and count:
            timeout = self.timeout + count * interval * 2
        request = pb.WatchStatsRequest(request=pb.StatsRequest(sections=list(sections)),
                                       interval_ms=max(0, int(round(interval * 1000))), max_updates=count)
        stream = self._stub.WatchStats(request, timeout=timeout)
        try:
            for reply in stream:
                yield wire.stats_from_pb(reply)
        except grpc.RpcError as e:
            raise self._fail(e, "WatchStats") from None
        finally:
            stream.cancel()

    def _device_call(self, method: str, device: Optional[int], timeout: float) -> Dict[str, Any]:
        request = control_pb.DeviceRequest(all_devices=device is None, device=device or 0)
        try:
            reply = getattr(self._control, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            raise self._fail(e, method) from None
        return {"devices": list(reply.devices), "host_bytes": reply.host_bytes}

    def suspend(self, device: Optional[int] = None, timeout: float = 600.0) -> Dict[str, Any]:
        """glake.suspend() in the process (every device, or ``device``): ``{"devices", "host_bytes"}``."""
        return self._device_call("Suspend", device, timeout)

    def resume(self, device: Optional[int] = None, timeout: float = 600.0) -> Dict[str, Any]:
        """glake.resume() in the process: ``{"devices", "host_bytes"}``."""
        return self._device_call("Resume", device, timeout)

    def memory_map_pb(self, pool: str = "") -> "pb.MemoryMap":
        """GetMemoryMap, as the protobuf message."""
        try:
            return self._stub.GetMemoryMap(pb.MemoryMapRequest(pool=pool), timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._fail(e, "GetMemoryMap") from None

    def memory_map(self, pool: str = "") -> Dict[str, Any]:
        """``{"process", "timestamp_unix_ns", "pools": [...]}`` (see :mod:`glake.stats.memmap`)."""
        return wire.memory_map_from_pb(self.memory_map_pb(pool))


def sections_named(stats: Dict[str, Any], name: str) -> List[Dict[str, Any]]:
    """The sections of a GetStats reply called ``name``."""
    return [s for s in stats["sections"] if s["name"] == name]


__all__ = ["StatsClient", "StatsError", "resolve_target", "sections_named"]
