"""/dev paths resolved inside a dev root: the one place collectors follow udev's links.

udev names one node many ways (/dev/mapper/vg-lv -> ../dm-0, /dev/disk/by-uuid/X -> ../../vdb1,
/dev/block/MAJ:MIN -> ../vdb2), and the kernel writes whichever was opened (fd links, /proc/swaps).
The links are followed one component at a time beneath the dev root (the live /dev or a captured
tree's), never leaving it: the text comes from the guest and may point anywhere.
"""

from __future__ import annotations

import stat
from pathlib import Path

from unplugd.agent.sysio import os_lstat, os_readlink

__all__ = ["resolve_dev_path"]

_MAX_LINK_HOPS = 40  # the kernel's own limit for path resolution (MAXSYMLINKS)


def resolve_dev_path(dev_root: Path, live_path: str, *, missing_ok: bool = False) -> str | None:
    """Follow symlinks of a /dev path without leaving dev_root; the resolved path relative to it.

    /dev/mapper/x -> ../dm-0 gives "dm-0". None when the path or a link in it
    points outside /dev (.. above the root, an absolute link elsewhere), loops,
    or names /dev itself. A component that does not exist gives None too, unless
    missing_ok: then it is taken as named (a captured tree holds only the nodes
    it needed, yet an fd link's text still names the node).
    """
    if live_path == "/dev" or not live_path.startswith("/dev/"):
        return None
    todo = [p for p in live_path[len("/dev/") :].split("/") if p][::-1]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop()
        if part == ".":
            continue
        if part == "..":
            if not done:
                return None
            done.pop()
            continue
        here = dev_root.joinpath(*done, part)
        try:
            st = os_lstat(here)
        except OSError:
            if not missing_ok:
                return None
            done.append(part)
            continue
        if not stat.S_ISLNK(st.st_mode):
            done.append(part)
            continue
        hops += 1
        if hops > _MAX_LINK_HOPS:
            return None
        try:
            target = os_readlink(here)
        except OSError:
            return None
        if target.startswith("/"):
            if target != "/dev" and not target.startswith("/dev/"):
                return None
            done = []
            target = target[len("/dev") :]
        todo.extend([p for p in target.split("/") if p][::-1])
    return "/".join(done) if done else None
