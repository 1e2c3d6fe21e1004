"""gRPC server reflection (grpc.reflection.v1alpha and v1), so grpcurl works without .proto files.

Always our own implementation, never grpcio-reflection even when it is
importable: Debian does not package grpcio-reflection, so the guest never
has it, and one implementation means the venv tests exercise exactly what
the guest serves. The messages are built here from the public
reflection.proto (both versions have the same messages, only the package
differs) in a private descriptor pool, as health.py does, so they cannot
collide with the real package should it be imported later:

    service ServerReflection {
      rpc ServerReflectionInfo(stream ServerReflectionRequest) returns (stream ServerReflectionResponse);
    }
    message ServerReflectionRequest {
      string host = 1;
      oneof message_request {
        string file_by_filename = 3;
        string file_containing_symbol = 4;
        ExtensionRequest file_containing_extension = 5;
        string all_extension_numbers_of_type = 6;
        string list_services = 7;
      }
    }
    message ExtensionRequest { string containing_type = 1; int32 extension_number = 2; }
    message ServerReflectionResponse {
      string valid_host = 1;
      ServerReflectionRequest original_request = 2;
      oneof message_response {
        FileDescriptorResponse file_descriptor_response = 4;
        ExtensionNumberResponse all_extension_numbers_response = 5;
        ListServiceResponse list_services_response = 6;
        ErrorResponse error_response = 7;
      }
    }
    message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
    message ExtensionNumberResponse { string base_type_name = 1; repeated int32 extension_number = 2; }
    message ListServiceResponse { repeated ServiceResponse service = 1; }
    message ServiceResponse { string name = 1; }
    message ErrorResponse { int32 error_code = 1; string error_message = 2; }

The health service is described too: health.py's built-in messages plus
the Health service declaration (its wire format is the same whichever
health implementation serves it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message_factory

from unplugd.agent.rpc import health

__all__ = [
    "V1",
    "V1ALPHA",
    "ReflectionApi",
    "ReflectionIndex",
    "ReflectionServicer",
    "add_reflection",
    "file_symbols",
]

log = logging.getLogger(__name__)

_FDP = descriptor_pb2.FieldDescriptorProto
_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
_ECHO_LIMIT = 200  # characters of a client's name repeated in an error message


@dataclass(frozen=True)
class ReflectionApi:
    """One version of the reflection protocol: its service and message classes."""

    service: descriptor.ServiceDescriptor
    request: Any  # ServerReflectionRequest class
    response: Any  # ServerReflectionResponse class

    @property
    def name(self) -> str:
        return self.service.full_name


def _camel(name: str) -> str:
    """protobuf's default JSON name: drop each underscore and upper-case the letter after it."""
    out: list[str] = []
    upper_next = False
    for ch in name:
        if ch == "_":
            upper_next = True
        else:
            out.append(ch.upper() if upper_next else ch)
            upper_next = False
    return "".join(out)


def _add_field(msg: descriptor_pb2.DescriptorProto, name: str, number: int, kind: int, *,
               type_name: str = "", repeated: bool = False, oneof: int | None = None) -> None:
    field = msg.field.add(name=name, number=number, type=kind, json_name=_camel(name),
                          label=_FDP.LABEL_REPEATED if repeated else _FDP.LABEL_OPTIONAL)
    if type_name:
        field.type_name = type_name
    if oneof is not None:
        field.oneof_index = oneof


def _reflection_file(package: str) -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(name=f"grpc/reflection/{package.rsplit('.', 1)[-1]}/reflection.proto",
                                           package=package, syntax="proto3")
    p = f".{package}."
    string, int32, msg_t, bytes_t = _FDP.TYPE_STRING, _FDP.TYPE_INT32, _FDP.TYPE_MESSAGE, _FDP.TYPE_BYTES

    req = f.message_type.add(name="ServerReflectionRequest")
    req.oneof_decl.add(name="message_request")
    _add_field(req, "host", 1, string)
    _add_field(req, "file_by_filename", 3, string, oneof=0)
    _add_field(req, "file_containing_symbol", 4, string, oneof=0)
    _add_field(req, "file_containing_extension", 5, msg_t, type_name=p + "ExtensionRequest", oneof=0)
    _add_field(req, "all_extension_numbers_of_type", 6, string, oneof=0)
    _add_field(req, "list_services", 7, string, oneof=0)

    ext = f.message_type.add(name="ExtensionRequest")
    _add_field(ext, "containing_type", 1, string)
    _add_field(ext, "extension_number", 2, int32)

    resp = f.message_type.add(name="ServerReflectionResponse")
    resp.oneof_decl.add(name="message_response")
    _add_field(resp, "valid_host", 1, string)
    _add_field(resp, "original_request", 2, msg_t, type_name=p + "ServerReflectionRequest")
    _add_field(resp, "file_descriptor_response", 4, msg_t, type_name=p + "FileDescriptorResponse", oneof=0)
    _add_field(resp, "all_extension_numbers_response", 5, msg_t, type_name=p + "ExtensionNumberResponse", oneof=0)
    _add_field(resp, "list_services_response", 6, msg_t, type_name=p + "ListServiceResponse", oneof=0)
    _add_field(resp, "error_response", 7, msg_t, type_name=p + "ErrorResponse", oneof=0)

    _add_field(f.message_type.add(name="FileDescriptorResponse"), "file_descriptor_proto", 1, bytes_t, repeated=True)
    numbers = f.message_type.add(name="ExtensionNumberResponse")
    _add_field(numbers, "base_type_name", 1, string)
    _add_field(numbers, "extension_number", 2, int32, repeated=True)
    _add_field(f.message_type.add(name="ListServiceResponse"), "service", 1, msg_t,
               type_name=p + "ServiceResponse", repeated=True)
    _add_field(f.message_type.add(name="ServiceResponse"), "name", 1, string)
    err = f.message_type.add(name="ErrorResponse")
    _add_field(err, "error_code", 1, int32)
    _add_field(err, "error_message", 2, string)

    f.service.add(name="ServerReflection").method.add(
        name="ServerReflectionInfo", input_type=p + "ServerReflectionRequest",
        output_type=p + "ServerReflectionResponse", client_streaming=True, server_streaming=True)
    return f


def _health_file() -> descriptor_pb2.FileDescriptorProto:
    """health.py's built-in messages, under the upstream file name, with the service they belong to."""
    f = descriptor_pb2.FileDescriptorProto()
    health.HealthCheckRequest.DESCRIPTOR.file.CopyToProto(f)
    f.name = "grpc/health/v1/health.proto"
    svc = f.service.add(name="Health")
    for method, streaming in (("Check", False), ("Watch", True)):
        svc.method.add(name=method, input_type=".grpc.health.v1.HealthCheckRequest",
                       output_type=".grpc.health.v1.HealthCheckResponse", server_streaming=streaming)
    return f


def _build() -> tuple[descriptor.ServiceDescriptor, ReflectionApi, ReflectionApi]:
    pool = descriptor_pool.DescriptorPool()
    get_class: Callable[[Any], Any]
    if hasattr(message_factory, "GetMessageClass"):
        get_class = message_factory.GetMessageClass
    else:  # protobuf 4.21 (Debian 12's python3-protobuf 3.21)
        get_class = getattr(message_factory.MessageFactory(pool), "GetPrototype")  # noqa: B009
    pool.Add(_health_file())
    health_service = pool.FindServiceByName(health.SERVICE_NAME)
    apis = []
    for package in ("grpc.reflection.v1alpha", "grpc.reflection.v1"):
        fdp = _reflection_file(package)
        pool.Add(fdp)
        fd = pool.FindFileByName(fdp.name)
        apis.append(ReflectionApi(service=fd.services_by_name["ServerReflection"],
                                  request=get_class(fd.message_types_by_name["ServerReflectionRequest"]),
                                  response=get_class(fd.message_types_by_name["ServerReflectionResponse"])))
    return health_service, apis[0], apis[1]


HEALTH_SERVICE, V1ALPHA, V1 = _build()


def _nested_symbols(scope: str, msg: descriptor_pb2.DescriptorProto) -> Iterator[str]:
    name = f"{scope}{msg.name}"
    yield name
    inner = name + "."
    for field in (*msg.field, *msg.extension):
        yield inner + field.name
    for oneof in msg.oneof_decl:
        yield inner + oneof.name
    for enum in msg.enum_type:
        yield from _enum_symbols(inner, enum)
    for nested in msg.nested_type:
        yield from _nested_symbols(inner, nested)


def _enum_symbols(scope: str, enum: descriptor_pb2.EnumDescriptorProto) -> Iterator[str]:
    yield scope + enum.name
    for value in enum.value:  # C++ scoping: values are siblings of their enum
        yield scope + value.name


def file_symbols(fdp: descriptor_pb2.FileDescriptorProto) -> Iterator[str]:
    """Every fully qualified name a file declares: messages, fields, enums, values, services, methods."""
    scope = f"{fdp.package}." if fdp.package else ""
    for msg in fdp.message_type:
        yield from _nested_symbols(scope, msg)
    for enum in fdp.enum_type:
        yield from _enum_symbols(scope, enum)
    for ext in fdp.extension:
        yield scope + ext.name
    for svc in fdp.service:
        yield scope + svc.name
        for method in svc.method:
            yield f"{scope}{svc.name}.{method.name}"


def _fill_json_names(fdp: descriptor_pb2.FileDescriptorProto) -> None:
    """Set json_name where the generated code left it out, so JSON clients (grpcurl) print
    the same camelCase names as protobuf's own JSON mapping."""
    stack = list(fdp.message_type)
    fields = list(fdp.extension)
    while stack:
        msg = stack.pop()
        fields.extend((*msg.field, *msg.extension))
        stack.extend(msg.nested_type)
    for field in fields:
        if not field.HasField("json_name"):
            field.json_name = _camel(field.name)


def _extensions(fdp: descriptor_pb2.FileDescriptorProto) -> Iterator[descriptor_pb2.FieldDescriptorProto]:
    yield from fdp.extension
    stack = list(fdp.message_type)
    while stack:
        msg = stack.pop()
        yield from msg.extension
        stack.extend(msg.nested_type)


class ReflectionIndex:
    """What reflection answers from: the files of the served services and their dependencies, by name and symbol."""

    def __init__(self, services: Sequence[descriptor.ServiceDescriptor]) -> None:
        self.service_names: tuple[str, ...] = tuple(dict.fromkeys(s.full_name for s in services))
        self._files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        self._serialized: dict[str, bytes] = {}
        self._symbols: dict[str, str] = {}  # symbol -> file name
        self._extensions: dict[str, dict[int, str]] = {}  # extendee -> number -> file name
        for service in services:
            self._add(service.file)

    def _add(self, fd: descriptor.FileDescriptor) -> None:
        if fd.name in self._files:
            return
        fdp = descriptor_pb2.FileDescriptorProto.FromString(fd.serialized_pb)
        _fill_json_names(fdp)
        self._files[fd.name] = fdp
        self._serialized[fd.name] = fdp.SerializeToString()
        for symbol in file_symbols(fdp):
            self._symbols.setdefault(symbol, fd.name)
        for ext in _extensions(fdp):
            self._extensions.setdefault(ext.extendee.lstrip("."), {}).setdefault(ext.number, fd.name)
        for dep in fd.dependencies:
            self._add(dep)

    def files_by_name(self, name: str) -> list[bytes] | None:
        """The serialized file, then every file it depends on (transitively); None if unknown."""
        if name not in self._files:
            return None
        out: list[bytes] = []
        queue, seen = [name], {name}
        while queue:
            current = queue.pop(0)
            out.append(self._serialized[current])
            for dep in self._files[current].dependency:
                if dep not in seen and dep in self._files:
                    seen.add(dep)
                    queue.append(dep)
        return out

    def files_containing_symbol(self, symbol: str) -> list[bytes] | None:
        file_name = self._symbols.get(symbol)
        return None if file_name is None else self.files_by_name(file_name)

    def files_containing_extension(self, extendee: str, number: int) -> list[bytes] | None:
        file_name = self._extensions.get(extendee, {}).get(number)
        return None if file_name is None else self.files_by_name(file_name)

    def extension_numbers(self, type_name: str) -> list[int] | None:
        """Extension field numbers of a message type ([] for a known type without any); None if unknown."""
        if type_name not in self._symbols:
            return None
        return sorted(self._extensions.get(type_name, {}))


def _shorten(name: str) -> str:
    return name if len(name) <= _ECHO_LIMIT else name[:_ECHO_LIMIT] + "..."


class ReflectionServicer:
    """ServerReflectionInfo: one response per request, in order, until the client closes its side."""

    def __init__(self, index: ReflectionIndex) -> None:
        self.index = index

    def answer(self, api: ReflectionApi, request: Any) -> Any:
        response = api.response(valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        files: list[bytes] | None = None
        if kind == "list_services":
            listing = response.list_services_response
            for name in self.index.service_names:
                listing.service.add(name=name)
            return response
        if kind == "all_extension_numbers_of_type":
            numbers = self.index.extension_numbers(request.all_extension_numbers_of_type)
            if numbers is not None:
                response.all_extension_numbers_response.base_type_name = request.all_extension_numbers_of_type
                response.all_extension_numbers_response.extension_number.extend(numbers)
                return response
            what = f"type {_shorten(request.all_extension_numbers_of_type)!r}"
        elif kind == "file_by_filename":
            files = self.index.files_by_name(request.file_by_filename)
            what = f"file {_shorten(request.file_by_filename)!r}"
        elif kind == "file_containing_symbol":
            files = self.index.files_containing_symbol(request.file_containing_symbol)
            what = f"symbol {_shorten(request.file_containing_symbol)!r}"
        elif kind == "file_containing_extension":
            ext = request.file_containing_extension
            files = self.index.files_containing_extension(ext.containing_type, ext.extension_number)
            what = f"extension {ext.extension_number} of {_shorten(ext.containing_type)!r}"
        else:
            response.error_response.error_code = _INVALID_ARGUMENT
            response.error_response.error_message = "request names no question (message_request is empty)"
            return response
        if files is None:
            log.debug("reflection: not found", extra={"what": what})
            response.error_response.error_code = _NOT_FOUND
            response.error_response.error_message = f"{what} not found"
        else:
            response.file_descriptor_response.file_descriptor_proto.extend(files)
        return response

    def _stream(self, api: ReflectionApi) -> Callable[[Iterable[Any], grpc.ServicerContext], Iterator[Any]]:
        def info(requests: Iterable[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            for request in requests:
                yield self.answer(api, request)

        return info

    def handlers(self) -> list[grpc.GenericRpcHandler]:  # type: ignore[type-arg,unused-ignore]
        return [
            grpc.method_handlers_generic_handler(api.name, {
                "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                    self._stream(api), request_deserializer=api.request.FromString,
                    response_serializer=api.response.SerializeToString),
            })
            for api in (V1ALPHA, V1)
        ]


def add_reflection(server: grpc.Server, services: Sequence[descriptor.ServiceDescriptor]) -> ReflectionIndex:
    """Serve reflection (v1alpha and v1) for `services`, grpc.health.v1.Health and reflection itself."""
    index = ReflectionIndex([*services, HEALTH_SERVICE, V1ALPHA.service, V1.service])
    server.add_generic_rpc_handlers(ReflectionServicer(index).handlers())
    return index
