"""Roots: the only place that knows where sysfs, procfs and /dev live.

Every collector reads through a Roots, so the same code inspects the live
system (Roots.live_system()) or a captured tree (Roots.under(DIR), with DIR/sys,
DIR/proc, DIR/dev and DIR/netlink.json as written by `unplugd capture`).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

__all__ = ["CAPTURE_MARKS", "Roots", "is_capture"]

# What marks a capture: `unplugd capture` always writes sys/ and proc/, as do the hand-built and
# generated trees in tests/. A directory with neither (a home directory, a typo) is not one, and
# inspecting it would print an empty report that looks fine. One is enough: a capture cut short
# still says what it could not read.
CAPTURE_MARKS = ("sys", "proc")


class Roots(NamedTuple):
    sys: Path
    proc: Path
    dev: Path
    # A captured tree has no kernel behind it: no O_EXCL probe, no netlink
    # socket; network state comes from netlink.json instead.
    live: bool
    base: Path

    @classmethod
    def live_system(cls) -> Roots:
        return cls(sys=Path("/sys"), proc=Path("/proc"), dev=Path("/dev"), live=True, base=Path("/"))

    @classmethod
    def under(cls, base: Path | str) -> Roots:
        b = Path(base)
        return cls(sys=b / "sys", proc=b / "proc", dev=b / "dev", live=False, base=b)

    @property
    def netlink_snapshot(self) -> Path:
        """Where a captured tree keeps links, addresses and routes (JSON)."""
        return self.base / "netlink.json"


def is_capture(base: Path | str) -> bool:
    """base holds one of CAPTURE_MARKS as a real directory (not a symlink to one)."""
    b = Path(base)
    return any((b / m).is_dir() and not (b / m).is_symlink() for m in CAPTURE_MARKS)
