"""host/channel.py: which way to the agent's channel (pure), and the framed session over a stream
opened "through libvirt": a fake virStream with libvirt's semantics (blocking send/recv, abort
frees a blocked recv, one stream per channel unless forced) in front of the real guest bridge."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.unit.fake_agent import FakeAgent, report_for
from tests.unit.test_virtio_serial_bridge import names, rig
from unplugd.host.channel import ChannelRelay, is_remote_uri, route
from unplugd.host.client import AgentAddress, AgentClient, AgentUnreachable
from unplugd.host.errors import BackendError
from unplugd.v1 import agent_service_pb2 as pb

ADDRESS = AgentAddress("channel", path="org.unplugd.agent.0 of vm on qemu+tcp://hv/system")


@pytest.mark.parametrize(
    ("uri", "remote"),
    [
        ("qemu:///system", False),
        ("qemu:///session", False),
        ("qemu+unix:///system?socket=/tmp/x/libvirt-sock", False),
        ("qemu+tcp://127.0.0.1/system", True),  # loopback, but the daemon's paths may not be ours
        ("qemu+tcp://127.0.0.1:16509/system", True),
        ("qemu+ssh://root@hv1/system", True),
        ("qemu+libssh2://hv1/system?known_hosts=/k", True),
        ("qemu+tls://hv1.example/system", True),
        ("qemu://hv1.example/system", True),  # a host with no transport: TLS
        ("qemu+ext:///system?command=/bin/tunnel", True),
        ("test:///default", False),
    ],
)
def test_remote_uris_are_told_apart(uri: str, remote: bool) -> None:
    assert is_remote_uri(uri) is remote


@pytest.mark.parametrize(
    ("uri", "choice", "path", "expected"),
    [
        ("qemu:///system", "auto", "/run/ch.sock", "socket"),  # local: unchanged behaviour
        ("qemu+ssh://hv/system", "auto", "/run/ch.sock", "libvirt"),
        ("qemu:///system", "libvirt", "/run/ch.sock", "libvirt"),
        ("qemu+ssh://hv/system", "socket", "/run/ch.sock", "socket"),
        ("qemu+ssh://hv/system", "auto", None, None),  # the domain has no agent channel
    ],
)
def test_route(uri: str, choice: str, path: str | None, expected: str | None) -> None:
    assert route(uri, choice, path) == expected


class FakeStream:
    """A blocking virStream on a chardev socket, as qemuDomainOpenChannel gives one."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.broken: str | None = None
        self.aborted = threading.Event()

    def send(self, data: bytes) -> int:
        self.sock.sendall(data)
        return len(data)

    def recv(self, n: int) -> bytes:
        data = self.sock.recv(n)
        if self.broken:
            raise OSError(self.broken)
        if not data and not self.aborted.is_set():
            return b""
        if self.aborted.is_set():
            raise OSError("stream is closed")
        return data

    def abort(self) -> None:
        self.aborted.set()
        self.sock.shutdown(socket.SHUT_RDWR)

    def drop(self, why: str) -> None:
        """The connection under the stream went away (libvirtd gone, keepalive timeout)."""
        self.broken = why
        self.sock.shutdown(socket.SHUT_RDWR)


class FakeLibvirt:
    """openChannel's bookkeeping: one stream per channel; force aborts the holder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.streams: list[FakeStream] = []
        self.forced = 0
        self.dead = False

    async def open(self, force: bool) -> FakeStream:
        if self.dead:
            raise BackendError("libvirt open channel org.unplugd.agent.0: internal error: client socket is closed")
        holder = next((s for s in self.streams if not s.aborted.is_set() and not s.broken), None)
        if holder is not None:
            if not force:
                raise BackendError(
                    "libvirt open channel org.unplugd.agent.0: operation failed: "
                    "Active channel stream exists for this domain"
                )
            self.forced += 1
            holder.abort()
        stream = FakeStream(self.path)
        self.streams.append(stream)
        return stream


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def test_calls_and_watch_cross_a_libvirt_stream(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            lv = FakeLibvirt(r.chardev.path)
            relay = ChannelRelay(lv.open, "vm", connect_timeout=4)
            async with AgentClient(ADDRESS, relay=relay, timeout=5) as client:
                assert names(await client.get_report(["0000:00:04.0"])) == ["0000:00:04.0"]
                messages = [m async for m in client.watch_report(["0000:00:07.0"])]
                assert messages[0].initial and len(messages) == 4
            assert len(lv.streams) == 1
            # the session ended: the stream was aborted, which frees libvirt's channel for the next client
            assert lv.streams[0].aborted.is_set()
            assert r.bridge.stats.sessions == 1

    run(main())


def test_a_held_channel_is_refused_unless_forced(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            lv = FakeLibvirt(r.chardev.path)
            first = AgentClient(ADDRESS, relay=ChannelRelay(lv.open, "vm", connect_timeout=4), timeout=5)
            assert names(await first.get_report(["a"])) == ["a"]  # holds the channel now
            second = AgentClient(
                ADDRESS, relay=ChannelRelay(lv.open, "vm", connect_timeout=2), timeout=3, connect_timeout=3
            )
            with pytest.raises(AgentUnreachable, match=r"Active channel stream exists.*--force-channel"):
                await second.get_report(["b"])
            await second.close()
            forced = AgentClient(ADDRESS, relay=ChannelRelay(lv.open, "vm", force=True, connect_timeout=4), timeout=5)
            assert names(await forced.get_report(["c"])) == ["c"]
            assert lv.forced == 1
            await forced.close()
            await first.close()

    run(main())


def _quiet_watch(
    self: FakeAgent, request: pb.WatchReportRequest, context: grpc.ServicerContext
) -> Iterator[pb.WatchReportResponse]:
    """The first report, then nothing changes: a wait that only the broken stream can end."""
    devices = list(request.devices)
    yield pb.WatchReportResponse(report=report_for(devices), changed=devices, initial=True)
    while context.is_active():  # until the client's side of the call is gone
        time.sleep(0.05)


def test_a_stream_that_breaks_mid_watch_ends_it_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FakeAgent, "WatchReport", _quiet_watch)

    async def main() -> None:
        async with rig(tmp_path) as r:
            lv = FakeLibvirt(r.chardev.path)
            async with AgentClient(ADDRESS, relay=ChannelRelay(lv.open, "vm", connect_timeout=4), timeout=5) as c:
                watch = c.watch_report(["0000:00:07.0"], timeout=None)
                first = await watch.__anext__()
                assert first.initial
                lv.dead = True  # libvirtd is gone: no new stream either
                lv.streams[0].drop("End of file while reading data: Input/output error")
                with pytest.raises(AgentUnreachable, match="stream broke: End of file"):
                    async for _ in watch:
                        pass

    run(main())
