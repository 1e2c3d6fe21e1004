"""gRPC server reflection (grpc.reflection.v1alpha and v1), so grpcurl works without .proto files.

Our own servicer, never grpcio-reflection, by the rule health.py states (one
implementation, the one the guest runs). Its messages, and those of
grpc.health.v1, are protoc's descriptors of proto/grpc/ (generated into
unplugd/v1/grpc_std_pb2.py, in a pool of their own so that grpcio-reflection
can be imported beside them). v1alpha and v1 have the same messages; only
the package differs, and both are served.

The index answers from the served services' own descriptors: AgentService's
from the generated code, health's and reflection's from grpc_std_pb2.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor

if TYPE_CHECKING:  # imported by the first reflection request (see ReflectionIndex)
    from google.protobuf import descriptor_pb2

from unplugd.agent.rpc import health
from unplugd.v1 import grpc_std_pb2

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

    @classmethod
    def of(cls, package: str) -> ReflectionApi:
        request: Any = grpc_std_pb2.MESSAGES[f"{package}.ServerReflectionRequest"]
        return cls(
            service=request.DESCRIPTOR.file.services_by_name["ServerReflection"],
            request=request,
            response=grpc_std_pb2.MESSAGES[f"{package}.ServerReflectionResponse"],
        )


V1ALPHA = ReflectionApi.of("grpc.reflection.v1alpha")
V1 = ReflectionApi.of("grpc.reflection.v1")


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


def _fill_json_names(fdp: descriptor_pb2.FileDescriptorProto, fd: descriptor.FileDescriptor) -> None:
    """Set json_name where the generated code left it out, from protobuf's own descriptors, so
    JSON clients (grpcurl) print the same camelCase names as protobuf's JSON mapping."""

    def fill(
        scope: str,
        fields: Iterable[descriptor_pb2.FieldDescriptorProto],
        find: Callable[[str], descriptor.FieldDescriptor],
    ) -> None:
        for field in fields:
            if not field.HasField("json_name"):
                field.json_name = find(scope + field.name).json_name

    package = f"{fdp.package}." if fdp.package else ""
    fill(package, fdp.extension, fd.pool.FindExtensionByName)
    stack = [(package, msg) for msg in fdp.message_type]
    while stack:
        scope, msg = stack.pop()
        inner = f"{scope}{msg.name}."
        fill(inner, msg.field, fd.pool.FindFieldByName)
        fill(inner, msg.extension, fd.pool.FindExtensionByName)
        stack.extend((inner, nested) for nested in msg.nested_type)


def _extensions(fdp: descriptor_pb2.FileDescriptorProto) -> Iterator[descriptor_pb2.FieldDescriptorProto]:
    yield from fdp.extension
    stack = list(fdp.message_type)
    while stack:
        msg = stack.pop()
        yield from msg.extension
        stack.extend(msg.nested_type)


class ReflectionIndex:
    """What reflection answers from: the files of the served services and their dependencies, by name and symbol.

    Built on the first question, not when the server starts: parsing the files takes descriptor_pb2
    (on PyPI's protobuf ~2.5 MiB in a bare import, 0.3-0.5 MiB measured in the running agent), and
    most agents are never asked.
    """

    def __init__(self, services: Sequence[descriptor.ServiceDescriptor]) -> None:
        self.service_names: tuple[str, ...] = tuple(dict.fromkeys(s.full_name for s in services))
        self._pending: list[descriptor.FileDescriptor] | None = [s.file for s in services]
        self._lock = threading.Lock()  # questions come on the server's worker threads
        self._files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        self._serialized: dict[str, bytes] = {}
        self._symbols: dict[str, str] = {}  # symbol -> file name
        self._extensions: dict[str, dict[int, str]] = {}  # extendee -> number -> file name

    @property
    def built(self) -> bool:
        return self._pending is None

    def _build(self) -> None:
        if self._pending is None:
            return
        with self._lock:
            if self._pending is None:
                return
            from google.protobuf import descriptor_pb2

            for fd in self._pending:
                self._add(fd, descriptor_pb2.FileDescriptorProto)
            self._pending = None

    def _add(self, fd: descriptor.FileDescriptor, proto: type[descriptor_pb2.FileDescriptorProto]) -> None:
        if fd.name in self._files:
            return
        fdp = proto.FromString(fd.serialized_pb)
        _fill_json_names(fdp, fd)
        self._files[fd.name] = fdp
        self._serialized[fd.name] = fdp.SerializeToString()
        for symbol in file_symbols(fdp):
            self._symbols.setdefault(symbol, fd.name)
        for ext in _extensions(fdp):
            self._extensions.setdefault(ext.extendee.lstrip("."), {}).setdefault(ext.number, fd.name)
        for dep in fd.dependencies:
            self._add(dep, proto)

    def files_by_name(self, name: str) -> list[bytes] | None:
        """The serialized file, then every file it depends on (transitively); None if unknown."""
        self._build()
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
        self._build()
        file_name = self._symbols.get(symbol)
        return None if file_name is None else self.files_by_name(file_name)

    def files_containing_extension(self, extendee: str, number: int) -> list[bytes] | None:
        self._build()
        file_name = self._extensions.get(extendee, {}).get(number)
        return None if file_name is None else self.files_by_name(file_name)

    def extension_numbers(self, type_name: str) -> list[int] | None:
        """Extension field numbers of a message type ([] for a known type without any); None if unknown."""
        self._build()
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
            grpc.method_handlers_generic_handler(
                api.name,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        self._stream(api),
                        request_deserializer=api.request.FromString,
                        response_serializer=api.response.SerializeToString,
                    ),
                },
            )
            for api in (V1ALPHA, V1)
        ]


def add_reflection(server: grpc.Server, services: Sequence[descriptor.ServiceDescriptor]) -> ReflectionIndex:
    """Serve reflection (v1alpha and v1) for `services`, grpc.health.v1.Health and reflection itself."""
    index = ReflectionIndex([*services, health.SERVICE, V1ALPHA.service, V1.service])
    server.add_generic_rpc_handlers(ReflectionServicer(index).handlers())
    return index
