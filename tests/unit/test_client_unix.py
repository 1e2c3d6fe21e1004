"""AgentClient and SyncAgentClient against the real in-process agent server
(agent/rpc/server.py with a fake engine) over its unix socket."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import cast

import grpc
import pytest

from tests.probe import probe
from tests.unit.fake_agent import serve_fake_agent
from tests.unit.rpc_fakes import DISK_FN, NIC_FN, FakeEngine, running_server
from unplugd.host.client import (
    EMPTY_REQUEST,
    GET_REPORT_METHOD,
    AgentAddress,
    AgentCallFailed,
    AgentClient,
    AgentUnreachable,
    SyncAgentClient,
    parse_address,
)
from unplugd.v1 import agent_service_pb2, agent_service_pb2_grpc, report_pb2


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def test_read_calls_and_error_status(tmp_path: Path) -> None:
    with running_server(tmp_path) as (server, _):

        async def main() -> None:
            async with AgentClient(server.target, timeout=5) as client:
                report = await client.get_report()
                assert {f.address for f in report.functions} == {str(DISK_FN), str(NIC_FN)}
                only = await client.get_report(["vdb"])
                assert [f.address for f in only.functions] == [str(DISK_FN)]
                info = await client.get_agent_info()
                assert info.mutating_enabled is False
                assert [(x.transport, x.address) for x in info.listeners] == [("unix", str(server.socket_path))]
                with pytest.raises(AgentCallFailed) as exc:
                    await client.get_report(["nope0"])
                assert exc.value.code == grpc.StatusCode.NOT_FOUND
                assert "nope0" in exc.value.details
                with pytest.raises(AgentCallFailed) as exc:
                    await client.prepare_unplug([str(DISK_FN)], 30)
                assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED

        run(main())


def test_prepare_release_and_watch(tmp_path: Path) -> None:
    engine = FakeEngine()
    with running_server(tmp_path, engine, mutations=True) as (server, _):

        async def main() -> None:
            async with AgentClient(server.target, timeout=5) as client:
                lease = await client.prepare_unplug([str(NIC_FN)], 30, take_interfaces_down=True)
                assert lease.lease_id and list(lease.functions) == [str(NIC_FN)]
                renewed = await client.prepare_unplug([str(NIC_FN)], 60, lease_id=lease.lease_id)
                assert renewed.lease_id == lease.lease_id
                assert (await client.release_unplug(lease.lease_id)).released
                with pytest.raises(AgentCallFailed) as exc:
                    await client.release_unplug(lease.lease_id)
                assert exc.value.code == grpc.StatusCode.NOT_FOUND

                stream = client.watch_report([str(DISK_FN)])
                first = await anext(stream)
                assert first.initial and list(first.changed) == [str(DISK_FN)]
                engine.set_state(DISK_FN, report_pb2.FUNCTION_STATE_BUSY)
                server.hub.poke()
                change = await asyncio.wait_for(anext(stream), 5)
                assert list(change.changed) == [str(DISK_FN)]
                assert change.report.functions[0].state == report_pb2.FUNCTION_STATE_BUSY
                await stream.aclose()

        run(main())


def test_sync_facade(tmp_path: Path) -> None:
    engine = FakeEngine()
    with running_server(tmp_path, engine) as (server, _), SyncAgentClient(server.target, timeout=5) as client:
        assert len(client.get_report().functions) == 2
        assert client.get_agent_info().listeners[0].transport == "unix"
        stream = client.watch_report()
        assert next(stream).initial
        engine.set_state(NIC_FN, report_pb2.FUNCTION_STATE_READY)
        server.hub.poke()
        assert list(next(stream).changed) == [str(NIC_FN)]
        stream.close()
        with pytest.raises(AgentCallFailed):
            client.get_report(["nope0"])


def test_sync_facade_takes_the_clients_options(tmp_path: Path) -> None:
    """Its options are AgentClient's: connect_timeout reaches the client; a misspelt one is refused."""
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen()  # never accepts: the connection waits in the backlog, grpc's handshake never ends
    try:
        with (
            SyncAgentClient(f"unix:{tmp_path}/silent.sock", timeout=5, connect_timeout=0.5) as client,
            pytest.raises(AgentUnreachable, match=r"no connection within 0\.5s"),
        ):
            client.get_agent_info()
    finally:
        silent.close()
    with pytest.raises(TypeError, match="conect_timeout"):
        SyncAgentClient(f"unix:{tmp_path}/silent.sock", conect_timeout=1)  # type: ignore[call-arg]


def test_missing_socket_is_unreachable_quickly(tmp_path: Path) -> None:
    async def main() -> None:
        address = f"unix:{tmp_path}/nothing.sock"
        async with AgentClient(address, timeout=5, connect_timeout=5) as client:
            t0 = time.monotonic()
            with pytest.raises(AgentUnreachable) as exc:
                await client.get_report()
            assert time.monotonic() - t0 < 2.0
            assert exc.value.address == address
            assert "unreachable" in str(exc.value)

    run(main())


def test_deadline_is_enforced(tmp_path: Path) -> None:
    server, _ = serve_fake_agent(tmp_path / "a.sock")
    try:

        async def main() -> None:
            async with AgentClient(f"unix:{tmp_path}/a.sock", timeout=0.5) as client:
                t0 = time.monotonic()
                with pytest.raises(AgentUnreachable, match=r"no answer within 0\.5s"):
                    await client.get_report(["slow"])
                assert time.monotonic() - t0 < 1.5
                # a per-call timeout wins over the client's
                assert len((await client.get_report(["slow"], timeout=5)).functions) == 1

        run(main())
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/unplugd/agent.sock", AgentAddress("unix", path="/run/unplugd/agent.sock")),
        ("vsock:3:1000", AgentAddress("vsock", cid=3, port=1000)),
        ("hvsock:/run/fc/v.sock:1000", AgentAddress("hvsock", path="/run/fc/v.sock", port=1000)),
        ("hvsock:/odd:path.sock:52", AgentAddress("hvsock", path="/odd:path.sock", port=52)),
        (
            "serial:/var/lib/libvirt/qemu/channel/target/d/org.unplugd.agent.0",
            AgentAddress("serial", path="/var/lib/libvirt/qemu/channel/target/d/org.unplugd.agent.0"),
        ),
        ("tcp:10.0.0.5:7443", AgentAddress("tcp", host="10.0.0.5", port=7443)),
        ("tcp:[fd00::5]:7443", AgentAddress("tcp", host="fd00::5", port=7443)),
        ("tcp:guest.example:7443", AgentAddress("tcp", host="guest.example", port=7443)),
    ],
)
def test_parse_address(text: str, expected: AgentAddress) -> None:
    assert parse_address(text) == expected
    assert parse_address(str(expected)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unix",
        "unix:",
        "vsock:3",
        "vsock:x:1",
        "vsock:3:-1",
        "vsock:3:99999999999",
        "hvsock:/p",
        "hvsock::5",
        "tcp:host",
        "tcp:host:65536",
        "tcp::80",
        "http://x",
        "qmp:/x",
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_a_report_started_early_is_sent_at_once_and_answers_the_first_full_read(tmp_path: Path) -> None:
    """status, check and unplug ask before importing the rest (cli.open_session): the agent scans meanwhile."""
    engine = FakeEngine()
    with running_server(tmp_path, engine) as (server, _):

        async def main() -> None:
            async with AgentClient(server.target, timeout=5) as client:
                await client.start_report()
                deadline = time.monotonic() + 10
                while not engine.calls and time.monotonic() < deadline:
                    time.sleep(0.01)  # the event loop blocked, as by imports: the request is out all the same
                assert [c for c, _ in engine.calls if c == "inspect"] == ["inspect"]
                engine.set_state(DISK_FN, report_pb2.FUNCTION_STATE_BUSY)
                first = await client.get_report()  # the early answer, from before the change
                assert {f.address: f.state for f in first.functions}[str(DISK_FN)] == report_pb2.FUNCTION_STATE_READY
                again = await client.get_report()  # a new call
                assert {f.address: f.state for f in again.functions}[str(DISK_FN)] == report_pb2.FUNCTION_STATE_BUSY
                assert [c for c, _ in engine.calls if c == "inspect"] == ["inspect", "inspect"]
                await client.start_report()  # never read: closing drops it quietly

        run(main())


def test_a_report_started_early_fails_where_it_is_read(tmp_path: Path) -> None:
    async def main() -> None:
        async with AgentClient(f"unix:{tmp_path / 'none.sock'}", connect_timeout=1) as client:
            await client.start_report()  # no agent there: nothing raised yet
            with pytest.raises(AgentUnreachable):
                await client.get_report()

    run(main())


class _MethodRecorder:
    """A stand-in channel: the generated stub tells it each method's path."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    def unary_unary(self, method: str, *args: object, **kwargs: object) -> None:
        self.methods.append(method)

    unary_stream = unary_unary


def test_the_early_request_is_the_generated_get_report_with_no_fields() -> None:
    """start_report sends bytes it wrote itself (before protobuf is imported): they must be what the stub sends."""
    channel = _MethodRecorder()
    agent_service_pb2_grpc.AgentServiceStub(cast(grpc.Channel, channel))
    assert GET_REPORT_METHOD in channel.methods
    assert GET_REPORT_METHOD.endswith("/GetReport")
    assert agent_service_pb2.GetReportRequest().SerializeToString() == EMPTY_REQUEST


# A fresh process: the test process has imported protobuf long ago.
EARLY_PROBE = """
import asyncio, sys
from unplugd.host.client import AgentClient

async def main():
    async with AgentClient(sys.argv[1], timeout=10) as client:
        await client.start_report()
        loaded = "google.protobuf" in sys.modules
        report = await client.get_report()
        return loaded, sorted(f.address for f in report.functions)

print(repr(asyncio.run(main())))
"""


def test_the_early_request_goes_out_before_protobuf_is_imported(tmp_path: Path) -> None:
    with running_server(tmp_path) as (server, _):
        loaded, addresses = probe(EARLY_PROBE, server.target)
    assert loaded is False
    assert addresses == sorted([str(DISK_FN), str(NIC_FN)])


def test_an_answer_that_is_no_report_fails_as_a_call_early_or_not(tmp_path: Path) -> None:
    """A broken or hostile agent's bytes: an AgentCallFailed either way, never a parser's exception."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    garbage = grpc.unary_unary_rpc_method_handler(lambda request, context: b"\xff\xff\xff")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("unplugd.v1.AgentService", {"GetReport": garbage}),)
    )
    server.add_insecure_port(f"unix:{tmp_path / 'agent.sock'}")
    server.start()
    try:

        async def main() -> None:
            async with AgentClient(f"unix:{tmp_path / 'agent.sock'}", timeout=5) as client:
                await client.start_report()
                with pytest.raises(AgentCallFailed) as early:
                    await client.get_report()
                with pytest.raises(AgentCallFailed) as late:
                    await client.get_report(["vdb"])
            for failed in (early.value, late.value):
                assert failed.code == grpc.StatusCode.INTERNAL
                assert failed.method == "GetReport"

        run(main())
    finally:
        server.stop(None)
