"""AgentService in process over a unix socket: every RPC, status mapping, bad arguments."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from tests.unit.rpc_fakes import (
    DISK_FN,
    NIC_FN,
    FakeEngine,
    FakeLinks,
    cancel,
    details,
    next_message,
    running_server,
    trailing_values,
)
from unplugd.agent.errors import NotPermitted, ParseError
from unplugd.agent.rpc.errors import REASON_METADATA_KEY
from unplugd.leaselabel import lease_label
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import report_pb2


def _code(call: object) -> grpc.StatusCode:
    assert isinstance(call, grpc.RpcError)
    return call.code()


def test_get_report_all_and_filtered(tmp_path: Path) -> None:
    engine = FakeEngine()
    with running_server(tmp_path, engine) as (_, stub):
        everything = stub.GetReport(pb.GetReportRequest(), timeout=5).report
        assert [f.address for f in everything.functions] == [str(DISK_FN), str(NIC_FN)]
        assert everything.functions[1].state == report_pb2.FUNCTION_STATE_BUSY
        only = stub.GetReport(pb.GetReportRequest(devices=["eth1"]), timeout=5).report
        assert [f.address for f in only.functions] == [str(NIC_FN)]
    assert ("inspect", (("eth1",), {}, frozenset())) in engine.calls


def test_get_report_functions_only_asks_the_engine_for_functions_alone(tmp_path: Path) -> None:
    engine = FakeEngine()
    with running_server(tmp_path, engine) as (_, stub):
        listed = stub.GetReport(pb.GetReportRequest(functions_only=True), timeout=5).report
        assert [f.address for f in listed.functions] == [str(DISK_FN), str(NIC_FN)]
        with pytest.raises(grpc.RpcError) as err:
            stub.GetReport(pb.GetReportRequest(functions_only=True, devices=["eth1"]), timeout=5)
        assert _code(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert [what for what, _ in engine.calls] == ["functions"]  # no scan, no inspect


def test_socket_is_root_only_and_removed_on_stop(tmp_path: Path) -> None:
    with running_server(tmp_path) as (server, _):
        mode = os.stat(server.socket_path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        path = server.socket_path
    assert not path.exists()


def test_agent_info(tmp_path: Path) -> None:
    with running_server(tmp_path) as (server, stub):
        info = stub.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=5)
        assert info.kernel == os.uname().release
        assert info.hostname == os.uname().nodename
        assert [(x.transport, x.address) for x in info.listeners] == [("unix", str(server.socket_path))]
        assert not info.mutating_enabled
        assert "prepare" not in info.capabilities and "watch" in info.capabilities
    with running_server(tmp_path, mutations=True) as (_, stub):
        info = stub.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=5)
        assert info.mutating_enabled and "prepare" in info.capabilities


def test_agent_info_reports_its_footprint(tmp_path: Path) -> None:
    """The server runs in this process: its figures are this process's, watchers counted live."""
    me = psutil.Process()
    with running_server(tmp_path) as (_, stub):
        res = stub.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=5).resources
        assert 0.5 < res.rss_bytes / me.memory_info().rss < 2
        assert res.threads >= 2 and res.open_fds > 3
        assert abs(res.started_at.ToNanoseconds() / 1e9 - me.create_time()) < 1
        assert res.cpu_user_seconds > 0 and (res.leases, res.watchers) == (0, 0)
        stream = stub.WatchReport(pb.WatchReportRequest(), timeout=10)
        next_message(stream)
        assert stub.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=5).resources.watchers == 1
        cancel(stream)


@pytest.fixture
def no_file_access() -> Iterator[list[str]]:
    """Records every open/stat-like audit event whose path mentions the probe names."""
    seen: list[str] = []
    armed = [True]

    def hook(event: str, args: tuple[object, ...]) -> None:
        if armed[0] and event in ("open", "os.listdir", "os.scandir", "os.readlink") and args:
            text = str(args[0])
            if "shadow" in text or "/dev/../" in text or "nonexistent-x" in text:
                seen.append(f"{event} {text}")

    sys.addaudithook(hook)  # audit hooks cannot be removed: disarm instead
    try:
        yield seen
    finally:
        armed[0] = False


@pytest.mark.parametrize(
    "name",
    ["../../etc/shadow", "/dev/../x", "/etc/shadow", "nonexistent-x", "0000:00:1f.7", "zz:zz:zz.z", "vdb/../../shadow"],
)
def test_unknown_names_are_not_found_without_touching_files(
    tmp_path: Path, name: str, no_file_access: list[str]
) -> None:
    with running_server(tmp_path) as (_, stub):
        with pytest.raises(grpc.RpcError) as err:
            stub.GetReport(pb.GetReportRequest(devices=[name]), timeout=5)
        assert _code(err.value) == grpc.StatusCode.NOT_FOUND
        assert name in details(err.value)
    assert no_file_access == []


@pytest.mark.parametrize("names", [[""], ["   "], ["vdb\x00"], ["a\nb"], ["x" * 300], ["vdb"] * 600])
def test_malformed_names_are_invalid_argument(tmp_path: Path, names: list[str]) -> None:
    with running_server(tmp_path) as (_, stub):
        for call in (
            lambda: stub.GetReport(pb.GetReportRequest(devices=names), timeout=5),
            lambda: list(stub.WatchReport(pb.WatchReportRequest(devices=names), timeout=5)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert _code(err.value) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NotPermitted("/proc/1/fd", "Permission denied"), grpc.StatusCode.UNAVAILABLE),
        (ParseError("mountinfo", "truncated"), grpc.StatusCode.UNAVAILABLE),
        (RuntimeError("boom"), grpc.StatusCode.INTERNAL),
        (KeyError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_engine_failures_map_to_status_and_server_keeps_serving(
    tmp_path: Path, exc: Exception, code: grpc.StatusCode
) -> None:
    engine = FakeEngine()
    with running_server(tmp_path, engine) as (_, stub):
        engine.fail_with = exc
        with pytest.raises(grpc.RpcError) as err:
            stub.GetReport(pb.GetReportRequest(), timeout=5)
        assert _code(err.value) == code
        engine.fail_with = None
        assert len(stub.GetReport(pb.GetReportRequest(), timeout=5).report.functions) == 2


def test_mutations_refused_when_disabled(tmp_path: Path) -> None:
    links = FakeLinks()
    with running_server(tmp_path, links=links) as (server, stub):
        for call in (
            lambda: stub.PrepareUnplug(pb.PrepareUnplugRequest(devices=["eth1"]), timeout=5),
            lambda: stub.ReleaseUnplug(pb.ReleaseUnplugRequest(lease_id="x"), timeout=5),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert _code(err.value) == grpc.StatusCode.PERMISSION_DENIED
            assert "mutations" in details(err.value)
        assert server.leases.leased() == {}
    assert links.log == []


def test_prepare_report_leased_renew_release(tmp_path: Path) -> None:
    engine = FakeEngine()
    links = FakeLinks(up={"eth1"})
    with running_server(tmp_path, engine, mutations=True, links=links) as (server, stub):
        grant = stub.PrepareUnplug(
            pb.PrepareUnplugRequest(devices=["eth1"], lease_seconds=30, take_interfaces_down=True), timeout=5
        )
        assert list(grant.functions) == [str(NIC_FN)]
        assert list(grant.interfaces_down) == ["eth1"] and "eth1" not in links.up
        assert grant.lease_id and grant.expires_at.seconds > 0
        report = stub.GetReport(pb.GetReportRequest(devices=["eth1"]), timeout=5).report
        assert report.functions[0].reasons[0].code == report_pb2.REASON_CODE_LEASED
        assert server.leases.leased() == {NIC_FN: lease_label(grant.lease_id)}

        again = stub.PrepareUnplug(pb.PrepareUnplugRequest(lease_id=grant.lease_id, lease_seconds=60), timeout=5)
        assert again.lease_id == grant.lease_id
        assert again.expires_at.seconds >= grant.expires_at.seconds + 29
        with pytest.raises(grpc.RpcError) as err:  # a renewal cannot change the devices
            stub.PrepareUnplug(pb.PrepareUnplugRequest(lease_id=grant.lease_id, devices=["vdb"]), timeout=5)
        assert _code(err.value) == grpc.StatusCode.INVALID_ARGUMENT

        with pytest.raises(grpc.RpcError) as err:  # already leased
            stub.PrepareUnplug(pb.PrepareUnplugRequest(devices=[str(NIC_FN)]), timeout=5)
        assert _code(err.value) == grpc.StatusCode.FAILED_PRECONDITION

        done = stub.ReleaseUnplug(pb.ReleaseUnplugRequest(lease_id=grant.lease_id), timeout=5)
        assert done.released and list(done.interfaces_restored) == ["eth1"]
        assert "eth1" in links.up and server.leases.leased() == {}
        with pytest.raises(grpc.RpcError) as err:
            stub.ReleaseUnplug(pb.ReleaseUnplugRequest(lease_id=grant.lease_id), timeout=5)
        assert _code(err.value) == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            stub.PrepareUnplug(pb.PrepareUnplugRequest(lease_id="no-such-lease"), timeout=5)
        assert _code(err.value) == grpc.StatusCode.NOT_FOUND


def test_prepare_claim_failure_is_failed_precondition_with_reasons(tmp_path: Path) -> None:
    links = FakeLinks(up={"eth1"})
    with running_server(tmp_path, mutations=True, links=links) as (server, stub):
        # The server runs on a captured tree: the disk cannot be claimed, so the
        # whole call fails and the NIC named with it is not left down or leased.
        with pytest.raises(grpc.RpcError) as err:
            stub.PrepareUnplug(pb.PrepareUnplugRequest(devices=["eth1", "vdb"], take_interfaces_down=True), timeout=5)
        assert _code(err.value) == grpc.StatusCode.FAILED_PRECONDITION
        reasons = trailing_values(err.value, REASON_METADATA_KEY)
        assert len(reasons) == 1 and reasons[0].startswith("vdb:")
        assert "vdb" in details(err.value)
        assert server.leases.leased() == {} and server.leases.own_claims() == frozenset()
        assert "eth1" in links.up and links.log == []


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (pb.PrepareUnplugRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.PrepareUnplugRequest(devices=["../../etc/shadow"]), grpc.StatusCode.NOT_FOUND),
        (pb.PrepareUnplugRequest(devices=["eth1\x00"]), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_prepare_bad_arguments(tmp_path: Path, request_: pb.PrepareUnplugRequest, code: grpc.StatusCode) -> None:
    with running_server(tmp_path, mutations=True) as (server, stub):
        with pytest.raises(grpc.RpcError) as err:
            stub.PrepareUnplug(request_, timeout=5)
        assert _code(err.value) == code
        with pytest.raises(grpc.RpcError) as err:
            stub.ReleaseUnplug(pb.ReleaseUnplugRequest(), timeout=5)
        assert _code(err.value) == grpc.StatusCode.INVALID_ARGUMENT
        assert server.leases.leased() == {}


def test_stop_releases_leases(tmp_path: Path) -> None:
    links = FakeLinks(up={"eth1"})
    with running_server(tmp_path, mutations=True, links=links) as (server, stub):
        stub.PrepareUnplug(pb.PrepareUnplugRequest(devices=["eth1"], take_interfaces_down=True), timeout=5)
        assert "eth1" not in links.up
    assert server.leases.leased() == {}
    assert "eth1" in links.up


def test_stale_socket_replaced_live_one_refused(tmp_path: Path) -> None:
    import socket

    from unplugd.agent.rpc.server import ServeError, _prepare_socket_path

    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound, never listening: what a killed agent leaves
    _prepare_socket_path(path)
    assert not path.exists()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
        with pytest.raises(ServeError, match="another agent"):
            _prepare_socket_path(path)
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(ServeError, match="not a socket"):
        _prepare_socket_path(path)
    assert path.read_text() == "not a socket"


def test_a_socket_directory_that_cannot_be_made_is_one_clear_error(tmp_path: Path) -> None:
    """A file where the socket's directory should be once surfaced as "[Errno 17] File exists" naming
    only the file, not what serve was doing."""
    from unplugd.agent.rpc.server import ServeError, _prepare_socket_path

    (tmp_path / "run").write_text("a file, not a directory")
    with pytest.raises(ServeError, match=rf"^cannot make the socket's directory {tmp_path}/run/sub: "):
        _prepare_socket_path(tmp_path / "run" / "sub" / "agent.sock")
