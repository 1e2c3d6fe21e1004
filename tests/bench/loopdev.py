"""A loop disk with two partitions (ext4 + swap), mounted for the run, always torn down.

This kernel has no partition-table parsers (CONFIG_MSDOS_PARTITION and
CONFIG_EFI_PARTITION are off), so `losetup -P` finds no partitions: they are
added with `partx -a`, which uses the BLKPG ioctl and needs no parser.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LoopDisk", "loop_disk"]


@dataclass(frozen=True)
class LoopDisk:
    disk: str  # /dev/loop3
    image: Path
    mountpoint: Path | None

    def part(self, n: int) -> str:
        return f"{self.disk}p{n}"

    @property
    def name(self) -> str:
        return os.path.basename(self.disk)


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def _wait_for(path: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.02)


@contextlib.contextmanager
def loop_disk(size_mib: int = 64, *, mount: bool = True) -> Iterator[LoopDisk]:
    """Yield a loop disk: p1 ext4 (mounted on a temp dir if `mount`), p2 swap signature."""
    if os.geteuid() != 0:
        raise PermissionError("loop devices need root")
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="unplugd-bench-loop-")))
        image = workdir / "disk.img"
        with open(image, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        half = size_mib // 2
        subprocess.run(["sfdisk", "-q", str(image)], input=f"label: dos\n,{half}M,L\n,,S\n", text=True, check=True)
        disk = _sh("losetup", "-P", "--show", "-f", str(image))
        stack.callback(subprocess.run, ["losetup", "-d", disk], check=False, capture_output=True)
        if not os.path.exists(f"{disk}p1"):
            subprocess.run(["partx", "-a", disk], check=True, capture_output=True)
        _wait_for(f"{disk}p1")
        _wait_for(f"{disk}p2")
        _sh("mkfs.ext4", "-q", "-F", f"{disk}p1")
        _sh("mkswap", f"{disk}p2")
        mountpoint: Path | None = None
        if mount:
            mountpoint = workdir / "mnt"
            mountpoint.mkdir()
            _sh("mount", f"{disk}p1", str(mountpoint))
            # Lazy unmount: processes of the bench that still hold files there
            # must not keep the loop device attached.
            stack.callback(subprocess.run, ["umount", "-l", str(mountpoint)], check=False, capture_output=True)
        yield LoopDisk(disk=disk, image=image, mountpoint=mountpoint)
