"""Small readers for sysfs/procfs that turn OS errors into typed ones.

ENOENT/ESRCH -> Vanished (the object went away mid-scan, usually harmless),
EACCES/EPERM -> NotPermitted (the answer is UNKNOWN), anything else -> ReadError.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from unplugd.agent.errors import NotPermitted, ReadError, Vanished

__all__ = ["as_read_error", "listdir", "read_text", "read_text_or", "readlink", "readlink_or"]

_VANISHED = {errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.ENXIO, errno.ENOTDIR}
_DENIED = {errno.EACCES, errno.EPERM}


def as_read_error(path: Path | str, exc: OSError) -> ReadError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno in _VANISHED:
        return Vanished(str(path), reason)
    if exc.errno in _DENIED:
        return NotPermitted(str(path), reason)
    return ReadError(str(path), reason)


def read_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError as exc:
        raise as_read_error(path, exc) from exc


def read_text_or(path: Path, default: str | None = None) -> str | None:
    """The stripped content, or default when the file is absent."""
    try:
        return read_text(path).strip()
    except Vanished:
        return default


def readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError as exc:
        raise as_read_error(path, exc) from exc


def readlink_or(path: Path, default: str | None = None) -> str | None:
    try:
        return readlink(path)
    except Vanished:
        return default


def listdir(path: Path) -> list[str]:
    """Sorted entries; a directory that does not exist is empty."""
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise as_read_error(path, exc) from exc
