"""`unplugd capture DIR`: copy what inspect reads into DIR, so `inspect --root DIR` reproduces it.

Only what the collectors read is written (DIR/sys, DIR/proc, DIR/dev,
DIR/netlink.json), never whole trees:

* sys: every PCI function's directory (ids, driver, the devices below it with
  their dev/uevent/subsystem), hotplug slots, every block device (dev, size,
  partition, holders/, slaves/, dm/, md/, loop/; hidden, nsid, device and
  multipath/ of NVMe multipath heads and paths, and the links of their NVMe
  subsystems), every network interface
  (ifindex, flags, operstate, carrier, address, master/upper_/lower_ links,
  bonding/ and bridge/ as markers), and the class/bus/dev links to them;
* proc: each pid's ns/mnt link, one mountinfo per mount namespace (plus the
  capturing process, which proc/self points to), fd links that name a device
  or a socket (as link text, never followed) and the comm of their owners;
  swaps, net/tcp|tcp6|udp|udp6, hostname and kernel release;
* dev: every symlink as a symlink, block nodes and the functions' char nodes
  as empty regular files (a captured tree holds no real device node);
* netlink.json: links, addresses and routes from rtnetlink.

Something the capture could not read (EACCES on /proc/1/fd under a stricter
pid 1, EINVAL from carrier of a down link) is stored as a symlink pointing at
itself: every reader then gets an error (ELOOP), never content, so the
captured tree yields UNKNOWN where the live system did. A pid whose mount
namespace link is denied gets the namespace its mount table matches, or
"mnt:[0]" (unknown) as the live collector would label it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from unplugd.agent.collectors.mounts import parse_mnt_ns
from unplugd.agent.collectors.pci import BDF_NAME, collect_pci
from unplugd.agent.errors import InvalidArgument, ReadError
from unplugd.agent.roots import Roots
from unplugd.agent.sysio import (
    DENIED_ERRNOS,
    VANISHED_ERRNOS,
    beneath,
    os_listdir,
    os_lstat,
    os_read,
    os_readlink,
    os_reason,
)

__all__ = ["CaptureStats", "capture"]

log = logging.getLogger(__name__)

# Attribute files the collectors read (pci.py, block.py, net.py); nothing else is copied.
_SYS_FILES = frozenset(
    {
        "vendor", "device", "class", "dev", "uevent", "size", "partition", "ro", "removable",
        "ifindex", "flags", "operstate", "carrier", "address", "tun_flags", "type",
        "name", "uuid", "level", "backing_file", "hidden", "nsid",
    }
)  # fmt: skip
_SYS_LINKS = ("driver", "subsystem", "master", "upper_", "lower_", "module", "device")
# Directories whose existence is the information (net.py: bond, bridge).
_SYS_MARKERS = frozenset({"bonding", "bridge"})
# Directories whose entries are links to other devices (block.py lists them).
_SYS_LINK_DIRS = frozenset({"holders", "slaves", "multipath"})
_SYS_NOISE = frozenset(
    {"power", "msi_irqs", "queue", "queues", "mq", "trace", "statistics", "integrity", "bdi", "hwmon", "wakeup"}
)
_SYS_DEPTH = 12
_SLOT_FILES = ("address", "power", "adapter", "attention", "latch", "module")
_PROC_FILES = ("swaps", "net/tcp", "net/tcp6", "net/udp", "net/udp6", "sys/kernel/hostname", "sys/kernel/osrelease")
_DEV_SKIP = frozenset({"shm", "pts", "mqueue", "hugepages"})


@dataclass
class CaptureStats:
    files: int = 0
    links: int = 0
    unreadable: list[str] = field(default_factory=list)


class _Writer:
    """Copies entries from one tree into another, keyed by paths relative to the tree base."""

    def __init__(self, src: Roots, dest: Path) -> None:
        self.src = src
        self.dest = dest
        self.stats = CaptureStats()
        self.done: set[str] = set()

    def src_path(self, rel: str) -> Path:
        return self.src.base / rel

    def _target(self, rel: str) -> Path | None:
        if rel in self.done:
            return None
        self.done.add(rel)
        out = self.dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def unreadable(self, rel: str, exc: OSError) -> None:
        out = self._target(rel)
        if out is None:
            return
        os.symlink(out.name, out)  # a link to itself: ELOOP for every reader
        self.stats.unreadable.append(f"/{rel}: {os_reason(exc)}")

    def data(self, rel: str, content: bytes) -> None:
        out = self._target(rel)
        if out is not None:
            out.write_bytes(content)
            self.stats.files += 1

    def file(self, rel: str) -> bool:
        """Copy one file; False when it does not exist."""
        if rel in self.done:
            return True
        try:
            content = os_read(self.src_path(rel))
        except OSError as exc:
            if exc.errno in VANISHED_ERRNOS:
                return False
            if exc.errno == errno.ELOOP and _islink(self.src_path(rel)):
                # an unreadable marker of a captured tree: keep it as it is
                self.link(rel)
                return True
            self.unreadable(rel, exc)
            return True
        self.data(rel, content)
        return True

    def link(self, rel: str) -> str | None:
        """Copy one symlink as its text; the text, or None when it is not a link."""
        try:
            text = os_readlink(self.src_path(rel))
        except OSError as exc:
            if exc.errno not in VANISHED_ERRNOS and exc.errno != errno.EINVAL:
                self.unreadable(rel, exc)
            return None
        out = self._target(rel)
        if out is not None:
            os.symlink(text, out)
            self.stats.links += 1
        return text

    def dir(self, rel: str) -> None:
        (self.dest / rel).mkdir(parents=True, exist_ok=True)


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os_listdir(path))
    except OSError:
        return []


def _islink(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os_lstat(path).st_mode)
    except OSError:
        return False


def _resolve(w: _Writer, rel_link: str, text: str) -> str | None:
    """Where a sysfs link points, relative to the tree base; None outside sys/."""
    if text.startswith("/"):
        joined = os.path.normpath(text.lstrip("/"))
    else:
        joined = os.path.normpath(os.path.join(os.path.dirname(rel_link), text))
    return joined if joined.startswith("sys/") else None


# --------------------------------------------------------------------------- sys


def _entries(w: _Writer, rel: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(name, its path relative to the tree, its lstat) for each entry of a source directory still there."""
    path = w.src_path(rel)
    for name in _listdir(path):
        try:
            st = os_lstat(path / name)
        except OSError:
            continue
        yield name, f"{rel}/{name}", st


def _device_tree(w: _Writer, rel: str, depth: int = 0) -> None:
    """A device directory and what the collectors read below it."""
    for name, sub, st in _entries(w, rel):
        if stat.S_ISLNK(st.st_mode):
            if name.startswith(_SYS_LINKS):
                w.link(sub)
        elif stat.S_ISREG(st.st_mode):
            if name in _SYS_FILES:
                w.file(sub)
        elif stat.S_ISDIR(st.st_mode):
            if name in _SYS_MARKERS:
                w.dir(sub)
            elif name in _SYS_LINK_DIRS:
                w.dir(sub)
                for entry in _listdir(w.src_path(sub)):
                    w.link(f"{sub}/{entry}")
            elif name in _SYS_NOISE or BDF_NAME.match(name) or depth >= _SYS_DEPTH:
                continue  # child PCI functions are captured through their own links
            else:
                _device_tree(w, sub, depth + 1)


def _linked_devices(w: _Writer, rel_dir: str) -> Iterator[str]:
    """Copy every link in a class/bus directory; yield the device directories they name."""
    for name in _listdir(w.src_path(rel_dir)):
        rel = f"{rel_dir}/{name}"
        text = w.link(rel)
        if text is None:
            continue
        target = _resolve(w, rel, text)
        if target is not None:
            yield target


def _capture_sys(w: _Writer) -> None:
    for target in _linked_devices(w, "sys/bus/pci/devices"):
        _device_tree(w, target)
    for slot in _listdir(w.src_path("sys/bus/pci/slots")):
        for name in _SLOT_FILES:
            rel = f"sys/bus/pci/slots/{slot}/{name}"
            if _islink(w.src_path(rel)):
                w.link(rel)
            else:
                w.file(rel)
    for base in ("sys/class/block", "sys/block", "sys/class/net"):
        for target in _linked_devices(w, base):
            _device_tree(w, target)
    for _ in _linked_devices(w, "sys/dev/block"):
        pass
    # NVMe subsystems: block.py follows a multipath head's `device` link to its subsystem and reads
    # the subsystem's links to its controllers (and its own `subsystem` link, which says what it is).
    for target in _linked_devices(w, "sys/class/nvme-subsystem"):
        for _name, sub, st in _entries(w, target):
            if stat.S_ISLNK(st.st_mode):
                w.link(sub)


# --------------------------------------------------------------------------- proc


def _mount_ids(text: str) -> frozenset[int]:
    ids = set()
    for line in text.splitlines():
        head = line.split(" ", 1)[0]
        if head.isdigit():
            ids.add(int(head))
    return frozenset(ids)


def _capture_proc(w: _Writer) -> None:
    proc = w.src.proc
    if w.src.live:
        me = os.getpid()
        out = w.dest / "proc" / "self"
        out.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(str(me), out)
        w.done.add("proc/self")
    else:
        w.link("proc/self")
    pids = sorted(int(p) for p in _listdir(proc) if p.isdigit())
    by_ns: dict[int, list[int]] = {}
    denied: list[int] = []
    for pid in pids:
        rel = f"proc/{pid}/ns/mnt"
        try:
            text = os_readlink(w.src_path(rel))
        except OSError as exc:
            if exc.errno in DENIED_ERRNOS:
                denied.append(pid)
            continue
        try:
            ns = parse_mnt_ns(text)
        except ValueError:
            w.link(rel)  # keep what is there (a marker of a captured tree): the collector decides
            continue
        by_ns.setdefault(ns, []).append(pid)
        w.link(rel)
        _capture_fds(w, pid)
    try:
        self_text = os.readlink(w.dest / "proc" / "self")
    except OSError:
        self_text = ""  # a source tree without proc/self: the collector will say so
    tables: dict[frozenset[int], int] = {}
    for ns, members in by_ns.items():
        readers = members[:1]
        if self_text.isdigit() and int(self_text) in members:
            readers.append(int(self_text))
        for pid in readers:
            rel = f"proc/{pid}/mountinfo"
            w.file(rel)
            with contextlib.suppress(OSError):
                tables[_mount_ids((w.dest / rel).read_text(errors="replace"))] = ns
    for pid in denied:
        rel = f"proc/{pid}/mountinfo"
        try:
            ids = _mount_ids(os_read(w.src_path(rel)).decode(errors="replace"))
        except OSError as exc:
            if exc.errno not in VANISHED_ERRNOS:
                w.unreadable(rel, exc)
                _ns_link(w, pid, 0)
            continue
        known = tables.get(ids)
        if known is None:
            tables[ids] = 0
            w.file(rel)
        _ns_link(w, pid, known or 0)
        _capture_fds(w, pid)
    for rel in _PROC_FILES:
        w.file(f"proc/{rel}")


def _ns_link(w: _Writer, pid: int, ns: int) -> None:
    out = w.dest / "proc" / str(pid) / "ns" / "mnt"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(out):
        os.symlink(f"mnt:[{ns}]", out)
        w.stats.links += 1


def _capture_fds(w: _Writer, pid: int) -> None:
    """The fd links that name a device or a socket; the whole fd/ as unreadable if any link is."""
    rel = f"proc/{pid}/fd"
    kept: list[str] = []
    try:
        for name in os_listdir(w.src_path(rel)):
            try:
                text = os_readlink(w.src_path(f"{rel}/{name}"))
            except OSError as exc:
                if exc.errno in VANISHED_ERRNOS:
                    continue  # closed since the listing
                raise
            if text.startswith(("/dev/", "socket:[")) or (w.src.live and "/dev/" in text):
                kept.append(name)
    except OSError as exc:
        if exc.errno not in VANISHED_ERRNOS:
            w.unreadable(rel, exc)
            w.file(f"proc/{pid}/comm")
        return
    for name in kept:
        w.link(f"{rel}/{name}")
    if kept:
        w.file(f"proc/{pid}/comm")


# --------------------------------------------------------------------------- dev


def _function_char_nodes(src: Roots) -> frozenset[tuple[int, int]]:
    functions, _ = collect_pci(src)
    return frozenset(n.devno for f in functions for n in f.device_nodes if n.kind == "char")


def _capture_dev(w: _Writer, chars: frozenset[tuple[int, int]], rel: str = "dev") -> None:
    for name, sub, st in _entries(w, rel):
        if stat.S_ISLNK(st.st_mode):
            w.link(sub)
        elif stat.S_ISDIR(st.st_mode):
            if rel == "dev" and name in _DEV_SKIP:
                continue
            _capture_dev(w, chars, sub)
        elif stat.S_ISBLK(st.st_mode) or (
            stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) in chars
        ):
            w.data(sub, b"")  # a stand-in: names matter, a captured tree has no devices
        elif stat.S_ISREG(st.st_mode) and not w.src.live and st.st_size == 0:
            w.data(sub, b"")  # a stand-in of an earlier capture


# --------------------------------------------------------------------------- entry point


def _read_or_none(path: Path) -> bytes | None:
    try:
        return os_read(path)
    except OSError:
        return None


def _only_ours(dest: Path) -> Path:
    """dest resolved, once no other user can change what lies at it or on the way to it.

    capture writes by path, as root, files and symlinks whose names it chooses: in a directory
    another user may write to, that user could put a symlink where capture is about to write
    (dest/netlink.json -> /etc/shadow) or swap dest/sys for one, and root would write through it.
    So every directory from / to dest must belong to root or to this user, and only dest's
    ancestors may be writable by others, and then only sticky (/tmp): there nobody else may rename
    or remove the entry of ours below. Checked after dest exists, so that one made by someone else
    in the meantime is refused as well.
    """
    resolved = Path(os.path.realpath(dest))
    mine = (0, os.geteuid())
    for path in (*reversed(resolved.parents), resolved):
        st = os.lstat(path)
        writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if st.st_uid not in mine:
            why = f"{path} belongs to uid {st.st_uid}"
        elif writable_by_others and (path == resolved or not st.st_mode & stat.S_ISVTX):
            why = f"{path} is writable by others"
        else:
            continue
        raise InvalidArgument(
            f"{dest}: {why}, who could redirect what capture writes there; capture into a directory "
            "that only root (or you) can change"
        )
    return resolved


def capture(dest: Path | str, roots: Roots | None = None) -> CaptureStats:
    """Write what inspect reads from roots (default: the live system) into dest.

    dest must not exist or be an empty directory (InvalidArgument otherwise).
    """
    src = roots or Roots.live_system()
    out = Path(dest)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgument(f"{out} exists and is not an empty directory")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        out = _only_ours(out)
    except InvalidArgument:
        if made:  # refused: leave nothing behind (rmdir takes only an empty directory, never a link)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    w = _Writer(src, out)
    with beneath(src):  # a captured source is read like `inspect --root` reads it: nothing outside it
        _capture_sys(w)
        _capture_proc(w)
        _capture_dev(w, _function_char_nodes(src))
        netlink = None if src.live else _read_or_none(src.netlink_snapshot)
    if src.live:
        from unplugd.agent.collectors.net import snapshot_netlink

        try:
            data = snapshot_netlink()
        except Exception as exc:  # pyroute2 raises its own types too
            raise ReadError("netlink", str(exc)) from exc
        (out / "netlink.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    elif netlink is not None:
        (out / "netlink.json").write_bytes(netlink)
    for line in w.stats.unreadable:
        log.info("unreadable at capture, kept as an error marker: %s", line)
    return w.stats
