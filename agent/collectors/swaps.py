"""Active swap areas from /proc/swaps, each tied to the device number that holds it.

  Filename                                Type            Size            Used            Priority
  /dev/vdb2                               partition       1048572         0               -2
  /swap\\040file                           file            524284          0               -3

Paths are octal-escaped like mountinfo (space, tab, newline, backslash). A
partition swap is the block device itself; a swap file pins the filesystem it
lives on, found as the mount with the longest matching prefix (any namespace, the
agent's own first: model.mount_holding).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping, Sequence

from unplugd.agent.collectors.block import devno_index
from unplugd.agent.collectors.devlinks import resolve_dev_path
from unplugd.agent.errors import ReadError
from unplugd.agent.lazylog import Logger
from unplugd.agent.model import BlockDevice, Collected, DevNo, Mount, ScanProblem, Swap, mount_holding
from unplugd.agent.roots import Roots
from unplugd.agent.sysio import read_text
from unplugd.text import unescape_octal

__all__ = ["collect_swaps", "parse_swaps"]

log = Logger(__name__)  # imports logging only to log (lazylog)

SwapLine = tuple[str, str, int, int]


# The kernel pads the columns with spaces and tabs and escapes only those (and newline, backslash)
# in the path: a vertical tab or a \x1c in a swap file's name is part of it, not a separator,
# so str.split() (any Unicode whitespace) would cut the name and misread the line.
_COLUMNS = re.compile(r"[ \t]+")


def _parse_line(line: str) -> SwapLine:
    fields = _COLUMNS.split(line.strip(" \t"))
    if len(fields) < 4:
        raise ValueError(f"expected at least 4 fields, got {len(fields)}")
    path, kind, size, used = fields[:4]
    if not size.isdigit() or not used.isdigit():
        raise ValueError(f"non-numeric size {size!r} or used {used!r}")
    return unescape_octal(path), kind, int(size), int(used)


def _is_header(line: str) -> bool:
    return line.startswith("Filename")


def parse_swaps(text: str, source: str = "/proc/swaps") -> list[SwapLine | ScanProblem]:
    """(path, type, size_kib, used_kib) per swap area, in order; a malformed line is a ScanProblem
    in its place, naming the line (it could be swap on any device: it affects everything)."""
    out: list[SwapLine | ScanProblem] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or (lineno == 1 and _is_header(line)):
            continue
        try:
            out.append(_parse_line(line))
        except ValueError as exc:
            out.append(ScanProblem(f"{source} line {lineno}", f"malformed: {exc}: {line[:200]!r}"))
    return out


def _partition_devno(roots: Roots, path: str, block: Mapping[str, BlockDevice]) -> DevNo | None:
    """Device number of a swap partition: its kernel name in /dev, else (live) the node's st_rdev."""
    if not path.startswith("/dev/"):
        return None
    rel = resolve_dev_path(roots.dev, path)
    if rel is not None:
        dev = block.get(os.path.basename(rel))
        if dev is not None:
            return dev.devno
        if roots.live:
            try:
                st = os.stat(roots.dev / rel)
            except OSError:
                return None
            if stat.S_ISBLK(st.st_mode):
                devno = (os.major(st.st_rdev), os.minor(st.st_rdev))
                if devno in devno_index(block):
                    return devno
    # /proc/swaps names the node the kernel opened; its name usually is the kernel name.
    dev = block.get(os.path.basename(path))
    return dev.devno if dev is not None else None


def collect_swaps(
    roots: Roots, mounts: Sequence[Mount], block: Mapping[str, BlockDevice], own_namespace: int = 0
) -> Collected[list[Swap]]:
    """Every swap area; `mounts` of every namespace place swap files (model.mount_holding)."""
    source = roots.proc / "swaps"
    try:
        text = read_text(source)
    except ReadError as exc:
        return Collected([], [ScanProblem(str(source), str(exc))])
    swaps: list[Swap] = []
    problems: list[ScanProblem] = []
    for entry in parse_swaps(text, str(source)):
        if isinstance(entry, ScanProblem):
            problems.append(entry)  # an unreadable entry could be swap on any device: fail closed
            continue
        path, kind, size, used = entry
        devno: DevNo | None
        if kind == "partition":
            devno, unplaced = _partition_devno(roots, path, block), "swap partition matches no block device"
        elif kind == "file":
            mount = mount_holding(path, mounts, own_namespace)
            devno, unplaced = (mount.devno if mount else None), "no mount holds this swap file"
        else:
            devno, unplaced = None, f"unknown swap type {kind!r}"
        if devno is None:
            problems.append(ScanProblem(path, unplaced))
        swaps.append(Swap(path=path, kind=kind, devno=devno, size_kib=size, used_kib=used))
    return Collected(swaps, problems)
