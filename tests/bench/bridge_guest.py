"""The guest end of virtio-serial without a VM: a fake port + QEMU-like chardev socket + the real bridge.

    python -m tests.bench.serial_guest --backend AGENT.sock --chardev CHARDEV.sock

The port (tests/unit/fake_virtio_port.py) has the kernel driver's semantics
(one opener, read 0 + POLLHUP before a host connects, host turnover
invisible); the bridge is agent/transports/virtio_serial.py; the host side
connects to CHARDEV.sock as it would to QEMU's `-chardev socket,server=on`
(AgentClient "serial:CHARDEV.sock"). Prints "ready" once listening; stops on
SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path


async def _serve(backend: Path, chardev_path: Path) -> None:
    from tests.unit.fake_virtio_port import FakeChardev, FakeVirtioPort
    from unplugd.agent.transports.virtio_serial import VirtioSerialBridge

    port = FakeVirtioPort()
    chardev = FakeChardev(port, chardev_path)
    await chardev.start()
    bridge = VirtioSerialBridge(port.open, backend, address="fake:" + str(chardev_path), reopen_delay=0.2)
    await bridge.start()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    print("ready", flush=True)
    try:
        await done.wait()
    finally:
        await bridge.stop()
        await chardev.stop()
        port.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", type=Path, required=True, help="the agent's unix socket")
    parser.add_argument("--chardev", type=Path, required=True, help="where the host connects")
    args = parser.parse_args()
    asyncio.run(_serve(args.backend, args.chardev))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
