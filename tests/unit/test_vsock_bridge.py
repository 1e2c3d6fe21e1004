"""The vsock bridge with an injected listener: peer CIDs are faked, the rest is
real (a gRPC server behind, the host's VsockRelay + AgentClient in front)."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from tests.unit.fake_agent import serve_fake_agent
from unplugd.agent.config import parse_config
from unplugd.agent.transports.bridges import BridgeError, start_bridges
from unplugd.agent.transports.vsock import VsockBridge
from unplugd.host.client import AgentClient, AgentUnreachable
from unplugd.host.relays import VsockRelay


class FakeVsockListener:
    """A unix listener; a client binds its socket to `cid-N` to claim CID N."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        conn, peer = self.sock.accept()
        cid = int(Path(peer).name.split("-")[1]) if peer else -1
        return conn, (cid, 40000)

    def close(self) -> None:
        self.sock.close()


_SOCKETS = itertools.count()


def dialer(tmp: Path, listener: Path, source_cid: int) -> Any:
    async def dial(cid: int, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp / f"cid-{source_cid}-{next(_SOCKETS)}"))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, str(listener))
        return sock

    return dial


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture
def agent_sock(tmp_path: Path) -> Any:
    path = tmp_path / "agent.sock"
    server, _ = serve_fake_agent(path)
    yield path
    server.stop(0)


def test_host_cid_accepted_other_cids_refused(tmp_path: Path, agent_sock: Path) -> None:
    async def main() -> None:
        vsock_path = tmp_path / "vsock.sock"
        bridge = VsockBridge(1000, agent_sock, listener_factory=lambda port: FakeVsockListener(vsock_path))
        await bridge.start()
        try:
            host = VsockRelay(3, 1000, dial=dialer(tmp_path, vsock_path, source_cid=2))
            async with AgentClient("vsock:3:1000", relay=host, timeout=5) as client:
                report = await client.get_report(["0000:00:04.0"])
                assert [f.address for f in report.functions] == ["0000:00:04.0"]
                assert (await client.get_agent_info()).version == "test"

            intruder = VsockRelay(3, 1000, dial=dialer(tmp_path, vsock_path, source_cid=3))
            async with AgentClient("vsock:3:1000", relay=intruder, timeout=3, connect_timeout=2) as client:
                with pytest.raises(AgentUnreachable):
                    await client.get_report()
            assert bridge.accepted >= 1
            assert bridge.refused >= 1
        finally:
            await bridge.stop()

    run(main())


def test_allowed_cids_are_configurable(tmp_path: Path, agent_sock: Path) -> None:
    async def main() -> None:
        vsock_path = tmp_path / "vsock.sock"
        bridge = VsockBridge(
            1000, agent_sock, allowed_cids=[3], listener_factory=lambda port: FakeVsockListener(vsock_path)
        )
        await bridge.start()
        try:
            relay = VsockRelay(3, 1000, dial=dialer(tmp_path, vsock_path, source_cid=3))
            async with AgentClient("vsock:3:1000", relay=relay, timeout=5) as client:
                assert (await client.get_agent_info()).hostname == "guest"
            # CID 2 is not special once the list is explicit
            relay2 = VsockRelay(3, 1000, dial=dialer(tmp_path, vsock_path, source_cid=2))
            async with AgentClient("vsock:3:1000", relay=relay2, timeout=3, connect_timeout=2) as client:
                with pytest.raises(AgentUnreachable):
                    await client.get_agent_info()
        finally:
            await bridge.stop()

    run(main())


def test_agent_down_closes_the_vsock_connection_not_the_bridge(tmp_path: Path) -> None:
    async def main() -> None:
        vsock_path = tmp_path / "vsock.sock"
        bridge = VsockBridge(
            1000, tmp_path / "nothing.sock", listener_factory=lambda port: FakeVsockListener(vsock_path)
        )
        await bridge.start()
        try:
            for _ in range(2):
                relay = VsockRelay(3, 1000, dial=dialer(tmp_path, vsock_path, source_cid=2))
                async with AgentClient("vsock:3:1000", relay=relay, timeout=3, connect_timeout=2) as client:
                    with pytest.raises(AgentUnreachable) as exc:
                        await client.get_report()
                    assert "without answering" in str(exc.value)
            assert bridge.accepted >= 2
        finally:
            await bridge.stop()

    run(main())


def test_start_bridges_from_config_in_a_thread(tmp_path: Path, agent_sock: Path) -> None:
    """rpc/server.py's hook: every enabled bridge serves, or the start fails."""
    vsock_path = tmp_path / "vsock.sock"
    dev = tmp_path / "root"
    (dev / "dev").mkdir(parents=True)
    (dev / "sys").mkdir()
    (dev / "proc").mkdir()
    from unplugd.agent.roots import Roots

    config = parse_config({"transports": {"vsock": {"enabled": True, "port": 999}, "virtio_serial": {"enabled": True}}})
    running = start_bridges(
        config, agent_sock, roots=Roots.under(dev), vsock_factory=lambda port: FakeVsockListener(vsock_path)
    )
    try:
        got = {(x.transport, x.address) for x in running.listeners}
        assert ("virtio-serial", str(dev / "dev/virtio-ports/org.unplugd.agent.0")) in got
        assert any(t == "vsock" and a.endswith(":999") for t, a in got)

        async def ask() -> None:
            relay = VsockRelay(3, 999, dial=dialer(tmp_path, vsock_path, source_cid=2))
            async with AgentClient("vsock:3:999", relay=relay, timeout=5) as client:
                assert (await client.get_agent_info()).version == "test"

        run(ask())
    finally:
        running.stop()

    def broken(port: int) -> FakeVsockListener:
        raise OSError(98, "Address already in use")

    # An enabled bridge that cannot listen fails the start: none is left running.
    with pytest.raises(BridgeError, match=r"vsock bridge on .*999.*Address already in use"):
        start_bridges(config, agent_sock, roots=Roots.under(dev), vsock_factory=broken)


def test_connection_limit(tmp_path: Path, agent_sock: Path) -> None:
    """Past max_connections, new peers are refused; the held ones keep working."""

    async def main() -> None:
        vsock_path = tmp_path / "vsock.sock"
        bridge = VsockBridge(
            1000, agent_sock, max_connections=1, listener_factory=lambda port: FakeVsockListener(vsock_path)
        )
        await bridge.start()
        try:
            relay = VsockRelay(3, 1000, dial=dialer(tmp_path, vsock_path, source_cid=2))
            async with AgentClient("vsock:3:1000", relay=relay, timeout=5) as held:
                assert (await held.get_agent_info()).version == "test"
                extra = VsockRelay(3, 1000, dial=dialer(tmp_path, vsock_path, source_cid=2))
                async with AgentClient("vsock:3:1000", relay=extra, timeout=3, connect_timeout=2) as client:
                    with pytest.raises(AgentUnreachable):
                        await client.get_agent_info()
                assert bridge.refused >= 1
                assert (await held.get_report(["f"])).functions[0].address == "f"
        finally:
            await bridge.stop()

    run(main())
