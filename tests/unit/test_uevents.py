"""rpc/uevents.py: parse_subsystem on kernel and udevd datagrams, good and malformed."""

from __future__ import annotations

import struct

import pytest

from unplugd.agent.rpc.uevents import parse_subsystem


def kernel(*props: str, head: str = "add@/devices/virtual/block/loop3") -> bytes:
    return b"\0".join([head.encode(), *(p.encode() for p in props)]) + b"\0"


def udev(*props: str, magic: int = 0xFEEDCAFE, off: int | None = None, length: int | None = None) -> bytes:
    body = b"\0".join(p.encode() for p in props) + b"\0"
    header_size = 40  # prefix, magic, header_size, properties_off, properties_len, 4 hashes
    header = struct.pack(
        "!8sIIII",
        b"libudev\0",
        magic,
        header_size,
        header_size if off is None else off,
        len(body) if length is None else length,
    )
    return header + b"\0" * (header_size - len(header)) + body


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (kernel("ACTION=add", "DEVPATH=/devices/virtual/block/loop3", "SUBSYSTEM=block", "SEQNUM=9"), "block"),
        (kernel("ACTION=change", "SUBSYSTEM=net", head="change@/devices/virtual/net/va"), "net"),
        (kernel("ACTION=bind", "SUBSYSTEM=usb"), "usb"),
        (kernel("ACTION=add", "SEQNUM=9"), None),
        (b"no-at-sign\0SUBSYSTEM=block\0", None),  # not a uevent header
        (b"add@/devices/x", None),  # no properties at all
        (udev("ACTION=remove", "SUBSYSTEM=pci", "DEVTYPE="), "pci"),
        (udev("ACTION=add", "SUBSYSTEM=block", magic=0xCAFEFEED), None),  # wrong byte order / not udevd
        (udev("ACTION=add", "SUBSYSTEM=block", off=8), None),  # properties inside the header
        (udev("ACTION=add", "SUBSYSTEM=block", length=4096), None),  # claims more than was sent
        (b"libudev\0\xfe\xed", None),  # truncated header
    ],
)
def test_parse_subsystem(data: bytes, expected: str | None) -> None:
    assert parse_subsystem(data) == expected
