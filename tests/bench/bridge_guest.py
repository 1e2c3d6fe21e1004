"""The guest end of a transport bridge without a VM, in its own process.

    python -m tests.bench.bridge_guest serial --backend AGENT.sock --listen CHARDEV.sock
    python -m tests.bench.bridge_guest vsock --backend AGENT.sock --listen FAKE_VSOCK.sock

serial: a fake virtio-serial port (tests/unit/fake_virtio_port.py: one opener,
read 0 + POLLHUP before a host connects, host turnover invisible) behind a
QEMU-like chardev socket, and the real VirtioSerialBridge; the host connects
as to QEMU's `-chardev socket,server=on` (AgentClient "serial:CHARDEV.sock").

vsock: the real VsockBridge with its injectable listener factory: a unix
listening socket whose accept() reports peer CID 2 (the host), since this
kernel has no vsock loopback; the host connects to that unix socket.

Prints "ready" once listening; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
from pathlib import Path
from typing import Any

HOST_CID = 2


class _UnixAsVsock:
    """A listening socket that says every peer is the host, as AF_VSOCK's accept() would."""

    def __init__(self, path: Path, port: int) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(64)
        self._sock.setblocking(False)
        self._port = port

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        conn, _ = self._sock.accept()
        return conn, (HOST_CID, self._port)

    def close(self) -> None:
        self._sock.close()


async def _bridge(kind: str, backend: Path, listen: Path) -> tuple[Any, Any]:
    if kind == "serial":
        from tests.unit.fake_virtio_port import FakeChardev, FakeVirtioPort
        from unplugd.agent.transports.virtio_serial import VirtioSerialBridge

        port = FakeVirtioPort()
        chardev = FakeChardev(port, listen)
        await chardev.start()
        serial = VirtioSerialBridge(port.open, backend, address="fake:" + str(listen), reopen_delay=0.2)
        await serial.start()
        return serial, chardev
    from unplugd.agent.transports.vsock import VsockBridge

    vsock = VsockBridge(1024, backend, listener_factory=lambda p: _UnixAsVsock(listen, p))
    await vsock.start()
    return vsock, None


async def _serve(kind: str, backend: Path, listen: Path) -> None:
    bridge, extra = await _bridge(kind, backend, listen)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    print("ready", flush=True)
    try:
        await done.wait()
    finally:
        await bridge.stop()
        if extra is not None:
            await extra.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("serial", "vsock"))
    parser.add_argument("--backend", type=Path, required=True, help="the agent's unix socket")
    parser.add_argument("--listen", type=Path, required=True, help="where the host connects")
    args = parser.parse_args()
    asyncio.run(_serve(args.kind, args.backend, args.listen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
