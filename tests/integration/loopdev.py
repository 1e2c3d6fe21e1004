"""Real kernel objects for integration tests: partitioned loop disks, mounts in private namespaces, swap.

Every helper is a context manager that undoes what it did, even when the test fails.
This kernel has no partition-table parsers (CONFIG_MSDOS/EFI_PARTITION off), so
`losetup -P` finds nothing: partitions are added from the table with `partx -a`
(BLKPG), which works on any kernel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TOOLS = ("losetup", "sfdisk", "partx", "mkfs.ext4", "mkswap", "swapon", "swapoff", "unshare", "mount")


def require_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")
    if not Path("/dev/loop-control").exists():
        pytest.skip("no loop device support")


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def wait_for(check: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclass(frozen=True)
class LoopDisk:
    image: Path
    disk: str  # loop3
    parts: tuple[str, ...]  # loop3p1, loop3p2

    @property
    def node(self) -> Path:
        return Path("/dev") / self.disk

    def part_node(self, index: int) -> Path:
        return Path("/dev") / self.parts[index]


def _attach(image: Path) -> str:
    # Another test may grab the same free loop device between find and attach: retry.
    for attempt in range(5):
        try:
            return run("losetup", "--find", "--show", "--partscan", str(image)).strip()
        except subprocess.CalledProcessError:
            if attempt == 4:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def loop_disk(workdir: Path, table: str, size_mib: int = 64) -> Iterator[LoopDisk]:
    """A sparse image with an sfdisk `table`, attached to a loop device with its partitions."""
    image = workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["sfdisk", "-q", str(image)], input=table, text=True, check=True, capture_output=True)
    dev = _attach(image)
    name = os.path.basename(dev)
    try:
        expected = table.count("\n,")  # one line per partition, each starting with ","
        sysdir = Path("/sys/class/block")

        def have() -> int:
            return sum(1 for p in sysdir.iterdir() if p.name.startswith(name + "p"))

        if have() < expected:
            run("partx", "--add", dev)
        wait_for(lambda: have() >= expected, what=f"partitions of {dev}")
        parts = tuple(f"{name}p{i}" for i in range(1, expected + 1))
        wait_for(lambda: all((Path("/dev") / p).exists() for p in parts), what="partition nodes")
        yield LoopDisk(image, name, parts)
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True)


@contextlib.contextmanager
def mounted_in_private_namespace(node: Path, mount_point: Path) -> Iterator[subprocess.Popen[str]]:
    """Mount node in a new private mount namespace kept alive by a sleeping process."""
    mount_point.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount "$0" "$1" && echo ready && exec sleep 300',
            str(node),
            str(mount_point),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.wait(5)
            raise AssertionError(f"mount in private namespace failed: {proc.stderr.read() if proc.stderr else ''}")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


@contextlib.contextmanager
def swapped_on(node: Path) -> Iterator[None]:
    run("swapon", str(node))
    try:
        yield
    finally:
        subprocess.run(["swapoff", str(node)], check=False, capture_output=True)
