"""Block devices from /sys/class/block, and the kernel's own "is it claimed?" answer.

Per device: dev (MAJ:MIN), size (512-byte sectors), partition (partitions only;
the parent disk is the directory the partition sits in), dm/name + dm/uuid,
md/level, loop/backing_file, holders/ and slaves/ (symlinks named after the
kernel names of the devices stacked on / under it).

NVMe multipath (nvme_core.multipath=Y, Debian's default): the head nvme2n1 that
users mount lives under /sys/devices/virtual/nvme-subsystem/nvme-subsys2/, and
each controller the namespace is reached through has a hidden path device
(nvme2c1n1, below the controller below its PCI function) with no device number
and no node (`hidden` reads 1). The kernel's map from head to paths, as 6.1
shows it (recorded in the test guest): the head's `device` link names its
subsystem; the subsystem links its controllers (nvme1 -> .../0000:02:00.0/
nvme/nvme1); a path device's `device` link names its controller, and its `nsid`
the namespace, equal to the head's. Newer kernels also give the head a
multipath/ directory of links to its paths, used when present. Names such as
nvme2c1n1 are never parsed.
The udev links of /dev/disk (by-id, by-path, by-uuid, ...) are read too, so a
user may name a disk by any of them.

probe_exclusive asks the kernel directly: an open(O_EXCL) of a block device
fails with EBUSY while anyone holds an exclusive claim on it. Mounted
filesystems, active swap, dm/md members and other O_EXCL openers all claim.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from unplugd.agent.collectors.devlinks import resolve_dev_path
from unplugd.agent.errors import ReadError, Vanished
from unplugd.agent.lazylog import Logger
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
    readlink_or,
)

__all__ = [
    "collect_block",
    "devno_index",
    "find_block_node",
    "parse_sectors",
    "probe_exclusive",
    "sysfs_link_target",
]

log = Logger(__name__)  # imports logging only to log (lazylog)

_LOOP_MAJOR = 7


def parse_sectors(text: str) -> int:
    """sysfs `size` (always in 512-byte sectors, whatever the logical block size) -> bytes."""
    value = text.strip()
    if not value.isdigit():
        raise ValueError(f"not a sector count: {text!r}")
    return int(value) * 512


def sysfs_link_target(where: str, text: str) -> str | None:
    """A sysfs link's target as "/sys/..." text, or None when it leaves /sys.

    where: the directory holding the link, relative to the sysfs root ("devices/virtual/...").
    Joined and normalised as text, never resolved through the filesystem, so a captured tree gives
    the same answer as the live one (an absolute link in a captured tree still names the live /sys).
    """
    if text.startswith("/"):
        if not text.startswith("/sys/"):
            return None
        joined = os.path.normpath(text)
    else:
        joined = os.path.normpath("/sys/" + where + "/" + text)
    return joined if joined.startswith("/sys/") and not joined.startswith("/sys/..") else None


class _PathDevice(NamedTuple):
    """A hidden per-path device of an NVMe multipath head: no device number, no node; not a block device."""

    where: str | None  # "/sys/devices/.../nvme/nvme1/nvme2c1n1"
    controller: str | None  # its `device` link: the controller's directory
    nsid: str | None


class _Head(NamedTuple):
    """An NVMe multipath head waiting for its paths: its subsystem's controllers and its namespace id."""

    controllers: frozenset[str]
    nsid: str | None


def _link(sysdir: str, where: str | None, name: str) -> str | None:
    """The "/sys/..." target of a link in a device directory, or None (no link, unknown directory)."""
    if where is None:
        return None
    text = readlink_or(f"{sysdir}/{name}", when=ReadError)
    return sysfs_link_target(where, text) if text is not None else None


def _nvme_head(roots: Roots, sysdir: str, where: str | None, present: set[str]) -> _Head | None:
    """The subsystem map of a disk whose parent is an NVMe subsystem (a multipath head); None otherwise."""
    if "device" not in present:
        return None
    subsys = _link(sysdir, where, "device")
    if subsys is None or not subsys.startswith("/sys/devices/virtual/"):
        return None  # a physical disk: its parent is its controller, below a PCI function
    sdir = f"{roots.sys}/{subsys[len('/sys/') :]}"
    kind = readlink_or(f"{sdir}/subsystem", when=ReadError)
    if kind is None or os.path.basename(kind) != "nvme-subsystem":
        return None
    controllers = set()
    for entry in listdir(sdir):
        if entry == "subsystem":
            continue
        target = _link(sdir, subsys[len("/sys/") :], entry)
        if target is not None and target.startswith("/sys/devices/"):
            controllers.add(target)  # nvme1 -> /sys/devices/pci0000:00/.../nvme/nvme1
    nsid = read_text_or(f"{sysdir}/nsid") if "nsid" in present else None
    return _Head(frozenset(controllers), nsid.strip() if nsid else None)


def devno_index(block: Mapping[str, BlockDevice]) -> dict[DevNo, str]:
    return {dev.devno: name for name, dev in block.items()}


def _read_device(
    roots: Roots, sysdir: str, name: str, parent: str | None, where: str | None, *, heads: dict[str, _Head]
) -> BlockDevice | _PathDevice:
    """One device; raises ReadError/ValueError for the caller to turn into a ScanProblem.

    where: the device's directory relative to the sysfs root, from its class link (None unknown).
    An NVMe path device is a _PathDevice; a head whose paths are still to be found lands in heads.
    """
    try:
        present = set(os_listdir(sysdir))
    except OSError as exc:
        raise as_read_error(sysdir, exc) from exc
    if "dev" not in present:
        if "hidden" in present and (read_text_or(f"{sysdir}/hidden") or "").strip() == "1":
            nsid = read_text_or(f"{sysdir}/nsid") if "nsid" in present else None
            return _PathDevice(
                "/sys/" + where if where else None, _link(sysdir, where, "device"), nsid.strip() if nsid else None
            )
        raise ValueError("no device number (no dev attribute)")
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
    paths: tuple[str, ...] = ()
    if "multipath" in present:
        paths = _multipath(sysdir, where)
    else:
        head = _nvme_head(roots, sysdir, where, present)
        if head is not None:
            heads[name] = head
    return BlockDevice(name, "disk", devno, size, holders=holders, slaves=slaves, multipath=paths)


def _multipath(sysdir: str, where: str | None) -> tuple[str, ...]:
    """The sysfs directories of a multipath head's path devices, from its multipath/ links."""
    if where is None:
        raise ValueError("an NVMe multipath head whose sysfs directory is unknown")
    out: list[str] = []
    for entry in sorted(listdir(f"{sysdir}/multipath")):
        link = f"{sysdir}/multipath/{entry}"
        try:
            text = os_readlink(link)
        except OSError as exc:
            raise as_read_error(link, exc) from exc
        target = sysfs_link_target(f"{where}/multipath", text)
        if target is None:
            raise ValueError(f"multipath/{entry} -> {text!r} leaves /sys")
        out.append(target)
    return tuple(out)


# (name, sysfs dir to read, parent disk, the device's directory relative to the sysfs root or None)
_Entry = tuple[str, str, str | None, str | None]


def _class_block_entries(roots: Roots) -> list[_Entry]:
    """Each device of /sys/class/block; parent and directory from the link text, not the filesystem."""
    base = f"{roots.sys}/class/block"
    out: list[_Entry] = []
    for name in listdir(base):
        try:
            link: str | None = os_readlink(f"{base}/{name}")
        except OSError:
            link = None  # not a link (a plain directory in a hand-made tree) or gone: no parent known
        parent: str | None = None
        where: str | None = None
        if link is not None:
            parts = [p for p in link.split("/") if p]
            # .../block/vda/vda1 -> vda; .../block/vda -> the grandparent is "block": no parent
            if len(parts) >= 2 and parts[-2] not in ("block", "..", "."):
                parent = parts[-2]
            target = sysfs_link_target("class/block", link)
            where = target[len("/sys/") :] if target is not None else None
        out.append((name, f"{base}/{name}", parent, where))
    return out


def _sys_block_entries(roots: Roots) -> list[_Entry]:
    """Fallback without /sys/class/block: /sys/block/DISK and its partition subdirectories."""
    base = f"{roots.sys}/block"
    out: list[_Entry] = []
    for disk in listdir(base):
        try:
            target = sysfs_link_target("block", os_readlink(f"{base}/{disk}"))
        except OSError:
            target = None
        where = target[len("/sys/") :] if target is not None else None
        out.append((disk, f"{base}/{disk}", None, where))
        for sub in listdir(f"{base}/{disk}"):
            if os_exists(f"{base}/{disk}/{sub}/partition"):
                out.append((sub, f"{base}/{disk}/{sub}", disk, f"{where}/{sub}" if where else None))
    return out


def _disk_links(roots: Roots, names: Collection[str]) -> Collected[dict[str, list[str]]]:
    """Kernel name -> the udev links of /dev/disk/*/ that name it (/dev/disk/by-id/nvme-QEMU_...)."""
    base = roots.dev / "disk"
    found: dict[str, list[str]] = {}
    try:
        kinds = sorted(os_listdir(base))
    except FileNotFoundError:
        return Collected(found, [])  # no udev (a container, a hand-made tree): names only
    except OSError as exc:
        # Only the names users type are at stake, not a verdict: say so, judge on.
        return Collected(found, [ScanProblem(str(base), f"cannot list: {os_reason(exc)}", ())])
    for kind in kinds:
        try:
            entries = sorted(os_listdir(base / kind))
        except OSError:
            continue  # not a directory, or gone
        for entry in entries:
            live = f"/dev/disk/{kind}/{entry}"
            rel = resolve_dev_path(roots.dev, live)
            if rel is not None and rel in names:
                found.setdefault(rel, []).append(live)
    return Collected(found, [])


def collect_block(roots: Roots) -> Collected[dict[str, BlockDevice]]:
    problems: list[ScanProblem] = []
    try:
        entries = _class_block_entries(roots) or _sys_block_entries(roots)
    except ReadError as exc:
        return Collected({}, [ScanProblem(exc.path, str(exc))])
    devices: dict[str, BlockDevice] = {}
    heads: dict[str, _Head] = {}
    paths: list[_PathDevice] = []
    for name, sysdir, parent, where in entries:
        try:
            found = _read_device(roots, sysdir, name, parent, where, heads=heads)
        except Vanished as exc:
            # Gone mid-scan (loop detached, disk unplugged): say so; it may have mattered.
            log.debug("block device %s vanished: %s", name, exc)
            problems.append(ScanProblem(sysdir, f"vanished during the scan: {exc}", (name,)))
        except ReadError as exc:
            problems.append(ScanProblem(sysdir, str(exc), (name,)))
        except ValueError as exc:
            problems.append(ScanProblem(sysdir, f"malformed: {exc}", (name,)))
        else:
            if isinstance(found, _PathDevice):
                log.debug("%s is a hidden NVMe path device: its head is the block device", name)
                paths.append(found)
            else:
                devices[name] = found
    for name, head in heads.items():
        through = tuple(p.where for p in paths if p.where and p.controller in head.controllers and p.nsid == head.nsid)
        devices[name] = devices[name]._replace(multipath=through)
        if not through:
            # Mounted or not, a head no function carries would look idle everywhere: fail closed.
            problems.append(
                ScanProblem(
                    f"{roots.sys}/class/block/{name}",
                    "an NVMe multipath head with no path found: which functions it runs over is not known",
                )
            )
    links, link_problems = _disk_links(roots, devices.keys())
    problems.extend(link_problems)
    for name, named in links.items():
        devices[name] = devices[name]._replace(links=tuple(named))
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
