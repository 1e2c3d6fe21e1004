"""Small readers for sysfs/procfs that turn OS errors into typed ones.

ENOENT/ESRCH -> Vanished (the object went away mid-scan, usually harmless),
EACCES/EPERM -> NotPermitted (the answer is UNKNOWN), anything else -> ReadError.
"""

from __future__ import annotations

import errno
import os

from unplugd.agent.errors import NotPermitted, ReadError, Vanished

__all__ = [
    "StrPath",
    "as_read_error",
    "listdir",
    "parse_uevent",
    "read_text",
    "read_text_or",
    "readlink",
    "readlink_or",
]

StrPath = str | os.PathLike[str]

_VANISHED = {errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.ENXIO, errno.ENOTDIR}
_DENIED = {errno.EACCES, errno.EPERM}


def as_read_error(path: StrPath, exc: OSError) -> ReadError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno in _VANISHED:
        return Vanished(str(path), reason)
    if exc.errno in _DENIED:
        return NotPermitted(str(path), reason)
    return ReadError(str(path), reason)


def read_text(path: StrPath) -> str:
    """A file's text with one read for sysfs attributes (they are at most a page): far cheaper
    than open() + read() over thousands of files. Longer files are read whole."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise as_read_error(path, exc) from exc
    try:
        chunks = [os.read(fd, 8192)]
        if len(chunks[0]) == 8192:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
    except OSError as exc:
        raise as_read_error(path, exc) from exc
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogateescape")


def read_text_or(path: StrPath, default: str | None = None) -> str | None:
    """The stripped content, or default when the file is absent."""
    try:
        return read_text(path).strip()
    except Vanished:
        return default


def readlink(path: StrPath) -> str:
    try:
        return os.readlink(path)
    except OSError as exc:
        raise as_read_error(path, exc) from exc


def readlink_or(path: StrPath, default: str | None = None) -> str | None:
    try:
        return readlink(path)
    except Vanished:
        return default


def listdir(path: StrPath) -> list[str]:
    """Sorted entries; a directory that does not exist is empty."""
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise as_read_error(path, exc) from exc


def parse_uevent(text: str) -> dict[str, str]:
    """A sysfs `uevent` file (KEY=value lines) as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out
