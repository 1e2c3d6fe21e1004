"""Exclusive claims on block devices: the kernel-enforced half of a lease.

An open with O_EXCL makes the block layer record this file as the device's
exclusive holder. While it is held, every other exclusive claim of the disk
or of one of its partitions fails with EBUSY, and mount(2) and swapon(2) take
exactly such a claim. The claim lives in the file descriptor: closing it, or
the process dying (SIGKILL included), drops it.

The node is found by device number (never from a request): /dev/block/M:m,
then /dev/NAME with the kernel's name; each is checked with stat before and
fstat after the open, so a node swapped in between cannot be claimed by
mistake. Without a matching node a private one is made with mknod.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from unplugd.agent.errors import AgentError
from unplugd.agent.model import BlockDevice, DevNo, format_devno
from unplugd.agent.roots import Roots

__all__ = ["Claim", "ClaimFailed", "claim_block_device", "release_claims"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    name: str
    devno: DevNo
    fd: int


class ClaimFailed(AgentError):
    """One device could not be claimed; `reason` says why, for people."""

    def __init__(self, name: str, reason: str, *, busy: bool = False) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason
        self.busy = busy


def claim_block_device(roots: Roots, device: BlockDevice) -> Claim:
    """Hold an exclusive open of `device`; ClaimFailed if the kernel refuses."""
    if not roots.live:
        raise ClaimFailed(device.name, "a captured tree has no kernel to claim devices from")
    for path in _candidates(roots, device):
        fd = _open_verified(path, device)
        if fd is not None:
            return Claim(device.name, device.devno, fd)
    return Claim(device.name, device.devno, _open_private_node(device))


def release_claims(claims: Iterable[Claim]) -> None:
    for claim in claims:
        try:
            os.close(claim.fd)
        except OSError as exc:  # already closed: nothing held any more
            log.warning("closing claim failed", extra={"device": claim.name, "error": str(exc)})


def _candidates(roots: Roots, device: BlockDevice) -> list[Path]:
    paths = [roots.dev / "block" / format_devno(device.devno)]
    # The kernel's name comes from sysfs, not from a request; still verified.
    if device.name and "/" not in device.name and device.name not in (".", ".."):
        paths.append(roots.dev / device.name)
    return paths


def _is_node(st: os.stat_result, devno: DevNo) -> bool:
    return stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == devno


def _open_verified(path: Path, device: BlockDevice) -> int | None:
    try:
        if not _is_node(os.stat(path), device.devno):
            return None
    except OSError:
        return None
    return _open_excl(str(path), device)


def _open_excl(path: str, device: BlockDevice) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise ClaimFailed(
                device.name,
                "in use: the kernel refused an exclusive open (it or one of its "
                "partitions is mounted, used as swap, held by a device-mapper/md/"
                "loop holder, or claimed by another program)",
                busy=True,
            ) from exc
        if exc.errno in (errno.ENXIO, errno.ENODEV, errno.ENOENT):
            raise ClaimFailed(device.name, "vanished while being claimed") from exc
        raise ClaimFailed(device.name, f"cannot open its node: {os.strerror(exc.errno or 0)}") from exc
    try:
        if not _is_node(os.fstat(fd), device.devno):
            raise ClaimFailed(device.name, f"the node changed while being claimed ({path})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_private_node(device: BlockDevice) -> int:
    # No usable node under /dev (no udev, say): make one only we can see.
    import tempfile  # here, not at the top: it brings random; the serving agent rarely gets here

    with tempfile.TemporaryDirectory(prefix="unplugd-claim-") as tmp:
        node = os.path.join(tmp, "node")
        try:
            os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(*device.devno))
        except OSError as exc:
            raise ClaimFailed(
                device.name,
                f"no device node for {format_devno(device.devno)} and mknod failed: {os.strerror(exc.errno or 0)}",
            ) from exc
        return _open_excl(node, device)
