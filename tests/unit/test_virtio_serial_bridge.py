"""The virtio-serial bridge against a fake port with the kernel driver's semantics,
a real gRPC server behind it and the host's serial relay + AgentClient in front."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.fake_agent import SLOW_SECONDS, FakeAgent, serve_fake_agent
from tests.unit.fake_virtio_port import FakeChardev, FakePortHandle, FakeVirtioPort
from unplugd.agent.transports.virtio_serial import HIGH_WATER, VirtioSerialBridge
from unplugd.framing import MAX_FRAME, Frame, FrameDecoder, FrameKind, encode_frame
from unplugd.host.client import AgentClient, AgentUnreachable
from unplugd.v1 import report_pb2


@dataclass
class Rig:
    port: FakeVirtioPort
    bridge: VirtioSerialBridge
    chardev: FakeChardev
    agent: FakeAgent
    agent_sock: Path

    @property
    def address(self) -> str:
        return f"serial:{self.chardev.path}"


@asynccontextmanager
async def rig(
    tmp_path: Path,
    *,
    visible_hangup: bool = True,
    agent: bool = True,
    opener: Callable[[FakeVirtioPort], Callable[[], FakePortHandle]] | None = None,
) -> AsyncIterator[Rig]:
    agent_sock = tmp_path / "agent.sock"
    server, fake = serve_fake_agent(agent_sock) if agent else (None, FakeAgent())
    port = FakeVirtioPort()
    bridge = VirtioSerialBridge(
        opener(port) if opener else port.open,
        agent_sock,
        address="fake",
        hup_retry=0.05,
        max_hup_retry=0.2,
        reopen_delay=0.05,
    )
    chardev = FakeChardev(port, tmp_path / "chardev.sock", visible_hangup=visible_hangup)
    await chardev.start()
    await bridge.start()
    for _ in range(100):
        if bridge.stats.port_opens:
            break
        await asyncio.sleep(0.01)
    try:
        yield Rig(port, bridge, chardev, fake, agent_sock)
    finally:
        await bridge.stop()
        await chardev.stop()
        if server is not None:
            server.stop(0)
        port.close()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def names(report: report_pb2.Report) -> list[str]:
    return [f.address for f in report.functions]


def test_two_host_clients_in_turn_get_their_own_answers(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            for devices in (["0000:00:04.0"], ["0000:00:05.0", "0000:00:06.0"]):
                async with AgentClient(r.address, timeout=5) as client:
                    assert names(await client.get_report(devices)) == devices
                    info = await client.get_agent_info()
                    assert info.version == "test"
            assert r.chardev.clients == 2
            assert r.bridge.stats.sessions == 2
            assert r.bridge.stats.port_opens == 1

    run(main())


def test_watch_stream_and_errors_cross_the_bridge(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r, AgentClient(r.address, timeout=5) as client:
            messages = [m async for m in client.watch_report(["0000:00:07.0"])]
            assert messages[0].initial and len(messages) == 4
            assert [m.report.functions[0].state for m in messages[1:]] == [
                report_pb2.FUNCTION_STATE_BUSY,
                report_pb2.FUNCTION_STATE_READY,
                report_pb2.FUNCTION_STATE_BUSY,
            ]
            lease = await client.prepare_unplug(["0000:00:07.0"], 30)
            assert (await client.release_unplug(lease.lease_id)).released

    run(main())


def test_garbage_between_frames_does_not_kill_the_session_or_the_bridge(tmp_path: Path) -> None:
    async def main() -> None:
        rng = random.Random(7)
        async with rig(tmp_path) as r, AgentClient(r.address, timeout=5) as client:
            assert names(await client.get_report(["a"])) == ["a"]
            # The session is idle: inject junk into the host -> guest stream
            # right between frames: random bytes, a fake magic, a frame of an
            # unknown session, a frame with a broken checksum.
            broken = bytearray(encode_frame(Frame(FrameKind.DATA, 1234, b"x" * 40)))
            broken[-1] ^= 0xFF
            junk = (
                rng.randbytes(3000)
                + b"\x9fUPD\x01"
                + encode_frame(Frame(FrameKind.DATA, 999, b"stale"))
                + bytes(broken)
            )
            r.port.host_socket.send(junk)
            await asyncio.sleep(0.2)
            for i in range(3):
                assert names(await client.get_report([f"dev{i}"])) == [f"dev{i}"]
            assert r.bridge.stats.skipped_bytes >= 3000
            assert r.bridge.stats.stale_frames >= 1
            assert r.bridge.stats.rejected_frames >= 1
            assert r.bridge.stats.sessions == 1

    run(main())


def test_invisible_host_turnover_with_stale_bytes(tmp_path: Path) -> None:
    """A host client dies mid-call without CLOSE and without the guest
    noticing; the agent's late answer for it sits in the port. The next
    client's relay sees those stale frames first, drops them, gets its answer."""

    async def main() -> None:
        async with rig(tmp_path, visible_hangup=False) as r:
            first = AgentClient(r.address, timeout=10)
            call = asyncio.ensure_future(first.get_report(["slow"]))  # the agent takes SLOW_SECONDS
            await asyncio.sleep(0.5)
            r.chardev.drop_client()
            with pytest.raises(AgentUnreachable):
                await call
            await first.close()
            await asyncio.sleep(SLOW_SECONDS)  # the answer goes out into the port
            assert r.port.host_connected  # the guest saw nothing
            stale = FrameDecoder().feed(r.port.host_socket.recv(1 << 20, socket.MSG_PEEK))
            assert stale and len({f.session for f in stale}) == 1
            assert any(f.kind is FrameKind.DATA for f in stale)

            async with AgentClient(r.address, timeout=5) as client:
                assert names(await client.get_report(["0000:00:09.0"])) == ["0000:00:09.0"]
            assert r.bridge.stats.sessions == 2

    run(main())


def test_before_a_host_connects_the_bridge_does_not_spin(tmp_path: Path) -> None:
    reads = 0

    def counting(port: FakeVirtioPort) -> Callable[[], FakePortHandle]:
        def open_port() -> FakePortHandle:
            handle = port.open()
            real = handle.read

            def read(n: int) -> bytes:
                nonlocal reads
                reads += 1
                return real(n)

            handle.read = read  # type: ignore[method-assign]
            return handle

        return open_port

    async def main() -> None:
        async with rig(tmp_path, opener=counting) as r:
            cpu0 = time.process_time()
            await asyncio.sleep(1.0)
            cpu = time.process_time() - cpu0
            # read() returns 0 and the fd polls readable (POLLHUP): the bridge
            # must back off (0.05 s doubling to 0.2 s -> about 5-8 reads), not spin
            assert 3 <= reads <= 12, reads
            assert cpu < 0.3, cpu
            assert not r.port.host_connected
            async with AgentClient(r.address, timeout=5) as client:
                assert names(await client.get_report(["b"])) == ["b"]

    run(main())


def test_single_opener_second_bridge_waits_and_first_keeps_serving(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            with pytest.raises(OSError) as exc:
                r.port.open()
            assert exc.value.errno == errno.EBUSY
            second = VirtioSerialBridge(r.port.open, r.agent_sock, address="fake", reopen_delay=0.05)
            await second.start()
            await asyncio.sleep(0.2)
            assert second.stats.port_opens == 0
            async with AgentClient(r.address, timeout=5) as client:
                assert names(await client.get_report(["c"])) == ["c"]
            await second.stop()

    run(main())


def test_port_failure_is_survived_by_reopening(tmp_path: Path) -> None:
    failures = [OSError(errno.ENODEV, "No such device")]

    def flaky(port: FakeVirtioPort) -> Callable[[], FakePortHandle]:
        def open_port() -> FakePortHandle:
            handle = port.open()
            real = handle.read

            def read(n: int) -> bytes:
                if failures:
                    raise failures.pop()
                return real(n)

            handle.read = read  # type: ignore[method-assign]
            return handle

        return open_port

    async def main() -> None:
        async with rig(tmp_path, opener=flaky) as r:
            await asyncio.sleep(0.3)
            assert r.bridge.stats.port_opens == 2
            assert not r.port.opened or r.bridge.stats.port_opens == 2
            async with AgentClient(r.address, timeout=5) as client:
                assert names(await client.get_report(["d"])) == ["d"]

    run(main())


def test_agent_socket_missing_gives_a_clear_unreachable(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path, agent=False) as r, AgentClient(r.address, timeout=5, connect_timeout=3) as client:
            with pytest.raises(AgentUnreachable) as exc:
                await client.get_report()
            assert "refused the session" in str(exc.value)
            assert "agent socket" in str(exc.value)
            assert exc.value.address == r.address

    run(main())


GUEST_ON_DEBIAN = r"""
import asyncio, sys
from pathlib import Path
from tests.unit.fake_agent import serve_fake_agent
from tests.unit.fake_virtio_port import FakeChardev, FakeVirtioPort
from unplugd.agent.transports import bridges, tls, vsock  # every guest-side module loads
from unplugd.agent.transports.virtio_serial import HIGH_WATER, VirtioSerialBridge
import grpc

async def main(tmp):
    server, _ = serve_fake_agent(tmp / "agent.sock")
    port = FakeVirtioPort()
    bridge = VirtioSerialBridge(port.open, tmp / "agent.sock", hup_retry=0.05)
    chardev = FakeChardev(port, tmp / "chardev.sock")
    await chardev.start()
    await bridge.start()
    print("ready", grpc.__version__, sys.version_info[:2], flush=True)
    await asyncio.sleep(60)

asyncio.run(main(Path(sys.argv[1])))
"""


@pytest.mark.debian
def test_guest_bridge_on_debian_python3(tmp_path: Path) -> None:
    """The guest half (bridge + an agent server) on Debian's python3 and
    python3-grpcio 1.51; the host half (relay + AgentClient) here."""
    import subprocess

    from tests.conftest import REPO

    probe = subprocess.run(["/usr/bin/python3", "-c", "import grpc"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no Debian python3-grpcio")
    guest = subprocess.Popen(
        ["/usr/bin/python3", "-c", GUEST_ON_DEBIAN, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": f"{REPO / '.dev'}:{REPO}", "PATH": "/usr/bin:/bin"},
    )
    try:
        assert guest.stdout is not None
        line = guest.stdout.readline()
        assert line.startswith("ready 1.51"), line + (guest.stderr.read() if guest.stderr else "")

        async def main() -> None:
            for devices in (["0000:00:04.0"], ["0000:00:05.0"]):
                async with AgentClient(f"serial:{tmp_path}/chardev.sock", timeout=5) as client:
                    assert names(await client.get_report(devices)) == devices

        run(main())
    finally:
        guest.kill()
        guest.wait(10)
        for stream in (guest.stdout, guest.stderr):
            if stream is not None:
                stream.close()


def test_stale_frame_flood_does_not_grow_the_queue(tmp_path: Path) -> None:
    """Each stale session gets one courtesy CLOSE, but a host that floods stale
    frames and reads nothing cannot make the bridge queue without bound."""

    async def main() -> None:
        async with rig(tmp_path) as r:
            r.port.host_connect()
            flood = b"".join(encode_frame(Frame(FrameKind.DATA, 0x10000 + i, b"x")) for i in range(20000))
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(r.port.host_socket, flood)
            await asyncio.sleep(0.5)
            assert r.bridge.stats.stale_frames == 20000
            # all 20000 CLOSEs (740 kB) would not fit: the port's buffer and
            # the bridge's queue hold some, the rest were not queued
            assert r.bridge.stats.queued_bytes <= HIGH_WATER + 64
            buffered = FrameDecoder().feed(r.port.host_socket.recv(1 << 22))
            assert buffered and all(f.kind is FrameKind.CLOSE for f in buffered)
            assert len(buffered) + r.bridge.stats.queued_bytes // 37 < 20000
            r.port.host_disconnect()
            async with AgentClient(r.address, timeout=5) as client:
                assert names(await client.get_report(["e"])) == ["e"]

    run(main())


def test_retried_open_flood_does_not_grow_the_queue(tmp_path: Path) -> None:
    """OPEN of the current session is a retry answered with ACCEPT; a host that floods
    such retries and reads nothing cannot make the bridge queue ACCEPTs without bound."""

    async def main() -> None:
        async with rig(tmp_path) as r:
            r.port.host_connect()
            loop = asyncio.get_running_loop()
            open_frame = encode_frame(Frame(FrameKind.OPEN, 0x1234))
            await loop.sock_sendall(r.port.host_socket, open_frame)
            for _ in range(100):
                if r.bridge.stats.sessions and r.bridge.stats.queued_bytes == 0:
                    break
                await asyncio.sleep(0.02)
            # 40000 retries: 960 kB of ACCEPTs if each were queued
            flood = open_frame * 40000
            await loop.sock_sendall(r.port.host_socket, flood)
            await asyncio.sleep(0.5)
            assert r.bridge.stats.sessions == 1
            assert r.bridge.stats.queued_bytes <= HIGH_WATER + 64
            # what was written is the session's own: ACCEPTs and the agent's first bytes
            got = FrameDecoder().feed(r.port.host_socket.recv(1 << 22))
            assert got and {(f.kind, f.session) for f in got} <= {
                (FrameKind.ACCEPT, 0x1234),
                (FrameKind.DATA, 0x1234),
            }

    run(main())


def test_a_host_that_hangs_up_leaves_no_whole_frames_for_the_next(tmp_path: Path) -> None:
    """What the agent said to a host that hung up is not kept for the next one: only a frame the
    bridge had begun is finished (PROTOCOL.md), the rest of the ended session's queue is dropped."""

    async def main() -> None:
        async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(bytes(1 << 20))  # an answer far larger than the port and the queue hold
            with contextlib.suppress(ConnectionError):
                await writer.drain()
                await reader.read()

        agent = await asyncio.start_unix_server(chatty, path=str(tmp_path / "agent.sock"))
        try:
            async with rig(tmp_path, agent=False) as r:
                r.port.host_connect()
                host = r.port.host_socket
                loop = asyncio.get_running_loop()
                await loop.sock_sendall(host, encode_frame(Frame(FrameKind.OPEN, 0x4321)))
                for _ in range(200):  # the host reads nothing: the bridge's queue fills
                    await asyncio.sleep(0.02)
                    await loop.sock_sendall(host, b"\0")  # a byte of garbage: the bridge reads, counts
                    if r.bridge.stats.queued_bytes > HIGH_WATER:
                        break
                assert r.bridge.stats.queued_bytes > HIGH_WATER
                r.port.host_disconnect()
                for _ in range(100):  # the bridge sees the hang-up at its next look
                    await asyncio.sleep(0.05)
                    if r.bridge.stats.queued_bytes <= MAX_FRAME:
                        break
                with contextlib.suppress(BlockingIOError):  # what was in the port when it hung up
                    while host.recv(1 << 20):
                        pass
                r.port.host_connect()  # the next host
                await asyncio.sleep(0.5)
                got = b""
                with contextlib.suppress(BlockingIOError):
                    while chunk := host.recv(1 << 20):
                        got += chunk
                assert len(got) <= MAX_FRAME  # at most the rest of a frame begun for the old host
                assert FrameDecoder().feed(got) == []
        finally:
            agent.close()

    run(main())
