"""rpc/uevents.py on real netlink sockets: kernel events of a loop device, udevd-format messages on group 2."""

from __future__ import annotations

import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root
from unplugd.agent.rpc.uevents import GROUP_UDEV, NETLINK_KOBJECT_UEVENT, UeventSocket


def drained_within(sock: UeventSocket, seconds: float) -> bool:
    """Whether a relevant event arrives within `seconds` (draining everything that comes)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if select.select([sock], [], [], left)[0] and sock.drain():
            return True
    return False


@pytest.fixture
def listener(request: pytest.FixtureRequest) -> Iterator[UeventSocket]:
    require_root()
    sock = UeventSocket(udev=request.param)
    try:
        yield sock
    finally:
        sock.close()


@pytest.mark.parametrize("listener", [False], indirect=True)
def test_kernel_events_of_a_loop_device(listener: UeventSocket, tmp_path: Path) -> None:
    assert listener.source == "kernel"
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (4 << 20))
    dev = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True).stdout
    try:
        assert drained_within(listener, 2.0), "no block uevent for losetup"
    finally:
        subprocess.run(["losetup", "-d", dev.strip()], check=False)
    assert drained_within(listener, 2.0), "no block uevent for the detach"


def udev_message(subsystem: str) -> bytes:
    body = f"ACTION=change\0DEVPATH=/devices/x\0SUBSYSTEM={subsystem}\0".encode()
    header = struct.pack("!8sIIII", b"libudev\0", 0xFEEDCAFE, 40, 40, len(body)) + b"\0" * 16
    return header + body


@pytest.mark.parametrize("listener", [True], indirect=True)
def test_udevd_messages_filtered_by_subsystem(listener: UeventSocket) -> None:
    # Root may send to udevd's group, as udevd does: the listener must take
    # block/net/pci and ignore the rest.
    assert listener.source == "udev"
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT) as sender:
        sender.bind((0, 0))
        sender.sendto(udev_message("usb"), (0, GROUP_UDEV))
        assert not drained_within(listener, 0.3)
        sender.sendto(udev_message("net"), (0, GROUP_UDEV))
        assert drained_within(listener, 1.0)
        assert not listener.drain()  # nothing left pending
