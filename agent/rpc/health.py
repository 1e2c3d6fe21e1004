"""Standard gRPC health checking (grpc.health.v1.Health): our own servicer, on every runtime.

Health and reflection follow one rule: our servicer, on the messages protoc
describes (proto/grpc/, generated into unplugd/v1/grpc_std_pb2.py), never
grpcio-health-checking or grpcio-reflection, even where they are installed.
Debian 12 packages neither, and PyPI's current ones do not even import on
its python3-protobuf 3.21, so the guest always runs ours; one implementation
means the venv's tests exercise exactly what the guest serves.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc

from unplugd.v1 import grpc_std_pb2

__all__ = ["SERVICE_NAME", "HealthRegistry", "add_health"]

HealthCheckRequest: Any = grpc_std_pb2.MESSAGES["grpc.health.v1.HealthCheckRequest"]
HealthCheckResponse: Any = grpc_std_pb2.MESSAGES["grpc.health.v1.HealthCheckResponse"]
SERVICE = HealthCheckRequest.DESCRIPTOR.file.services_by_name["Health"]
SERVICE_NAME: str = SERVICE.full_name
SERVING: int = HealthCheckResponse.SERVING
NOT_SERVING: int = HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: int = HealthCheckResponse.SERVICE_UNKNOWN


class HealthRegistry:
    """Check and Watch, as the spec says: "" is the whole server."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._status: dict[str, int] = {"": SERVING}
        self._closing = False

    def set(self, service: str, serving: bool) -> None:
        with self._cond:
            if self._closing:
                return
            self._status[service] = SERVING if serving else NOT_SERVING
            self._cond.notify_all()

    def shutdown(self) -> None:
        with self._cond:
            self._closing = True
            for name in self._status:
                self._status[name] = NOT_SERVING
            self._cond.notify_all()

    def check(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._cond:
            status = self._status.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return HealthCheckResponse(status=status)

    def watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        last: int | None = None
        context.add_callback(self._wake)
        while context.is_active():
            with self._cond:
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                if status == last:
                    # set(), shutdown() and the client leaving (_wake) notify; the timeout
                    # only bounds how long a missed wake-up could keep a dead stream's thread
                    self._cond.wait(timeout=30)
                    continue
            last = status
            yield HealthCheckResponse(status=status)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg,unused-ignore]
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.check,
                    request_deserializer=HealthCheckRequest.FromString,
                    response_serializer=HealthCheckResponse.SerializeToString,
                ),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    self.watch,
                    request_deserializer=HealthCheckRequest.FromString,
                    response_serializer=HealthCheckResponse.SerializeToString,
                ),
            },
        )


def add_health(server: grpc.Server) -> HealthRegistry:
    """Register the health service on `server`; set() and shutdown() drive what it answers."""
    registry = HealthRegistry()
    server.add_generic_rpc_handlers((registry.handler(),))
    return registry
