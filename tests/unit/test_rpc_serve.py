"""`serve` as a process: starts, answers (AgentService and grpc.health.v1), stops cleanly on SIGTERM.

Run under this venv (current grpcio/protobuf) and under Debian's /usr/bin/python3
(python3-grpcio 1.51, python3-protobuf 3.21), which the guest package uses.
Served from a captured (empty) tree so nothing here depends on this machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import REPO
from tests.serving import wait_accepting
from tests.unit.rpc_fakes import next_message, running_server
from unplugd.agent.daemon.scans import ModuleEngine
from unplugd.agent.rpc import health
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import agent_service_pb2_grpc

# (python, entry module): `unplugd serve` through the CLI, and the serve module on its own.
PYTHONS = [
    pytest.param((sys.executable, "unplugd.agent.serve"), id="venv"),
    pytest.param(("/usr/bin/python3", "unplugd.agent.cli"), id="debian-cli"),
]


def _health_check(channel: grpc.Channel, service: str = "") -> int:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health.HealthCheckRequest.SerializeToString,
        response_deserializer=health.HealthCheckResponse.FromString,
    )
    return int(check(health.HealthCheckRequest(service=service), timeout=5).status)


@pytest.fixture
def agent_process(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    python, entry = request.param
    if not Path(python).exists():
        pytest.skip(f"{python} missing")
    probe = subprocess.run([python, "-c", "import grpc, google.protobuf"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.fail(f"{python} lacks grpcio/protobuf (`make dev` installs Debian's python3-grpcio)")
    sock = tmp_path / "run" / "agent.sock"
    (tmp_path / "tree").mkdir()
    env = {"PYTHONPATH": str(REPO / ".dev"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [
            python,
            "-m",
            entry,
            "serve",
            "--socket",
            str(sock),
            "--root",
            str(tmp_path / "tree"),
            "--log-format",
            "text",
            "--config",
            str(REPO / "packaging" / "config.toml"),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_accepting(proc, sock)
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.parametrize("agent_process", PYTHONS, indirect=True)
def test_serve_answers_and_stops_on_sigterm(agent_process: tuple[subprocess.Popen[str], Path]) -> None:
    proc, sock = agent_process
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        info = stub.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=10)
        assert info.version and not info.mutating_enabled
        report = stub.GetReport(pb.GetReportRequest(), timeout=10).report
        assert report.from_capture and len(report.functions) == 0
        with pytest.raises(grpc.RpcError) as err:
            stub.GetReport(pb.GetReportRequest(devices=["../../etc/shadow"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert _health_check(channel) == health.SERVING
        assert _health_check(channel, "unplugd.v1.AgentService") == health.SERVING
        # SIGTERM while a watch stream is open: the stream ends, the agent exits 0.
        stream = stub.WatchReport(pb.WatchReportRequest(), timeout=30)
        assert next_message(stream).initial
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with pytest.raises((StopIteration, grpc.RpcError)):
            next_message(stream)
    _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr
    assert time.monotonic() - t0 < 5
    assert not sock.exists()
    assert "msg=stopped" in stderr


def test_garbage_requests_leave_the_server_serving(tmp_path: Path) -> None:
    with running_server(tmp_path) as (server, stub), grpc.insecure_channel(server.target) as channel:
        for method in ("GetReport", "PrepareUnplug", "ReleaseUnplug", "GetAgentInfo"):
            # No (de)serializers: raw bytes both ways.
            raw = channel.unary_unary(
                f"/unplugd.v1.AgentService/{method}", request_serializer=None, response_deserializer=None
            )
            for payload in (b"\xff\xff\xff", b"\x0a\x05abc", os.urandom(64)):
                try:
                    raw(payload, timeout=5)
                except grpc.RpcError as err:
                    assert err.code() != grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as unknown:
            raw = channel.unary_unary(
                "/unplugd.v1.AgentService/NoSuchCall", request_serializer=None, response_deserializer=None
            )
            raw(b"", timeout=5)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert len(stub.GetReport(pb.GetReportRequest(), timeout=5).report.functions) == 2


def test_health_unknown_service_and_watch(tmp_path: Path) -> None:
    with running_server(tmp_path) as (server, _), grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            _health_check(channel, "no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health.HealthCheckRequest.SerializeToString,
            response_deserializer=health.HealthCheckResponse.FromString,
        )
        stream = watch(health.HealthCheckRequest(service=""), timeout=10)
        assert next_message(stream).status == health.SERVING
        server.stop(grace=0.2)  # shutting down: watchers hear NOT_SERVING
        assert next_message(stream).status == health.NOT_SERVING


def test_real_engine_never_turns_names_into_paths(tmp_path: Path) -> None:
    seen: list[str] = []
    armed = [True]

    def hook(event: str, args: tuple[object, ...]) -> None:
        if armed[0] and event == "open" and args and "shadow" in str(args[0]):
            seen.append(str(args[0]))

    sys.addaudithook(hook)
    try:
        with running_server(tmp_path, ModuleEngine()) as (_, stub):
            for name in ("../../etc/shadow", "/etc/shadow", "../../../../../../etc/shadow"):
                with pytest.raises(grpc.RpcError) as err:
                    stub.GetReport(pb.GetReportRequest(devices=[name]), timeout=10)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        armed[0] = False
    assert seen == []


@pytest.mark.parametrize("agent_process", PYTHONS, indirect=True)
def test_serving_maps_neither_python_ssl_nor_hashlib(agent_process: tuple[subprocess.Popen[str], Path]) -> None:
    """Each maps OpenSSL's libcrypto, ~4 MiB of RSS (daemon/footprint.py): TLS and leases load them when used."""
    proc, sock = agent_process
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        assert stub.GetReport(pb.GetReportRequest(), timeout=10).report.from_capture
    mapped = {os.path.basename(line.split()[-1]) for line in Path(f"/proc/{proc.pid}/maps").read_text().splitlines()}
    assert any(n.startswith("_asyncio.") for n in mapped)  # grpc's cygrpc imported asyncio, without ssl
    # Python's own: Debian's libgrpc links the system's libssl itself, which no import can avoid.
    assert [n for n in mapped if n.startswith(("_ssl.", "_hashlib."))] == []
