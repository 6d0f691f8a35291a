"""The GlakeControl gRPC service of this process: Suspend and Resume (``glake suspend|resume PID``).

Served beside GlakeStats, but only to callers on the unix socket, which only this user can open
(0600 in a 0700 directory): over TCP every call is PERMISSION_DENIED.
"""

from __future__ import annotations

import grpc

from glake.errors import GlakeError, InvalidArgumentError, OutOfMemoryError
from glake.stats import glake_control_pb2 as pb
from glake.stats import glake_control_pb2_grpc as pb_grpc


class ControlService(pb_grpc.GlakeControlServicer):
    """Suspends and resumes this process's glake allocators on request."""

    def _call(self, context, fn, request: "pb.DeviceRequest") -> "pb.DeviceReply":
        if not context.peer().startswith("unix:"):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "glake control is served on the per-user unix socket only, not over TCP")
        import glake
        from glake import _C

        device = None if request.all_devices else request.device
        try:
            devices = fn(device)
        except InvalidArgumentError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except OutOfMemoryError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except GlakeError as e:
            context.abort(grpc.StatusCode.INTERNAL, str(e))
        held = sum(_C.gmlake_global(d).stats()["suspended_host_bytes"] for d in range(64) if _C.gmlake_global_exists(d))
        del glake
        return pb.DeviceReply(devices=devices, host_bytes=held)

    def Suspend(self, request, context):  # noqa: N802  (the gRPC method's name)
        import glake

        return self._call(context, glake.suspend, request)

    def Resume(self, request, context):  # noqa: N802
        import glake

        return self._call(context, glake.resume, request)
