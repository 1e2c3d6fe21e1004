"""Device events from NETLINK_KOBJECT_UEVENT, without pyudev (and ctypes and libudev).

The watcher only needs "a block, net or pci device changed: look again", so
one netlink socket does it; pyudev would add ~1.4 MiB to the agent's RSS.

- With a udev daemon (/run/udev/control exists), listen to udevd's group 2:
  its messages come after udev has run its rules (device links, dm names),
  so a rescan sees the finished state. They start with a header
  (libudev-monitor.c): "libudev\\0", magic 0xfeedcafe (big endian),
  header_size, properties_off, properties_len, then hashes, all u32; the
  NUL-separated KEY=VALUE properties sit at properties_off.
- Without one, the kernel's group 1: "ACTION@DEVPATH\\0KEY=VALUE\\0...".

Only root may send to these groups; messages whose sender is not uid 0 are
still ignored, as libudev does.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Collection

__all__ = ["SUBSYSTEMS", "UeventSocket", "parse_subsystem"]

NETLINK_KOBJECT_UEVENT = 15
GROUP_KERNEL = 1
GROUP_UDEV = 2
SUBSYSTEMS = frozenset({"block", "net", "pci"})

_UDEV_PREFIX = b"libudev\0"
_UDEV_MAGIC = 0xFEEDCAFE
_UDEV_HEADER = struct.Struct("!8sIIII")  # prefix, magic (network order), header_size, properties_off, len
_UCRED = struct.Struct("=iII")  # pid, uid, gid
_BUFFER = 8192  # uevents are at most a few KiB (UEVENT_BUFFER_SIZE is 2048 for the kernel's)


def parse_subsystem(data: bytes) -> str | None:
    """The SUBSYSTEM= of one uevent datagram (kernel or udev format); None if it has none or is garbage."""
    if data.startswith(_UDEV_PREFIX):
        if len(data) < _UDEV_HEADER.size:
            return None
        _prefix, magic, _size, off, length = _UDEV_HEADER.unpack_from(data)
        # the magic is written in network order by udevd (htobe32)
        if magic != _UDEV_MAGIC or off < _UDEV_HEADER.size or off + length > len(data):
            return None
        props = data[off : off + length]
    else:
        head, sep, props = data.partition(b"\0")
        if not sep or b"@" not in head:
            return None
    for item in props.split(b"\0"):
        if item.startswith(b"SUBSYSTEM="):
            return item[len(b"SUBSYSTEM=") :].decode("ascii", "replace")
    return None


class UeventSocket:
    """A non-blocking uevent listener; drain() says whether a relevant event arrived."""

    def __init__(self, subsystems: Collection[str] = SUBSYSTEMS, *, udev: bool | None = None) -> None:
        if udev is None:
            udev = os.path.exists("/run/udev/control")
        self.source = "udev" if udev else "kernel"
        self._subsystems = frozenset(subsystems)
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK, NETLINK_KOBJECT_UEVENT
        )
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._sock.bind((0, GROUP_UDEV if udev else GROUP_KERNEL))
        except OSError:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> bool:
        """Read every pending datagram; True if one was about a watched subsystem."""
        relevant = False
        space = socket.CMSG_SPACE(_UCRED.size)
        while True:
            try:
                data, anc, _flags, _addr = self._sock.recvmsg(_BUFFER, space)
            except (BlockingIOError, InterruptedError):
                return relevant
            except OSError as exc:
                # ENOBUFS: events were dropped while we slept; something changed.
                return relevant or exc.errno == errno.ENOBUFS
            if not _from_root(anc):
                continue
            if parse_subsystem(data) in self._subsystems:
                relevant = True

    def close(self) -> None:
        self._sock.close()


def _from_root(ancillary: list[tuple[int, int, bytes]]) -> bool:
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
            _pid, uid, _gid = _UCRED.unpack_from(payload)
            return bool(uid == 0)
    return False
