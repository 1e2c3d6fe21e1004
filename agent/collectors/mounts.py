"""Mounts from every mount namespace: /proc/PID/mountinfo, one per distinct /proc/PID/ns/mnt.

A filesystem mounted only inside a container or a service's private namespace
still pins its device, so reading the agent's own mountinfo is not enough.
parse_mountinfo is pure; collect_mounts does the reading and never raises for
what it cannot read: it returns ScanProblems instead (fail closed, affects "*").

Line format (proc(5)):
  36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
  id parent maj:min root mount-point options [optional...] - fstype source super-options
"""

from __future__ import annotations

import re
from typing import NamedTuple

from unplugd.agent.errors import NotPermitted, ParseError, ReadError, Vanished
from unplugd.agent.lazylog import Logger
from unplugd.agent.model import Collected, DevNo, Mount, ScanProblem, parse_devno
from unplugd.agent.roots import Roots
from unplugd.agent.sysio import as_read_error, listdir, os_readlink, read_text, readlink, readlink_or
from unplugd.text import unescape_octal

__all__ = ["MountScan", "collect_mounts", "parse_mnt_ns", "parse_mountinfo"]

log = Logger(__name__)  # imports logging only to log (lazylog)

_NS = re.compile(r"^mnt:\[(\d+)\]$")


def parse_mnt_ns(link: str) -> int:
    """'mnt:[4026531840]' -> 4026531840; ValueError otherwise."""
    m = _NS.match(link.strip())
    if not m:
        raise ValueError(f"not a mount namespace link: {link!r}")
    return int(m.group(1))


def _parse_line(line: str, namespace: int, namespace_pid: int) -> Mount:
    # Split on single spaces: an empty source shows as two spaces in a row.
    fields = line.split(" ")
    try:
        sep = fields.index("-", 6)
    except ValueError:
        raise ValueError("no '-' separator after the optional fields") from None
    if len(fields) - sep - 1 < 3:
        raise ValueError("fewer than 3 fields after '-'")
    mount_id, parent_id, devno, root, mount_point, options = fields[:6]
    if not mount_id.isdigit() or not parent_id.isdigit():
        raise ValueError(f"non-numeric mount id {mount_id!r} or parent id {parent_id!r}")
    fstype, source = fields[sep + 1], fields[sep + 2]
    return Mount(
        mount_id=int(mount_id),
        parent_id=int(parent_id),
        devno=parse_devno(devno),
        root=unescape_octal(root),
        mount_point=unescape_octal(mount_point),
        fstype=unescape_octal(fstype),
        source=unescape_octal(source),
        options=options,
        namespace=namespace,
        namespace_pid=namespace_pid,
    )


def parse_mountinfo(text: str, namespace: int = 0, namespace_pid: int = 0, source: str = "mountinfo") -> list[Mount]:
    """Parse a whole mountinfo; ParseError(source, "line N: ...") on the first malformed line."""
    mounts: list[Mount] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            mounts.append(_parse_line(line, namespace, namespace_pid))
        except ValueError as exc:
            raise ParseError(source, f"line {lineno}: {exc}: {line[:200]!r}") from None
    return mounts


class MountScan(NamedTuple):
    mounts: list[Mount]  # own namespace first and whole; of the others only what can pin a device
    own_namespace: int  # 0 when the agent's own namespace link was unreadable
    root_devno: DevNo | None  # device of "/" in the agent's namespace

    def own_mounts(self) -> list[Mount]:
        return [m for m in self.mounts if m.namespace == self.own_namespace]


def _root_mount(mounts: list[Mount]) -> Mount | None:
    """The visible "/" mount: the top of the stack when several are mounted over each other."""
    roots = [m for m in mounts if m.mount_point == "/"]
    covered = {m.parent_id for m in roots}
    top = [m for m in roots if m.mount_id not in covered] or roots
    return top[-1] if top else None


class _Pids:
    __slots__ = ("by_ns", "denied", "exited", "problems")

    def __init__(self) -> None:
        self.by_ns: dict[int, list[int]] = {}  # mount namespace inode -> its pids, ascending
        self.denied: list[int] = []  # pids whose ns link is denied
        self.problems: list[ScanProblem] = []
        self.exited = False  # some process exited between the listing and reading its ns link


def _scan_pids(roots: Roots) -> _Pids:
    """Which mount namespace each process is in."""
    out = _Pids()
    problems, by_ns, denied = out.problems, out.by_ns, out.denied
    try:
        entries = listdir(roots.proc)
    except ReadError as exc:
        problems.append(ScanProblem(str(roots.proc), str(exc)))
        return out
    base = str(roots.proc)
    parsed: dict[str, int] = {}  # link text -> inode: thousands of pids share a handful of namespaces
    for pid in sorted(int(e) for e in entries if e.isdigit()):
        link = f"{base}/{pid}/ns/mnt"
        try:
            text = os_readlink(link)
        except OSError as exc:
            err = as_read_error(link, exc)
            if isinstance(err, Vanished):
                out.exited = True  # collect_mounts looks again, for children it may have left
                continue
            if isinstance(err, NotPermitted):
                denied.append(pid)
            else:
                problems.append(ScanProblem(link, str(err)))
            continue
        ns = parsed.get(text)
        if ns is None:
            try:
                ns = parsed[text] = parse_mnt_ns(text)
            except ValueError as exc:
                problems.append(ScanProblem(link, str(exc)))
                continue
        if ns == 0:
            denied.append(pid)  # "mnt:[0]": a capture that could not tell the namespace either
            continue
        by_ns.setdefault(ns, []).append(pid)
    return out


# A namespace's table without its mount and parent ids -> (line index, mount) of
# the mounts kept from it (_can_pin_a_device), as parsed once.
Shapes = dict[str, list[tuple[int, Mount]]]


def _can_pin_a_device(m: Mount) -> bool:
    """Whether a mount of another namespace can touch a verdict.

    Mounts of block devices: a real device number, or a /dev path as source
    (btrfs and friends show an anonymous 0:NN number). And bind mounts of
    namespace files (nsfs: /run/netns/X, a pinned mount namespace), which
    name who holds a NIC or a disk nobody else shows. And devtmpfs: a device
    node opened through a /dev bound elsewhere reads as that path in
    /proc/PID/fd (collectors/processes.py). proc, sysfs, tmpfs,
    cgroup... are most of every table and pin nothing; with thousands of
    namespaces, keeping them would cost most of a scan's memory. The
    agent's own namespace is kept whole (swap files, "/").
    """
    return m.devno[0] != 0 or m.source.startswith("/dev/") or m.fstype in ("nsfs", "devtmpfs")


def _shape(text: str) -> tuple[str, list[tuple[int, int]]] | None:
    """(the table without mount and parent ids, those ids line by line); None if a line lacks them."""
    rests: list[str] = []
    ids: list[tuple[int, int]] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        parts = line.split(" ", 2)
        if len(parts) < 3 or not parts[0].isdigit() or not parts[1].isdigit():
            return None  # parse_mountinfo says what is wrong with it
        ids.append((int(parts[0]), int(parts[1])))
        rests.append(parts[2])
    return "\n".join(rests), ids


def _read_namespace(
    roots: Roots, ns: int, pids: list[int], self_pid: int = 0, shapes: Shapes | None = None
) -> tuple[list[Mount] | None, list[ScanProblem], frozenset[int]]:
    """Read the mountinfo of the first pid of ns that is still there (pid 0: proc/self).

    Returns its mounts (None when every one of those processes exited meanwhile), problems, and
    the ids of every mount in the table.
    shapes (another namespace than the agent's): keep only the mounts that
    can pin a device, and remember tables seen in this scan. Any user can
    make thousands of namespaces, nearly all copies of their parent's table
    that differ only in mount ids (`unshare -m`); such a copy is not parsed
    again, its mounts are the first one's with its own ids, sharing strings.
    """
    label = f"mountinfo of mnt:[{ns}]"
    for pid in pids:
        path = roots.proc / (str(pid) if pid else "self") / "mountinfo"
        where = f"{label} (pid {pid or self_pid or 'self'})"
        try:
            text = read_text(path)
        except Vanished:
            continue  # try the next process of that namespace
        except ReadError as exc:
            return [], [ScanProblem(where, str(exc))], frozenset()
        owner = pid or self_pid
        shaped = _shape(text) if shapes is not None else None
        if shaped is not None and shapes is not None and shaped[0] in shapes:
            ids = shaped[1]
            return (
                [
                    Mount(
                        ids[i][0], ids[i][1], t.devno, t.root, t.mount_point, t.fstype, t.source, t.options, ns, owner
                    )
                    for i, t in shapes[shaped[0]]
                ],
                [],
                frozenset(mid for mid, _ in ids),
            )
        try:
            mounts = parse_mountinfo(text, ns, owner, source=where)
        except ParseError as exc:
            log.warning("%s", exc)
            return [], [ScanProblem(where, str(exc))], frozenset()
        every = frozenset(m.mount_id for m in mounts)
        if shapes is None:
            return mounts, [], every
        kept = [(i, m) for i, m in enumerate(mounts) if _can_pin_a_device(m)]
        if shaped is not None and len(mounts) == len(shaped[1]):
            shapes[shaped[0]] = kept
        return [m for _, m in kept], [], every
    return None, [], frozenset()


def _read_unlabelled(roots: Roots, pids: list[int], seen: set[frozenset[int]]) -> Collected[list[Mount]]:
    """Mounts of processes whose ns link is denied (ptrace rules) but whose mountinfo is readable.

    /proc/PID/mountinfo is world-readable while ns/mnt needs ptrace access, e.g.
    for a pid 1 holding capabilities the agent lacks. Mount ids are unique
    system-wide, so the set of ids tells which namespace a table belongs to:
    a table already seen is skipped, a new one is kept with namespace 0.
    """
    mounts: list[Mount] = []
    problems: list[ScanProblem] = []
    unreadable: list[int] = []
    for pid in pids:
        path = roots.proc / str(pid) / "mountinfo"
        where = f"mountinfo of pid {pid} (namespace unknown)"
        try:
            found = parse_mountinfo(read_text(path), 0, pid, source=where)
        except Vanished:
            continue
        except ReadError:
            unreadable.append(pid)
            continue
        except ParseError as exc:
            problems.append(ScanProblem(where, str(exc)))
            continue
        key = frozenset(m.mount_id for m in found)
        if key not in seen:
            seen.add(key)
            mounts.extend(found)
    if unreadable:
        # A process whose mounts we cannot see may have anything mounted.
        shown = ", ".join(map(str, unreadable[:10])) + (" ..." if len(unreadable) > 10 else "")
        problems.append(
            ScanProblem(
                f"{roots.proc}/PID/mountinfo",
                f"mounts of {len(unreadable)} process(es) not readable: {shown}",
            )
        )
    return Collected(mounts, problems)


def collect_mounts(roots: Roots) -> Collected[MountScan]:
    problems: list[ScanProblem] = []
    own_link = roots.proc / "self" / "ns" / "mnt"
    own_ns = 0
    try:
        own_ns = parse_mnt_ns(readlink(own_link))
    except (ReadError, ValueError) as exc:
        problems.append(ScanProblem(str(own_link), f"cannot tell the agent's mount namespace: {exc}"))
    # proc/self: the agent itself, or in a captured tree a link to the pid that captured it.
    target = readlink_or(roots.proc / "self", when=ReadError)
    self_pid = int(target) if target is not None and target.isdigit() else 0

    pids = _scan_pids(roots)
    by_ns, denied, exited = pids.by_ns, pids.denied, pids.exited
    problems.extend(pids.problems)

    mounts: list[Mount] = []
    own: list[Mount] = []
    seen: set[frozenset[int]] = set()
    if own_ns:
        own_pids = [0] + [p for p in by_ns.pop(own_ns, []) if p != self_pid]
        own_read, own_problems, every = _read_namespace(roots, own_ns, own_pids, self_pid)
        own = own_read or []  # the agent's own namespace: proc/self never exits
        problems.extend(own_problems)
        mounts.extend(own)
        seen.add(every)
    shapes: Shapes = {}
    done = {own_ns}
    tried = {p for ns_pids in by_ns.values() for p in ns_pids}
    for ns in sorted(by_ns):
        read, ns_problems, every = _read_namespace(roots, ns, by_ns[ns], shapes=shapes)
        if read is None:
            exited = True
            continue
        done.add(ns)
        mounts.extend(read)
        problems.extend(ns_problems)
        seen.add(every)
    if exited:
        # A process exited mid-scan (before its namespace was known, or the last one listed
        # in it), but a child forked before may live on in that namespace, its mounts still
        # pinning devices: list /proc once more and read every namespace not read yet.
        again = _scan_pids(roots)
        problems.extend(again.problems)
        for ns in sorted(set(again.by_ns) - done):
            read, ns_problems, every = _read_namespace(
                roots, ns, [p for p in again.by_ns[ns] if p not in tried], shapes=shapes
            )
            if read is None:
                log.debug("every process of mnt:[%d] exited during the scan", ns)
                continue
            mounts.extend(read)
            problems.extend(ns_problems)
            seen.add(every)
    found, unlabelled_problems = _read_unlabelled(roots, denied, seen)
    mounts.extend(m for m in found if _can_pin_a_device(m))
    problems.extend(unlabelled_problems)

    root = _root_mount(own)
    if own_ns and root is None and not any(p.object.startswith(f"mountinfo of mnt:[{own_ns}]") for p in problems):
        problems.append(ScanProblem(f"mountinfo of mnt:[{own_ns}]", "no mount on / in the agent's namespace"))
    return Collected(MountScan(mounts=mounts, own_namespace=own_ns, root_devno=root.devno if root else None), problems)
