"""Health and reflection's messages: protoc's descriptors of proto/grpc/, in a pool of their own.

Why not protoc's ordinary Python code (which adds to the default descriptor
pool): the official grpcio-health-checking and grpcio-reflection define the
same names there, and a pool refuses a name defined twice, so the two could
not be loaded in one process. The first test shows that refusal; the others
that our copy is the standard interface and lives beside the official one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2 as official_health
from grpc_health.v1 import health_pb2_grpc as official_health_grpc
from grpc_reflection.v1alpha import reflection_pb2 as official_reflection

from tests.unit.rpc_fakes import running_server
from unplugd.agent.rpc import health, reflection
from unplugd.v1 import grpc_std_pb2


def _proto(fd: descriptor.FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    out = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(out)
    return out


def test_one_pool_refuses_the_same_names_from_a_second_file() -> None:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_proto(official_health.DESCRIPTOR))
    ours = _proto(health.HealthCheckRequest.DESCRIPTOR.file)
    assert ours.name != official_health.DESCRIPTOR.name  # grpc/health/v1 vs grpc_health/v1
    with pytest.raises(TypeError):
        pool.Add(ours)


def test_ours_live_beside_the_official_packages_not_in_the_default_pool() -> None:
    default = descriptor_pool.Default()
    for name in ("grpc.health.v1.HealthCheckRequest", "grpc.reflection.v1alpha.ServerReflectionRequest"):
        assert default.FindMessageTypeByName(name) is not grpc_std_pb2.MESSAGES[name].DESCRIPTOR
    assert (
        default.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")
        is official_health.HealthCheckRequest.DESCRIPTOR
    )


def _shape(desc: Any) -> object:
    """What the wire and a reflection client see of a message: names, numbers, types, enums, oneofs."""
    return (
        desc.full_name,
        sorted(
            (
                f.name,
                f.number,
                f.type,
                f.is_repeated,
                f.message_type.full_name if f.message_type else "",
                f.containing_oneof.name if f.containing_oneof else "",
            )
            for f in desc.fields
        ),
        sorted((e.full_name, sorted((v.name, v.number) for v in e.values)) for e in desc.enum_types),
    )


def _methods(svc: Any) -> dict[str, object]:
    return {
        m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
        for m in svc.methods
    }


@pytest.mark.parametrize(
    ("ours", "official"),
    [
        (health.HealthCheckRequest.DESCRIPTOR.file, official_health.DESCRIPTOR),
        (reflection.V1ALPHA.request.DESCRIPTOR.file, official_reflection.DESCRIPTOR),
    ],
    ids=["health", "reflection-v1alpha"],
)
def test_same_interface_as_the_official_definitions(ours: Any, official: Any) -> None:
    """Everything we declare, the official package declares alike (newer ones add to health: List)."""
    assert ours.package == official.package
    for name, desc in ours.message_types_by_name.items():
        assert _shape(desc) == _shape(official.message_types_by_name[name]), name
    for name, svc in ours.services_by_name.items():
        theirs = _methods(official.services_by_name[name])
        assert {m: theirs[m] for m in _methods(svc)} == _methods(svc)


def test_v1_reflection_declares_what_v1alpha_does_in_its_own_package() -> None:
    v1alpha, v1 = reflection.V1ALPHA.request.DESCRIPTOR.file, reflection.V1.request.DESCRIPTOR.file
    assert (v1alpha.package, v1.package) == ("grpc.reflection.v1alpha", "grpc.reflection.v1")

    def strip(shape: object) -> str:
        return repr(shape).replace(".v1alpha.", ".v1.")

    for name, desc in v1alpha.message_types_by_name.items():
        assert strip(_shape(desc)) == repr(_shape(v1.message_types_by_name[name])), name


def test_the_official_health_client_checks_and_watches_our_servicer(tmp_path: Path) -> None:
    with running_server(tmp_path) as (server, _), grpc.insecure_channel(server.target) as channel:
        stub = official_health_grpc.HealthStub(channel)
        request = official_health.HealthCheckRequest(service="unplugd.v1.AgentService")
        assert stub.Check(request, timeout=10).status == official_health.HealthCheckResponse.SERVING
        watch = stub.Watch(official_health.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert next(watch).status == official_health.HealthCheckResponse.SERVICE_UNKNOWN
        watch.cancel()
