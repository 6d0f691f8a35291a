"""The GlakeStats gRPC service of this process: GetStats, WatchStats, GetMemoryMap.

Every bad request is answered with a status code, never a crash: an unknown section or pool is
NOT_FOUND, an interval out of range INVALID_ARGUMENT, a failure while collecting INTERNAL with the
reason (grpc itself answers undecodable requests with INTERNAL and unknown methods with
UNIMPLEMENTED). A source that raises only marks its own section (``Section.error``).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Iterator

import grpc

from glake.stats import collector, wire
from glake.stats import glake_stats_pb2 as pb
from glake.stats import glake_stats_pb2_grpc as pb_grpc

DEFAULT_INTERVAL_MS = 1000
MIN_INTERVAL_MS = 50
MAX_INTERVAL_MS = 3_600_000
_WAIT_SLICE_S = 0.1  # how often a waiting WatchStats looks for cancellation and shutdown


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _collect(fn: Callable[[], Any]) -> Any:
    """Run a collection step, turning failures into the status codes the service answers with."""
    try:
        return fn()
    except collector.UnknownNameError as e:
        raise _Abort(grpc.StatusCode.NOT_FOUND, str(e.args[0] if e.args else e)) from e
    except Exception as e:
        raise _Abort(grpc.StatusCode.INTERNAL, f"collecting stats failed: {type(e).__name__}: {e}") from e


class StatsService(pb_grpc.GlakeStatsServicer):
    """Answers from this process's collector.

    Parameters
    ----------
    info : callable
        Returns the ``ProcessInfo`` dict (it carries the addresses the server listens on).
    stopping : threading.Event
        Set when the server stops: WatchStats streams end at once.
    """

    def __init__(self, info: Callable[[], Dict[str, Any]], stopping: threading.Event) -> None:
        self._info = info
        self._stopping = stopping

    def _stats(self, request: "pb.StatsRequest", sequence: int = 0) -> "pb.StatsReply":
        return _collect(lambda: wire.stats_reply(self._info(), collector.collect_sections(list(request.sections)),
                                                 time.time_ns(), sequence))

    def GetStats(self, request, context):  # noqa: N802 (the generated interface's name)
        try:
            return self._stats(request)
        except _Abort as e:
            context.abort(e.code, str(e))

    def WatchStats(self, request, context) -> Iterator["pb.StatsReply"]:  # noqa: N802
        interval_ms = request.interval_ms or DEFAULT_INTERVAL_MS
        if not MIN_INTERVAL_MS <= interval_ms <= MAX_INTERVAL_MS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"interval_ms={request.interval_ms}: must be 0 (default {DEFAULT_INTERVAL_MS}) "
                          f"or within [{MIN_INTERVAL_MS}, {MAX_INTERVAL_MS}]")
        sequence = 0
        next_at = time.monotonic()
        while True:
            try:
                reply = self._stats(request.request, sequence)
            except _Abort as e:
                context.abort(e.code, str(e))
            yield reply
            sequence += 1
            if request.max_updates and sequence >= request.max_updates:
                return
            next_at += interval_ms / 1000.0
            if not self._wait_until(next_at, context):
                return

    def _wait_until(self, deadline: float, context) -> bool:
        """Sleep until ``deadline``; False if the client went away or the server or process stops."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if self._stopping.wait(min(left, _WAIT_SLICE_S)):
                return False
            if not context.is_active() or not threading.main_thread().is_alive():
                return False

    def GetMemoryMap(self, request, context):  # noqa: N802
        try:
            return _collect(lambda: wire.memory_map(self._info(), collector.collect_pools(request.pool),
                                                    time.time_ns()))
        except _Abort as e:
            context.abort(e.code, str(e))


__all__ = ["StatsService", "DEFAULT_INTERVAL_MS", "MIN_INTERVAL_MS", "MAX_INTERVAL_MS"]
