"""Block devices from /sys/class/block, and the kernel's own "is it claimed?" answer.

Per device: dev (MAJ:MIN), size (512-byte sectors), partition (partitions only;
the parent disk is the directory the partition sits in), dm/name + dm/uuid,
md/level, loop/backing_file, holders/ and slaves/ (symlinks named after the
kernel names of the devices stacked on / under it).

probe_exclusive asks the kernel directly: an open(O_EXCL) of a block device
fails with EBUSY while anyone holds an exclusive claim on it. Mounted
filesystems, active swap, dm/md members and other O_EXCL openers all claim.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

from unplugd.agent.collectors.devlinks import resolve_dev_path
from unplugd.agent.errors import ReadError, Vanished
from unplugd.agent.model import BlockDevice, Collected, DevNo, ScanProblem, format_devno, parse_devno
from unplugd.agent.roots import Roots
from unplugd.agent.sysio import (
    VANISHED_ERRNOS,
    as_read_error,
    listdir,
    os_exists,
    os_listdir,
    os_lstat,
    os_readlink,
    os_reason,
    read_text,
    read_text_or,
)

__all__ = [
    "collect_block",
    "devno_index",
    "find_block_node",
    "parse_sectors",
    "probe_exclusive",
]

log = logging.getLogger(__name__)

_LOOP_MAJOR = 7


def parse_sectors(text: str) -> int:
    """sysfs `size` (always in 512-byte sectors, whatever the logical block size) -> bytes."""
    value = text.strip()
    if not value.isdigit():
        raise ValueError(f"not a sector count: {text!r}")
    return int(value) * 512


def devno_index(block: Mapping[str, BlockDevice]) -> dict[DevNo, str]:
    return {dev.devno: name for name, dev in block.items()}


def _read_device(sysdir: str, name: str, parent: str | None) -> BlockDevice:
    """One device; raises ReadError/ValueError for the caller to turn into a ScanProblem."""
    try:
        present = set(os_listdir(sysdir))
    except OSError as exc:
        raise as_read_error(sysdir, exc) from exc
    devno = parse_devno(read_text(f"{sysdir}/dev"))
    size = parse_sectors(read_text(f"{sysdir}/size")) if "size" in present else 0
    holders = tuple(listdir(f"{sysdir}/holders")) if "holders" in present else ()
    slaves = tuple(listdir(f"{sysdir}/slaves")) if "slaves" in present else ()
    if "partition" in present:
        return BlockDevice(name, "part", devno, size, parent=parent, holders=holders, slaves=slaves)
    if "dm" in present:
        dm_name = read_text_or(f"{sysdir}/dm/name")
        dm_uuid = read_text_or(f"{sysdir}/dm/uuid")
        return BlockDevice(
            name, "dm", devno, size, holders=holders, slaves=slaves, dm_name=dm_name, dm_uuid=dm_uuid or None
        )
    if "md" in present:
        md_level = read_text_or(f"{sysdir}/md/level")
        return BlockDevice(name, "md", devno, size, holders=holders, slaves=slaves, md_level=md_level or None)
    backing = read_text_or(f"{sysdir}/loop/backing_file") if "loop" in present else None
    if backing is not None or devno[0] == _LOOP_MAJOR:
        # An unbound loop device has no loop/ directory; it is still a loop device.
        return BlockDevice(name, "loop", devno, size, holders=holders, slaves=slaves, backing_file=backing or None)
    return BlockDevice(name, "disk", devno, size, holders=holders, slaves=slaves)


def _class_block_entries(roots: Roots) -> list[tuple[str, str, str | None]]:
    """(name, sysfs dir, parent disk) from /sys/class/block; parent from the link text, not the filesystem."""
    base = f"{roots.sys}/class/block"
    out: list[tuple[str, str, str | None]] = []
    for name in listdir(base):
        try:
            link: str | None = os_readlink(f"{base}/{name}")
        except OSError:
            link = None  # not a link (a plain directory in a hand-made tree) or gone: no parent known
        parent: str | None = None
        if link is not None:
            parts = [p for p in link.split("/") if p]
            # .../block/vda/vda1 -> vda; .../block/vda -> the grandparent is "block": no parent
            if len(parts) >= 2 and parts[-2] not in ("block", "..", "."):
                parent = parts[-2]
        out.append((name, f"{base}/{name}", parent))
    return out


def _sys_block_entries(roots: Roots) -> list[tuple[str, str, str | None]]:
    """Fallback without /sys/class/block: /sys/block/DISK and its partition subdirectories."""
    base = f"{roots.sys}/block"
    out: list[tuple[str, str, str | None]] = []
    for disk in listdir(base):
        out.append((disk, f"{base}/{disk}", None))
        for sub in listdir(f"{base}/{disk}"):
            if os_exists(f"{base}/{disk}/{sub}/partition"):
                out.append((sub, f"{base}/{disk}/{sub}", disk))
    return out


def collect_block(roots: Roots) -> Collected[dict[str, BlockDevice]]:
    problems: list[ScanProblem] = []
    try:
        entries = _class_block_entries(roots) or _sys_block_entries(roots)
    except ReadError as exc:
        return Collected({}, [ScanProblem(exc.path, str(exc))])
    devices: dict[str, BlockDevice] = {}
    for name, sysdir, parent in entries:
        try:
            devices[name] = _read_device(sysdir, name, parent)
        except Vanished as exc:
            # Gone mid-scan (loop detached, disk unplugged): say so; it may have mattered.
            log.debug("block device %s vanished: %s", name, exc)
            problems.append(ScanProblem(sysdir, f"vanished during the scan: {exc}", (name,)))
        except ReadError as exc:
            problems.append(ScanProblem(sysdir, str(exc), (name,)))
        except ValueError as exc:
            problems.append(ScanProblem(sysdir, f"malformed: {exc}", (name,)))
    return Collected(devices, problems)


def find_block_node(roots: Roots, dev: BlockDevice) -> Path | None:
    """A block node in roots.dev whose st_rdev is dev's number, found by number first, never trusting a name."""
    want = os.makedev(*dev.devno)
    for live_path in (f"/dev/block/{format_devno(dev.devno)}", f"/dev/{dev.name}"):
        rel = resolve_dev_path(roots.dev, live_path)
        if rel is None:
            continue
        node = roots.dev / rel
        try:
            st = os_lstat(node)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == want:
            return node
        log.debug("%s is not block device %s", node, format_devno(dev.devno))
    return None


# What the kernel answers, measured on this machine (6.18, loop devices, partitions via BLKPG;
# tests/integration/test_block_live.py asserts each line):
# - a partition mounted: O_EXCL on the partition fails with EBUSY, and so does O_EXCL on the
#   whole disk (bd_may_claim: a claimed partition marks its disk as claimed by a partition).
# - a partition swapped on (swapon opens it exclusively): the same, EBUSY on partition and disk.
# - the whole disk opened without O_EXCL by another process: O_EXCL still succeeds; plain
#   opens are not claims (processes.py finds those by device number).
# - after umount/swapoff: O_EXCL succeeds again on both (for a mount in a namespace that
#   died with its last process, a moment later: the teardown is asynchronous).
# - the other way round, what leases rely on: while the disk is held O_EXCL, O_EXCL on a
#   partition fails with EBUSY and mounting the partition fails.
# The probe itself claims for a few microseconds: a mount or swapon racing with it can fail
# with EBUSY, so it runs once per scan and closes at once.
_PROBE_FLAGS = os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW


def _probe_one(node: Path, dev: BlockDevice) -> bool:
    """True when the kernel refuses an exclusive open (EBUSY); OSError for anything else."""
    try:
        fd = os.open(node, _PROBE_FLAGS)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev != os.makedev(*dev.devno):
            # Replaced between lstat and open: not the device we meant. Report, do not guess.
            raise OSError(errno.ESTALE, f"{node} changed under the probe")
    finally:
        os.close(fd)
    return False


def probe_exclusive(
    roots: Roots, devices: Iterable[BlockDevice], skip: Collection[str] = ()
) -> Collected[frozenset[str]]:
    """Names of devices for which an O_EXCL open fails with EBUSY. Empty on captured trees.

    `skip`: devices the agent itself holds (lease claims), which would always answer EBUSY.
    """
    if not roots.live:
        return Collected(frozenset(), [])
    busy: set[str] = set()
    problems: list[ScanProblem] = []
    for dev in devices:
        if dev.name in skip:
            continue
        node = find_block_node(roots, dev)
        if node is None:
            if not (roots.sys / "dev" / "block" / format_devno(dev.devno)).exists():
                continue  # the device went away since collect_block
            problems.append(
                ScanProblem(
                    f"/dev/{dev.name}",
                    f"no block node with device number {format_devno(dev.devno)} in {roots.dev}",
                    (dev.name,),
                )
            )
            continue
        try:
            if _probe_one(node, dev):
                busy.add(dev.name)
        except OSError as exc:
            if exc.errno in VANISHED_ERRNOS:
                continue  # vanished between lookup and open
            problems.append(ScanProblem(str(node), f"exclusive-open probe failed: {os_reason(exc)}", (dev.name,)))
    return Collected(frozenset(busy), problems)
