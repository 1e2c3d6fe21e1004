"""Server reflection: the official client (grpcio-reflection's descriptor database) and grpcurl-like
dynamic decoding against our own implementation, in-process and under Debian's /usr/bin/python3."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.unit.rpc_fakes import DISK_FN, NIC_FN, running_server
from tests.unit.test_rpc_serve import agent_process  # noqa: F401  (the real `unplugd serve` as a process)
from unplugd.agent.rpc import health
from unplugd.agent.rpc.reflection import V1, V1ALPHA, ReflectionIndex, file_symbols
from unplugd.v1 import agent_service_pb2, report_pb2

AGENT = "unplugd.v1.AgentService"
ALL_SERVICES = {
    AGENT,
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
}
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


def _message_class(desc: Any) -> Any:
    return message_factory.GetMessageClass(desc)


def _official(channel: grpc.Channel, **request: Any) -> Any:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10)))


def _file_names(response: Any) -> list[str]:
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw).name
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]


@pytest.fixture
def channel(tmp_path: Path) -> Iterator[grpc.Channel]:
    with running_server(tmp_path) as (server, _), grpc.insecure_channel(server.target) as ch:
        yield ch


# --- the pure part -------------------------------------------------------------------------------


def _sample_file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(name="s.proto", package="p.q")
    outer = f.message_type.add(name="Outer")
    outer.field.add(name="x", number=1)
    outer.oneof_decl.add(name="choice")
    inner = outer.nested_type.add(name="Inner")
    inner.enum_type.add(name="Mode").value.add(name="MODE_A", number=0)
    f.enum_type.add(name="Top").value.add(name="TOP_UNSPECIFIED", number=0)
    f.service.add(name="Svc").method.add(name="Call")
    return f


@pytest.mark.parametrize(
    ("package", "expected"),
    [
        (
            "p.q",
            {
                "p.q.Outer",
                "p.q.Outer.x",
                "p.q.Outer.choice",
                "p.q.Outer.Inner",
                "p.q.Outer.Inner.Mode",
                "p.q.Outer.Inner.MODE_A",
                "p.q.Top",
                "p.q.TOP_UNSPECIFIED",
                "p.q.Svc",
                "p.q.Svc.Call",
            },
        ),
        (
            "",
            {
                "Outer",
                "Outer.x",
                "Outer.choice",
                "Outer.Inner",
                "Outer.Inner.Mode",
                "Outer.Inner.MODE_A",
                "Top",
                "TOP_UNSPECIFIED",
                "Svc",
                "Svc.Call",
            },
        ),
    ],
)
def test_file_symbols_names_everything_a_file_declares(package: str, expected: set[str]) -> None:
    f = _sample_file()
    f.package = package
    assert set(file_symbols(f)) == expected


def test_index_returns_the_file_first_then_each_dependency_once() -> None:
    index = ReflectionIndex([agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"]])
    files = index.files_containing_symbol("unplugd.v1.GetReportRequest")
    assert files is not None
    names = [descriptor_pb2.FileDescriptorProto.FromString(raw).name for raw in files]
    assert names[0] == "unplugd/v1/agent_service.proto"
    assert sorted(names[1:]) == ["google/protobuf/timestamp.proto", "unplugd/v1/report.proto"]
    report_files = index.files_by_name("unplugd/v1/report.proto")
    assert report_files is not None
    assert [descriptor_pb2.FileDescriptorProto.FromString(raw).name for raw in report_files] == [
        "unplugd/v1/report.proto",
        "google/protobuf/timestamp.proto",
    ]
    # JSON clients (grpcurl) print json_name: the served files carry protobuf's own names.
    served = descriptor_pb2.FileDescriptorProto.FromString(report_files[0])
    report = next(m for m in served.message_type if m.name == "Report")
    assert {f.name: f.json_name for f in report.field} == {
        f.name: f.json_name for f in report_pb2.Report.DESCRIPTOR.fields
    }
    assert {f.json_name for f in report.field} >= {"generatedAt", "agentVersion", "fromCapture"}
    assert index.files_by_name("no/such.proto") is None
    assert index.files_containing_symbol("unplugd.v1") is None  # a package is no symbol
    assert index.extension_numbers("unplugd.v1.Report") == []
    assert index.extension_numbers("unplugd.v1.Nope") is None


# --- the official client against the in-process server -------------------------------------------


def test_official_client_lists_services(channel: grpc.Channel) -> None:
    assert set(ProtoReflectionDescriptorDatabase(channel).get_services()) == ALL_SERVICES


def test_official_client_resolves_the_agent_service_and_its_methods(channel: grpc.Channel) -> None:
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName(AGENT)
    generated = agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"]
    assert [m.name for m in service.methods] == [m.name for m in generated.methods]
    assert "GetReport" in service.methods_by_name and "PrepareUnplug" in service.methods_by_name
    watch = service.methods_by_name["WatchReport"]
    assert watch.output_type.full_name == "unplugd.v1.WatchReportResponse"
    # The reflected descriptors live in their own pool, not the generated code's.
    assert watch.output_type is not agent_service_pb2.WatchReportResponse.DESCRIPTOR
    # Symbols inside a file: a method, a nested name, an enum value.
    for symbol in (f"{AGENT}.GetReport", "unplugd.v1.Report.functions", "unplugd.v1.FUNCTION_STATE_BUSY"):
        assert _file_names(_official(channel, file_containing_symbol=symbol))[0].startswith("unplugd/v1/"), symbol


def test_report_decoded_with_reflected_descriptors_only(channel: grpc.Channel) -> None:
    """What grpcurl does: no generated code, only what reflection serves."""
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    report_desc = pool.FindMessageTypeByName("unplugd.v1.Report")
    assert "functions" in report_desc.fields_by_name
    method = pool.FindMethodByName(f"{AGENT}.GetReport")
    request_cls, response_cls = _message_class(method.input_type), _message_class(method.output_type)
    call = channel.unary_unary(
        f"/{AGENT}/GetReport",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    response = call(request_cls(devices=[str(NIC_FN)]), timeout=10)
    assert type(response) is not agent_service_pb2.GetReportResponse
    report = response.report
    assert report.DESCRIPTOR is report_desc
    assert report.hostname == "fake"
    assert [f.address for f in report.functions] == [str(NIC_FN)]
    state = report.functions[0].state
    function_desc = report_desc.fields_by_name["functions"].message_type
    assert function_desc is not None
    state_enum = function_desc.fields_by_name["state"].enum_type
    assert state_enum is not None
    assert state_enum.values_by_number[state].name == "FUNCTION_STATE_BUSY"
    everything = call(request_cls(), timeout=10).report
    assert {f.address for f in everything.functions} == {str(DISK_FN), str(NIC_FN)}


def test_health_described_as_served(channel: grpc.Channel) -> None:
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    check = pool.FindMethodByName("grpc.health.v1.Health.Check")
    assert pool.FindMethodByName("grpc.health.v1.Health.Watch").server_streaming
    request_cls, response_cls = _message_class(check.input_type), _message_class(check.output_type)
    stub = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    status = stub(request_cls(service=AGENT), timeout=10).status
    status_enum = check.output_type.fields_by_name["status"].enum_type
    assert status_enum is not None
    assert status_enum.values_by_number[status].name == "SERVING"


def test_reflection_describes_itself(channel: grpc.Channel) -> None:
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    for version in ("v1alpha", "v1"):
        method = pool.FindMethodByName(f"grpc.reflection.{version}.ServerReflection.ServerReflectionInfo")
        assert method.client_streaming and method.server_streaming
        ours = reflection_pb2.ServerReflectionRequest.DESCRIPTOR
        assert {f.name: f.number for f in method.input_type.fields} == {f.name: f.number for f in ours.fields}


def test_unknown_names_are_not_found(channel: grpc.Channel) -> None:
    db = ProtoReflectionDescriptorDatabase(channel)
    with pytest.raises(KeyError):
        descriptor_pool.DescriptorPool(db).FindMessageTypeByName("unplugd.v1.NoSuchMessage")
    for request in (
        {"file_containing_symbol": "unplugd.v1.NoSuchMessage"},
        {"file_by_filename": "etc/shadow"},
        {"all_extension_numbers_of_type": "no.Such"},
        {
            "file_containing_extension": reflection_pb2.ExtensionRequest(
                containing_type="unplugd.v1.Report", extension_number=100
            )
        },
    ):
        response = _official(channel, **request)
        assert response.WhichOneof("message_response") == "error_response", request
        assert response.error_response.error_code == NOT_FOUND
    empty = _official(channel, host="h")
    assert empty.error_response.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert empty.valid_host == "h"


def test_one_stream_answers_each_request_in_order(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=s)
        for s in ("unplugd.v1.Report", "nope.Nope", "grpc.health.v1.Health")
    ]
    answers = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    assert [a.original_request for a in answers] == requests
    assert _file_names(answers[0])[0] == "unplugd/v1/report.proto"
    assert answers[1].error_response.error_code == NOT_FOUND
    assert _file_names(answers[2]) == ["grpc/health/v1/health.proto"]


def test_garbage_requests_leave_reflection_serving(channel: grpc.Channel) -> None:
    for service in (V1ALPHA.name, V1.name):
        # No (de)serializers: raw bytes both ways.
        raw = channel.stream_stream(
            f"/{service}/ServerReflectionInfo", request_serializer=None, response_deserializer=None
        )
        for payload in (b"\xff\xff\xff", b"\x22\x03\xff\xfe\xfd", os.urandom(64)):
            try:
                list(raw(iter([payload]), timeout=5))
            except grpc.RpcError as err:
                assert err.code() != grpc.StatusCode.UNAVAILABLE
    assert set(ProtoReflectionDescriptorDatabase(channel).get_services()) == ALL_SERVICES


# --- the real `unplugd serve` under Debian's python3 ---------------------------------------------


def _ours(channel: grpc.Channel, api: Any) -> Callable[..., Any]:
    info = channel.stream_stream(
        f"/{api.name}/ServerReflectionInfo",
        request_serializer=api.request.SerializeToString,
        response_deserializer=api.response.FromString,
    )
    return lambda **request: next(iter(info(iter([api.request(**request)]), timeout=10)))


@pytest.mark.parametrize(
    "agent_process", [pytest.param(("/usr/bin/python3", "unplugd.agent.cli"), id="debian-cli")], indirect=True
)
def test_reflection_under_debian_python(agent_process: tuple[subprocess.Popen[str], Path]) -> None:  # noqa: F811
    _, sock = agent_process
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        for api in (V1ALPHA, V1):  # a raw stub of our own proto copy
            ask = _ours(ch, api)
            assert {s.name for s in ask(list_services="*").list_services_response.service} == ALL_SERVICES
            assert _file_names(ask(file_containing_symbol=f"{AGENT}.GetReport")) == [
                "unplugd/v1/agent_service.proto",
                "google/protobuf/timestamp.proto",
                "unplugd/v1/report.proto",
            ]
            assert ask(file_containing_symbol="no.Such").error_response.error_code == NOT_FOUND
        # and the official client, decoding a response from reflected descriptors alone
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
        method = pool.FindMethodByName(f"{AGENT}.GetAgentInfo")
        request_cls, response_cls = _message_class(method.input_type), _message_class(method.output_type)
        info = ch.unary_unary(
            f"/{AGENT}/GetAgentInfo",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )(request_cls(), timeout=10)
        assert info.version and not info.mutating_enabled
        health_check = pool.FindMethodByName("grpc.health.v1.Health.Check")
        assert health_check.input_type.fields_by_name["service"].number == 1
        assert health_check.containing_service.full_name == health.SERVICE_NAME


LAZY = r"""
import sys
import grpc
from unplugd.agent.rpc import reflection, server  # everything `unplugd serve` imports
from unplugd.v1 import agent_service_pb2, grpc_std_pb2
index = reflection.add_reflection(grpc.server(None), [agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"]])
before = "google.protobuf.descriptor_pb2" in sys.modules
files = index.files_by_name("unplugd/v1/report.proto")
health = "grpc.health.v1.HealthCheckRequest" in grpc_std_pb2.MESSAGES
print(before, index.built, files is not None and len(files) == 2, health)
"""


@pytest.mark.parametrize("python", ["/usr/bin/python3", "venv"])
def test_descriptor_pb2_is_imported_by_the_first_question_only(python: str) -> None:
    """Serving imports no descriptor_pb2 (memory and start-up on PyPI's protobuf); a question builds the index."""
    import sys

    exe = sys.executable if python == "venv" else python
    if not Path(exe).exists():
        pytest.skip(f"no {exe}")
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [exe, "-c", LAZY],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(repo / ".dev"), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert out.stdout.split() == ["False", "True", "True", "True"]
