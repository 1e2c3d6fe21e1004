"""Transports against real things on this machine: QEMU's chardev sockets
(no guest OS: what the host end can verify alone), AF_VSOCK if this kernel
has loopback. The full guest path is exercised by the VM tests (tests/vm)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.fake_agent import serve_fake_agent
from unplugd.agent.transports.vsock import VsockBridge
from unplugd.framing import FrameDecoder
from unplugd.host.client import AgentClient, AgentUnreachable

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64")


class Qemu:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.qmp_path = tmp / "qmp.sock"
        cmd = [
            str(QEMU),
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(100):
            if self.qmp_path.exists() or self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if self.proc.poll() is not None:
            raise RuntimeError(f"qemu failed: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
        self.qmp = socket.socket(socket.AF_UNIX)
        self.qmp.connect(str(self.qmp_path))
        self.qmp_file = self.qmp.makefile("rw")
        self.qmp_file.readline()  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str) -> object:
        self.qmp_file.write(json.dumps({"execute": command}) + "\n")
        self.qmp_file.flush()
        while True:
            msg = json.loads(self.qmp_file.readline())
            if "return" in msg or "error" in msg:
                return msg.get("return", msg.get("error"))

    def chardev(self, label: str) -> dict[str, object]:
        devs = self.execute("query-chardev")
        assert isinstance(devs, list)
        return next(d for d in devs if d["label"] == label)

    def close(self) -> None:
        self.qmp.close()
        self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


QemuFactory = Callable[..., Qemu]


def _monitor_on_chardev(chardev: Path) -> tuple[str, ...]:
    """QEMU arguments: no machine, a QMP monitor as the frontend of a server chardev socket c0."""
    return (
        "-machine",
        "none",
        "-chardev",
        f"socket,id=c0,path={chardev},server=on,wait=off",
        "-mon",
        "chardev=c0,mode=control",
    )


@pytest.fixture
def qemu_factory(tmp_path: Path) -> Iterator[QemuFactory]:
    """Start QEMU with extra arguments; every one is killed at teardown, even on failure."""
    started: list[Qemu] = []

    def start(*args: str) -> Qemu:
        q = Qemu(tmp_path, *args)
        started.append(q)
        return q

    yield start
    for q in started:
        q.close()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


def _recv(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return b""


@needs_qemu
def test_qemu_chardev_serves_one_client_at_a_time_and_the_next_after_it_leaves(
    tmp_path: Path, qemu_factory: QemuFactory
) -> None:
    """Why the serial relay serialises sessions and the guest must expect a new
    session at any time: QEMU's chardev socket (server=on) serves one client;
    a second one connects (backlog) but is not served until the first leaves,
    then it is, with no sign of the change on the byte stream itself.
    A QMP monitor as the chardev's frontend makes the serving visible: it
    greets each client it serves."""
    chardev = tmp_path / "chardev.sock"
    q = qemu_factory(*_monitor_on_chardev(chardev))
    assert str(q.chardev("c0")["filename"]).startswith("disconnected:")

    first = socket.socket(socket.AF_UNIX)
    first.connect(str(chardev))
    assert b'"QMP"' in _recv(first, 5)
    assert not str(q.chardev("c0")["filename"]).startswith("disconnected:")

    second = socket.socket(socket.AF_UNIX)
    second.connect(str(chardev))  # succeeds: the listen backlog
    second.sendall(b'{"execute":"qmp_capabilities"}\n')
    assert _recv(second, 0.5) == b""  # not served while the first is there

    first.close()
    answer = _recv(second, 5)
    # served now; what it sent while waiting was kept and is answered
    assert b'"QMP"' in answer
    if b'"return"' not in answer:
        answer += _recv(second, 5)
    assert b'"return"' in answer
    second.close()
    time.sleep(0.2)
    assert str(q.chardev("c0")["filename"]).startswith("disconnected:")


@needs_qemu
def test_serial_relay_against_qemu_chardev_with_foreign_bytes(tmp_path: Path, qemu_factory: QemuFactory) -> None:
    """A chardev whose other end is not our bridge (here a QMP monitor that
    answers our frames with JSON errors): the relay drops the bytes, never
    crashes, and the client reports the agent unreachable within its deadline."""
    chardev = tmp_path / "chardev.sock"
    qemu_factory(*_monitor_on_chardev(chardev))

    async def main() -> None:
        for _ in range(2):  # and again: QEMU takes the next client
            async with AgentClient(f"serial:{chardev}", timeout=5, connect_timeout=1) as client:
                t0 = time.monotonic()
                with pytest.raises(AgentUnreachable, match="no answer from the guest"):
                    await client.get_report()
                assert time.monotonic() - t0 < 2

    run(main())


@needs_qemu
def test_serial_relay_against_a_virtio_serial_port_no_guest_has_opened(
    tmp_path: Path, qemu_factory: QemuFactory
) -> None:
    """The real device model: q35 + virtio-serial-pci + virtserialport on a
    chardev socket, CPUs stopped (-S), so no guest ever opens the port. QEMU
    accepts the host connection but does not read from it while the guest
    side is closed; the client must fail cleanly within its deadline and say
    what to check, and the chardev must be free again afterwards."""
    chardev = tmp_path / "chardev.sock"
    q = qemu_factory(
        "-machine",
        "q35",
        "-device",
        "virtio-serial-pci,id=vser0",
        "-chardev",
        f"socket,id=agent0,path={chardev},server=on,wait=off",
        "-device",
        "virtserialport,bus=vser0.0,chardev=agent0,name=org.unplugd.agent.0",
    )
    assert q.chardev("agent0")["frontend-open"] is False

    async def main() -> None:
        async with AgentClient(f"serial:{chardev}", timeout=5, connect_timeout=2) as client:
            t0 = time.monotonic()
            with pytest.raises(AgentUnreachable) as exc:
                await client.get_agent_info()
            assert time.monotonic() - t0 < 3
            assert "no answer from the guest" in str(exc.value)
            assert "[transports.virtio_serial]" in str(exc.value)

    run(main())
    time.sleep(0.2)
    assert str(q.chardev("agent0")["filename"]).startswith("disconnected:")
    # nothing came back from the device while no guest had the port open
    probe = socket.socket(socket.AF_UNIX)
    probe.connect(str(chardev))
    assert FrameDecoder().feed(_recv(probe, 0.5)) == []
    probe.close()


def _vsock_loopback_works() -> bool:
    if not hasattr(socket, "AF_VSOCK"):
        return False
    try:
        srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        srv.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
        srv.listen(1)
        port = srv.getsockname()[1]
        cli = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        cli.settimeout(0.5)
        try:
            cli.connect((1, port))  # VMADDR_CID_LOCAL
            return True
        except OSError:
            return False
        finally:
            cli.close()
    except OSError:
        return False
    finally:
        srv.close()


def test_vsock_bridge_live_loopback(tmp_path: Path) -> None:
    """Real AF_VSOCK end to end, where the kernel has vsock loopback (CID 1)."""
    if not _vsock_loopback_works():
        pytest.skip("no AF_VSOCK loopback (vsock_loopback) in this kernel")
    server, _ = serve_fake_agent(tmp_path / "agent.sock")

    async def main() -> None:
        bridge = VsockBridge(0x5150, tmp_path / "agent.sock", allowed_cids=(1,))
        await bridge.start()
        try:
            async with AgentClient("vsock:1:20816", timeout=5) as client:
                assert (await client.get_agent_info()).version == "test"
        finally:
            await bridge.stop()

    try:
        run(main())
    finally:
        server.stop(0)
