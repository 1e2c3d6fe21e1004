"""Standard gRPC health checking (grpc.health.v1.Health), always available.

grpcio-health-checking is used when it is installed. Debian does not package
it, so otherwise the messages of the public health.proto are built here from
their description (below) in a private descriptor pool, which cannot collide
with the real package should it be imported later, and served by a small
servicer of our own:

    package grpc.health.v1;
    message HealthCheckRequest { string service = 1; }
    message HealthCheckResponse {
      enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
      ServingStatus status = 1;
    }
    service Health {
      rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
      rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
    }
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["SERVICE_NAME", "HealthRegistry", "add_health"]

log = logging.getLogger(__name__)

SERVICE_NAME = "grpc.health.v1.Health"
SERVING, NOT_SERVING, SERVICE_UNKNOWN = 1, 2, 3


class HealthRegistry(Protocol):
    def set(self, service: str, serving: bool) -> None: ...

    def shutdown(self) -> None: ...


def add_health(server: grpc.Server) -> HealthRegistry:
    """Register the health service; the package's when importable, else ours."""
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    except ImportError:
        log.info("grpcio-health-checking not installed: serving grpc.health.v1 from the built-in copy")
        own = _OwnHealth()
        server.add_generic_rpc_handlers((own.handler(),))
        return own
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return _PackagedHealth(servicer, health_pb2)


class _PackagedHealth:
    def __init__(self, servicer: Any, pb2: Any) -> None:
        self._servicer = servicer
        self._pb2 = pb2

    def set(self, service: str, serving: bool) -> None:
        status = self._pb2.HealthCheckResponse.SERVING if serving else self._pb2.HealthCheckResponse.NOT_SERVING
        self._servicer.set(service, status)

    def shutdown(self) -> None:
        self._servicer.enter_graceful_shutdown()


def _build_messages() -> tuple[Any, Any]:
    f = descriptor_pb2.FileDescriptorProto(name="unplugd_builtin/grpc/health/v1/health.proto",
                                           package="grpc.health.v1", syntax="proto3")
    req = f.message_type.add(name="HealthCheckRequest")
    req.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                  label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, json_name="service")
    resp = f.message_type.add(name="HealthCheckResponse")
    enum = resp.enum_type.add(name="ServingStatus")
    for name, number in (("UNKNOWN", 0), ("SERVING", 1), ("NOT_SERVING", 2), ("SERVICE_UNKNOWN", 3)):
        enum.value.add(name=name, number=number)
    resp.field.add(name="status", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
                   type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
                   label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, json_name="status")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    fd = pool.FindFileByName(f.name)
    get_class: Callable[[Any], Any]
    if hasattr(message_factory, "GetMessageClass"):
        get_class = message_factory.GetMessageClass
    else:  # protobuf 4.21 (Debian 12's python3-protobuf 3.21)
        get_class = getattr(message_factory.MessageFactory(pool), "GetPrototype")  # noqa: B009
    return (get_class(fd.message_types_by_name["HealthCheckRequest"]),
            get_class(fd.message_types_by_name["HealthCheckResponse"]))


HealthCheckRequest, HealthCheckResponse = _build_messages()


class _OwnHealth:
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
                    self._cond.wait(timeout=30)
                    continue
            last = status
            yield HealthCheckResponse(status=status)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg,unused-ignore]
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Check": grpc.unary_unary_rpc_method_handler(
                self.check, request_deserializer=HealthCheckRequest.FromString,
                response_serializer=HealthCheckResponse.SerializeToString),
            "Watch": grpc.unary_stream_rpc_method_handler(
                self.watch, request_deserializer=HealthCheckRequest.FromString,
                response_serializer=HealthCheckResponse.SerializeToString),
        })
