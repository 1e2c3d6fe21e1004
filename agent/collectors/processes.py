"""Which processes hold device nodes (and sockets) open: one pass over /proc/PID/fd.

Live system: every fd whose link names something under /dev/ is stat()ed
through the fd entry itself, which follows to the inode actually opened, so
the match is by (device number, block|char) and never by name: a node renamed,
recreated elsewhere or seen through another mount namespace's /dev still
matches. The text alone never clears a dev/ fd, not even for a process in the
agent's own mount namespace: the kernel writes the path from the root of the
tree the file was opened in, so a node in a lazily unmounted (detached) tree, or
one bound over /dev/null in another namespace, reads "/dev/null" whatever it is
(tests/integration/test_processes_live.py holds such a process for each case).
Captured trees keep only the link text, so there the text is resolved
inside roots.dev (following the tree's own symlinks, /dev/mapper/x -> dm-0)
and matched by node path.

Only fds whose link text names a dev/ directory are stat()ed (and sockets
looked up): regular files, pipes and anon inodes are skipped on the text
alone, which keeps a pass over tens of thousands of fds cheap. But any user
may make a user and mount namespace and bind /dev, or one node, anywhere
(`unshare -Urm; mount --rbind /dev /tmp/d`): a disk opened as /tmp/d/vdb reads
"/tmp/d/vdb". So while a devtmpfs is mounted outside any dev/ directory in
some namespace (`device_dirs`), every fd whose text is a path is stat()ed
(tests/integration/test_inspect_live.py). A node opened from a path on no
devtmpfs at all (root's mknod in /tmp) is not seen.

What vanishes mid-scan (a pid, an fd) is skipped: it no longer holds anything.
What cannot be read (EACCES under hidepid or a non-root agent) becomes a
ScanProblem that affects everything, so the policy says UNKNOWN, not READY.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import NamedTuple

from unplugd.agent.collectors.devlinks import resolve_dev_path
from unplugd.agent.errors import ReadError, Vanished
from unplugd.agent.lazylog import Logger
from unplugd.agent.model import Collected, DeviceNode, DevNo, OpenRef, ScanProblem
from unplugd.agent.roots import Roots
from unplugd.agent.sysio import (
    VANISHED_ERRNOS,
    os_listdir,
    os_open_dir,
    os_open_regular_at,
    os_reason,
    read_text,
)

__all__ = ["ProcessScan", "scan_files_on", "scan_processes"]

log = Logger(__name__)  # imports logging only to log (lazylog)

_S_IFMT = 0o170000  # stat.S_IFMT's mask, applied inline in the fd loop
_FILE_TYPE = {"block": stat.S_IFBLK, "char": stat.S_IFCHR}


class ProcessScan(NamedTuple):
    open_refs: list[OpenRef]  # only for the wanted device numbers
    # socket inode -> [(pid, command)], only for the wanted inodes
    socket_owners: dict[int, list[tuple[int, str]]] = {}


def _node_path(dev_root: Path, text: str) -> str | None:
    """The /dev path of the node '/dev/...' text names in a captured dev tree, which need not hold the node."""
    rel = resolve_dev_path(dev_root, text, missing_ok=True)
    return None if rel is None else "/dev/" + rel


def _socket_inode(target: str) -> int | None:
    # "socket:[12345]"
    if target.endswith("]"):
        digits = target[len("socket:[") : -1]
        if digits.isdigit():
            return int(digits)
    return None


class _Scanner:
    """State of one pass; split out so the per-fd loop stays flat and fast."""

    def __init__(
        self,
        roots: Roots,
        wanted: Sequence[DeviceNode],
        socket_inodes: Collection[int],
        device_dirs: Collection[str] = (),
    ) -> None:
        self.roots = roots
        self.live = roots.live
        # A devtmpfs mounted outside any dev/ directory: then every fd whose text is a path is
        # stat()ed, one stat() per fd as fuser makes, bounded whatever names or how many such
        # mounts a user makes (matching texts against thousands of mount points, whose escaping
        # need not even agree with the link text's, would not be). Not "/": the kernel's kdevtmpfs
        # thread has a namespace of its own whose root is devtmpfs, on every machine. So a node
        # held by a process whose namespace's root is a devtmpfs (pivot_root into a bound /dev)
        # is not seen.
        self.stat_paths = any(d != "/" and "/dev/" not in d + "/" for d in device_dirs)
        # Live, an fd matches by what stat() of it answers: (st_rdev, file type) -> the node.
        self.by_rdev: dict[tuple[int, int], DeviceNode] = {
            (os.makedev(*n.devno), _FILE_TYPE[n.kind]): n for n in wanted if n.kind in _FILE_TYPE
        }
        self.rdevs = frozenset(rdev for rdev, _ in self.by_rdev)
        self.by_path: dict[str, DeviceNode] = {}
        self.resolved: dict[str, str | None] = {}
        if not self.live:
            for node in wanted:
                self.by_path[node.path] = node
                canonical = _node_path(roots.dev, node.path)
                if canonical is not None:
                    self.by_path.setdefault(canonical, node)
        self.sockets = frozenset(socket_inodes)
        self.want_devices = bool(wanted)
        self.open_refs: list[OpenRef] = []
        self.socket_owners: dict[int, list[tuple[int, str]]] = {}
        self.problems: list[ScanProblem] = []

    def problem(self, pid: int, exc: OSError, proc_dir: str) -> None:
        reason = os_reason(exc)
        command = self._command(pid, proc_dir)
        who = f"pid {pid} ({command})" if command else f"pid {pid}"
        self.problems.append(
            ScanProblem(
                object=f"/proc/{pid}/fd",
                detail=f"cannot read the open files of {who}: {reason}; it may hold any device",
                affects=("*",),
            )
        )

    def scan_pid(self, pid: int, proc_dir: str) -> None:
        try:
            dfd = os_open_dir(f"{proc_dir}/{pid}/fd")
        except OSError as exc:
            if exc.errno not in VANISHED_ERRNOS:
                self.problem(pid, exc, proc_dir)
            return
        try:
            self._scan_fds(pid, dfd, proc_dir)
        finally:
            os.close(dfd)

    def _scan_fds(self, pid: int, dfd: int, proc_dir: str) -> None:
        try:
            names = os.listdir(dfd)
        except OSError as exc:
            if exc.errno not in VANISHED_ERRNOS:
                self.problem(pid, exc, proc_dir)
            return
        found: list[tuple[DeviceNode, str, str]] = []  # (node, link text, fd name)
        inodes: list[int] = []
        # The hot loop of a scan (tens of thousands of fds): locals only, text tests first, and
        # live, one stat() per device fd looked up by (st_rdev, type) with nothing built for a miss.
        readlink = os.readlink
        fstat = os.stat
        live = self.live
        want_devices = self.want_devices
        rdevs = self.rdevs
        by_rdev = self.by_rdev
        sockets = self.sockets
        stat_paths = self.stat_paths
        for name in names:
            try:
                target = readlink(name, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in VANISHED_ERRNOS:
                    continue  # fd closed since the listing
                if exc.errno == errno.EINVAL and not live:
                    text = self._read_captured_fd(pid, name, dfd, proc_dir)
                    if text is None:
                        continue
                    target = text
                else:
                    self.problem(pid, exc, proc_dir)
                    return
            # Live, a node may also show under another root's dev/ (a container's
            # rootfs seen from here); stat() decides, the text only pre-filters.
            if ("/dev/" in target or (stat_paths and target.startswith("/"))) and (live or target.startswith("/dev/")):
                if not want_devices:
                    continue
                if not live:
                    node = self._match_captured(target)
                    if node is not None:
                        found.append((node, target, name))
                    continue
                try:
                    # Follows the fd to the opened inode. A bytes name: os.stat converts a str
                    # name through more steps (~0.4 us of the ~1.5 us it spends in Python here).
                    st = fstat(name.encode(), dir_fd=dfd)
                except OSError as exc:
                    if exc.errno in VANISHED_ERRNOS:
                        continue  # closed meanwhile: nothing held through it any more
                    self.problem(pid, exc, proc_dir)  # unreadable: never a silent "not held"
                    return
                rdev = st.st_rdev
                if rdev in rdevs:  # a plain int test first: most device fds are /dev/null and kin
                    node = by_rdev.get((rdev, st.st_mode & _S_IFMT))
                    if node is not None:
                        found.append((node, target, name))
            elif sockets and target.startswith("socket:["):
                inode = _socket_inode(target)
                if inode is not None and inode in sockets:
                    inodes.append(inode)
        if not found and not inodes:
            return
        command = self._command(pid, proc_dir)
        if command is None:
            return  # exited meanwhile: it holds nothing any more
        self.open_refs += [
            OpenRef(pid, command, node.devno, node.kind, target, int(name) if name.isdigit() else None)
            for node, target, name in found
        ]
        for inode in inodes:
            self.socket_owners.setdefault(inode, []).append((pid, command))

    def _read_captured_fd(self, pid: int, name: str, dfd: int, proc_dir: str) -> str | None:
        # A capture may store an fd as a small file holding the link text.
        try:
            fd = os_open_regular_at(dfd, name)  # a FIFO or a link in a hostile tree is not read
            try:
                data = os.read(fd, 4096)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno not in VANISHED_ERRNOS:
                self.problem(pid, exc, proc_dir)
            return None
        return data.decode("utf-8", "surrogateescape").strip()

    def _match_captured(self, target: str) -> DeviceNode | None:
        """A captured tree keeps only the link text: resolved inside roots.dev, matched by node path."""
        node = self.by_path.get(target)
        if node is None:
            if target in self.resolved:
                canonical = self.resolved[target]
            else:
                canonical = self.resolved[target] = _node_path(self.roots.dev, target)
            if canonical is not None:
                node = self.by_path.get(canonical)
        return node

    @staticmethod
    def _command(pid: int, proc_dir: str) -> str | None:
        try:
            return read_text(f"{proc_dir}/{pid}/comm").removesuffix("\n")  # the one the kernel adds
        except Vanished:
            return None
        except ReadError:
            return "?"


def scan_processes(
    roots: Roots,
    wanted: Sequence[DeviceNode],
    socket_inodes: Collection[int] = (),
    device_dirs: Collection[str] = (),
) -> Collected[ProcessScan]:
    """Every process holding one of `wanted` open, and the owners of `socket_inodes`.

    device_dirs: where devtmpfs is mounted, in any namespace (engine._device_dirs); one outside any
    dev/ directory makes every fd that names a path stat()ed.
    """
    scanner = _Scanner(roots, wanted, socket_inodes, device_dirs)
    proc_dir = str(roots.proc)
    try:
        pids = [int(name) for name in os_listdir(proc_dir) if name.isdigit()]
    except OSError as exc:
        reason = os_reason(exc)
        return Collected(
            ProcessScan(open_refs=[], socket_owners={}),
            [ScanProblem(object="/proc", detail=f"cannot list processes: {reason}", affects=("*",))],
        )
    if not scanner.want_devices and not scanner.sockets:
        return Collected(ProcessScan(open_refs=[], socket_owners={}), [])
    for pid in pids:
        scanner.scan_pid(pid, proc_dir)
    if scanner.problems:
        log.debug("process scan: %d unreadable fd tables", len(scanner.problems))
    scanner.open_refs.sort(key=lambda r: (r.pid, r.fd if r.fd is not None else -1))
    return Collected(ProcessScan(open_refs=scanner.open_refs, socket_owners=scanner.socket_owners), scanner.problems)


def scan_files_on(roots: Roots, devnos: Collection[DevNo]) -> Collected[list[OpenRef]]:
    """Processes with a file open, or their working directory, on a filesystem of one of `devnos`.

    For disks the kernel says are held (the O_EXCL probe) while no mount table shows them: a
    filesystem detached with `umount -l` lives on as long as a file of it is open, and only the
    opener can be named. Live systems only (a captured tree keeps no inode numbers), and every fd is
    stat()ed, so the engine runs it only for such disks. Matches are OpenRef(kind="file") with the
    filesystem's device number; what cannot be read is skipped (the claim is reported anyway), so
    its problems are always empty.
    """
    if not roots.live or not devnos:
        return Collected([], [])
    wanted = frozenset(devnos)
    proc_dir = str(roots.proc)
    refs: list[OpenRef] = []
    try:
        pids = sorted(int(name) for name in os.listdir(proc_dir) if name.isdigit())
    except OSError:
        return Collected([], [])
    for pid in pids:
        found: list[tuple[DevNo, str, int | None]] = []
        for entry, fd in [("cwd", None), *_fd_entries(proc_dir, pid)]:
            path = f"{proc_dir}/{pid}/{entry}"
            try:
                st = os.stat(path)
            except OSError:
                continue  # gone, or not ours to read: the EXCLUSIVE_CLAIM stays the answer
            devno = (os.major(st.st_dev), os.minor(st.st_dev))
            if devno in wanted:
                try:
                    target = os.readlink(path)
                except OSError:
                    continue
                found.append((devno, target, fd))
        if found:
            command = _Scanner._command(pid, proc_dir)
            if command is not None:
                refs.extend(OpenRef(pid, command, devno, "file", target, fd) for devno, target, fd in found)
    return Collected(refs, [])


def _fd_entries(proc_dir: str, pid: int) -> list[tuple[str, int | None]]:
    try:
        names = os.listdir(f"{proc_dir}/{pid}/fd")
    except OSError:
        return []
    return [(f"fd/{name}", int(name)) for name in names if name.isdigit()]
