"""AgentClient through the Firecracker / cloud-hypervisor hybrid-vsock relay,
against a fake VMM endpoint that speaks the `CONNECT <port>` handshake."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.unit.fake_agent import serve_fake_agent
from unplugd.host.client import AgentClient, AgentUnreachable
from unplugd.host.relays import Relay, VsockRelay
from unplugd.splice import splice

GUEST_PORT = 1000


@asynccontextmanager
async def fake_vmm(path: Path, agent_sock: Path, *, mode: str = "ok") -> AsyncIterator[list[bytes]]:
    """Firecracker's vsock unix socket: "CONNECT <port>\\n" -> "OK <host port>\\n", then the guest stream.

    mode: ok | refuse (close, as Firecracker does with no listener) | garbage | silent
    """
    lines: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        lines.append(line)
        if mode == "silent":
            await asyncio.sleep(30)
        if mode == "garbage":
            writer.write(b"HELLO?\n")
        if mode != "ok" or line != f"CONNECT {GUEST_PORT}\n".encode():
            writer.close()
            return
        guest = await asyncio.open_unix_connection(str(agent_sock))
        # the answer and the first bytes of the guest stream in one write:
        # the relay must not lose what follows the OK line
        first = await guest[0].read(65536)
        writer.write(b"OK 1073741824\n" + first)
        await splice((reader, writer), guest)

    server = await asyncio.start_unix_server(handle, path=str(path))
    try:
        yield lines
    finally:
        server.close()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture
def agent_sock(tmp_path: Path) -> Iterator[Path]:
    server, _ = serve_fake_agent(tmp_path / "agent.sock")
    yield tmp_path / "agent.sock"
    server.stop(0)


def test_hybrid_vsock_round_trips(tmp_path: Path, agent_sock: Path) -> None:
    async def main() -> None:
        vmm = tmp_path / "fc.vsock"
        async with fake_vmm(vmm, agent_sock) as lines, AgentClient(f"hvsock:{vmm}:{GUEST_PORT}", timeout=5) as client:
            assert [f.address for f in (await client.get_report(["0000:00:05.0"])).functions] == ["0000:00:05.0"]
            messages = [m async for m in client.watch_report(["x"])]
            assert messages[0].initial and len(messages) == 4
            assert lines[0] == b"CONNECT 1000\n"
            # the relay's socket lives in a private directory, owner-only
            relay_dir = client._relay_dir
            assert relay_dir is not None and stat.S_IMODE(os.stat(relay_dir).st_mode) == 0o700
        assert not relay_dir.exists()

    run(main())


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("refuse", "CONNECT refused (the connection was closed)"),
        ("garbage", "CONNECT refused (it answered b'HELLO?\\n')"),
        ("silent", "no answer to CONNECT within 0.8s"),
    ],
)
def test_hybrid_vsock_failures_are_explained(tmp_path: Path, agent_sock: Path, mode: str, message: str) -> None:
    async def main() -> None:
        vmm = tmp_path / "fc.vsock"
        async with (
            fake_vmm(vmm, agent_sock, mode=mode),
            AgentClient(f"hvsock:{vmm}:{GUEST_PORT}", timeout=3, connect_timeout=1) as client,
        ):
            with pytest.raises(AgentUnreachable) as exc:
                await client.get_report()
            assert message in str(exc.value)

    run(main())


def test_hybrid_vsock_without_vmm_socket(tmp_path: Path) -> None:
    async def main() -> None:
        async with AgentClient(f"hvsock:{tmp_path}/none.sock:{GUEST_PORT}", timeout=3, connect_timeout=2) as client:
            with pytest.raises(AgentUnreachable, match="No such file"):
                await client.get_report()

    run(main())


def test_serial_without_chardev_socket(tmp_path: Path) -> None:
    async def main() -> None:
        async with AgentClient(f"serial:{tmp_path}/none.sock", timeout=3, connect_timeout=2) as client:
            with pytest.raises(AgentUnreachable, match=r"virtio-serial chardev .*No such file"):
                await client.get_agent_info()

    run(main())


def test_vsock_without_vsock_device_is_unreachable(tmp_path: Path) -> None:
    """Real AF_VSOCK dialing (the default dialer) to a CID with nothing there."""

    async def main() -> None:
        async with AgentClient("vsock:4294967290:1000", timeout=3, connect_timeout=1) as client:
            with pytest.raises(AgentUnreachable, match="vsock CID 4294967290 port 1000"):
                await client.get_agent_info()

    run(main())


def test_a_dial_that_never_answers_is_named_with_the_timeout() -> None:
    """A vsock connect that hangs (a CID whose guest is frozen) ends at connect_timeout, saying where."""

    async def hang(cid: int, port: int) -> socket.socket:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def main() -> None:
        relay = VsockRelay(3, GUEST_PORT, dial=hang, connect_timeout=0.5)
        async with AgentClient("vsock:3:1000", timeout=3, connect_timeout=1, relay=relay) as client:
            with pytest.raises(AgentUnreachable, match=r"vsock CID 3 port 1000: no answer within 0\.5s"):
                await client.get_agent_info()

    run(main())


class _DropsFirstDial(Relay):
    """Ends grpc's first connection without a reason, as grpc's own handshake timer (20 s, whatever the
    client's connect_timeout) ends an attempt the relay is still carrying; carries the next ones."""

    def __init__(self, agent_sock: Path) -> None:
        super().__init__(connect_timeout=2)
        self.agent_sock = agent_sock
        self.dials = 0

    @property
    def target(self) -> str:
        return "test relay"

    async def _carry(self, client: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.dials += 1
        if self.dials > 1:
            await splice(client, await asyncio.open_unix_connection(str(self.agent_sock)))


def test_an_attempt_the_relay_did_not_explain_is_dialled_again_within_the_timeout(agent_sock: Path) -> None:
    """A guest that answers after grpc gave up on one attempt (an agent restarting) is reached within
    connect_timeout, not reported unreachable at the first failure."""

    async def main() -> None:
        relay = _DropsFirstDial(agent_sock)
        async with AgentClient("vsock:3:1000", timeout=5, connect_timeout=5, relay=relay) as client:
            assert (await client.get_agent_info()).version
        assert relay.dials >= 2

    run(main())


def test_at_the_deadline_the_relay_says_what_it_was_waiting_for(agent_sock: Path) -> None:
    """Every attempt ended unexplained while the relay waited on the guest: the error names the wait."""

    class Waits(_DropsFirstDial):
        async def _carry(self, client: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
            self.waiting = "test relay: no answer from the guest yet"

    async def main() -> None:
        async with AgentClient("vsock:3:1000", timeout=3, connect_timeout=1.5, relay=Waits(agent_sock)) as client:
            with pytest.raises(AgentUnreachable, match=r"no answer from the guest yet \(no connection within 1\.5s\)"):
                await client.get_agent_info()

    run(main())
