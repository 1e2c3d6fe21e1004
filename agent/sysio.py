"""Small readers for sysfs/procfs that turn OS errors into typed ones, and keep a captured tree closed.

ENOENT/ESRCH -> Vanished (the object went away mid-scan, usually harmless),
EACCES/EPERM -> NotPermitted (the answer is UNKNOWN), anything else -> ReadError.

A captured tree (`inspect --root`, Roots.under) is untrusted input: inside
`beneath(roots)` (engine.scan enters it) every path the collectors open is
resolved by the kernel *beneath the tree's base* (openat2 RESOLVE_IN_ROOT): an
absolute symlink or a `..` past the top lands inside the tree, as if the tree
were the root directory, so no link leads out of it, while the relative links
sysfs is made of keep working. Only regular files are read: each name is
stat'ed before it is opened (through a link: an O_PATH open and fstat), so a
FIFO, a socket or a device node in the tree is never opened, and every read
stops at MAX_READ_BYTES. The os_* functions are the
twins of os.open/readlink/lstat/listdir/scandir that the collectors call for
that reason; outside `beneath` (the live system) they are the os functions.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from unplugd.agent.errors import NotPermitted, ReadError, Vanished
from unplugd.agent.roots import Roots

__all__ = [
    "DENIED_ERRNOS",
    "MAX_READ_BYTES",
    "VANISHED_ERRNOS",
    "StrPath",
    "as_read_error",
    "beneath",
    "listdir",
    "os_exists",
    "os_listdir",
    "os_lstat",
    "os_open_dir",
    "os_open_regular_at",
    "os_read",
    "os_readlink",
    "os_reason",
    "os_scandir",
    "parse_uevent",
    "read_system_file",
    "read_text",
    "read_text_or",
    "readlink",
    "readlink_or",
]

StrPath = str | os.PathLike[str]
_L = TypeVar("_L")

# The errnos that say "the object went away": a process exited (ESRCH, or ENOENT on its /proc
# entries), a directory of it went (ENOTDIR when a name in the path is no longer a directory), a
# device was unplugged or detached (ENODEV reading its sysfs attributes, ENXIO opening its node).
# The one set every reader and the capture test against: what vanished holds nothing any more.
VANISHED_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.ENXIO, errno.ENOTDIR})
DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})

# The largest file a collector reads is a mountinfo: the kernel allows 100,000 mounts per
# namespace (fs.mount-max) at ~150 bytes a line, ~15 MiB. Twice that leaves room for long
# paths; anything larger is not a kernel table, and reading it whole would only cost memory.
MAX_READ_BYTES = 32 << 20

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_O_FILE = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def os_reason(exc: OSError) -> str:
    """What went wrong, in the kernel's words ("Permission denied"), without the path."""
    return exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))


def as_read_error(path: StrPath, exc: OSError) -> ReadError:
    reason = os_reason(exc)
    if exc.errno in VANISHED_ERRNOS:
        return Vanished(str(path), reason)
    if exc.errno in DENIED_ERRNOS:
        return NotPermitted(str(path), reason)
    return ReadError(str(path), reason)


# --------------------------------------------------------------------------- a captured tree, closed


_SYS_OPENAT2 = 437  # the same number on every architecture (the syscall table was unified by then)
_RESOLVE_NO_MAGICLINKS = 0x02  # /proc/PID/fd/N and friends point anywhere: never through them
_RESOLVE_IN_ROOT = 0x10  # "/" and ".." stop at the dirfd, absolute links start there
# openat2 answers EAGAIN when a rename anywhere on the system raced a ".." it resolved (it cannot
# prove the walk stayed inside); the man page says to retry. Renames are rare, a few tries suffice.
_EAGAIN_TRIES = 8
# Directories of a tree kept open between reads: the collectors read a handful of attributes in one
# directory, then move on, so a few dozen cover the working set (and stay far below the fd limit).
_DIRS_KEPT = 64


# ctypes is imported by the first open in a captured tree, not at import: the live system never
# needs it, and its import is ~2-4 ms of `unplugd inspect`'s start-up.
@functools.cache
def _syscall() -> tuple[Any, Any]:
    """libc's syscall() and ctypes.get_errno."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall, ctypes.get_errno


@functools.cache
def _open_how() -> Any:
    """struct open_how, as ctypes declares it."""
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]

    return OpenHow


@functools.cache
def _how(flags: int) -> tuple[Any, int]:
    """open_how for flags, built once: the struct and its size as openat2 takes them."""
    import ctypes

    how = _open_how()(flags, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    return ctypes.byref(how), ctypes.sizeof(how)


def _openat2(dirfd: int, path: str, flags: int) -> int:
    how, size = _how(flags)
    raw = path.encode("utf-8", "surrogateescape")
    syscall, get_errno = _syscall()
    err = errno.EAGAIN
    for _ in range(_EAGAIN_TRIES):
        fd: int = syscall(_SYS_OPENAT2, dirfd, raw, how, size)
        if fd >= 0:
            return fd
        err = get_errno()
        if err != errno.EAGAIN:
            break
    if err in (errno.ENOSYS, errno.E2BIG):  # Linux < 5.6, or a seccomp filter that hides it
        raise OSError(errno.ENOSYS, "this kernel cannot open files beneath a directory (openat2)", path)
    raise OSError(err, os.strerror(err), path)


class _Tree:
    """The base of a captured tree, held open; paths below it are opened beneath it."""

    def __init__(self, base: Path) -> None:
        self.base = str(base).rstrip("/") or "/"  # as Roots joins its paths, so a prefix test suffices
        self.prefix = self.base.rstrip("/") + "/"
        # directory (relative, "" for the base) -> fd, oldest first: O_RDONLY|O_DIRECTORY, so one open
        # serves both to list the directory and as the dir_fd of what is in it (O_PATH only where it
        # may be searched but not read)
        self.dirs: dict[str, int] = {}
        try:
            self.fd = os.open(self.base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            self.fd, self.error = -1, exc  # every read fails with it: the collectors report what they lack

    def rel(self, path: StrPath) -> str:
        p = os.fspath(path)
        if p.startswith(self.prefix):
            return p[len(self.prefix) :]
        if p == self.base:
            return "."
        # the same place spelled otherwise (a collector normalised "a/../tree/x" or made it absolute)
        absolute, base = os.path.abspath(p), os.path.abspath(self.base)
        if absolute == base:
            return "."
        if absolute.startswith(base.rstrip("/") + "/"):
            return absolute[len(base.rstrip("/")) + 1 :]
        raise OSError(errno.EXDEV, "outside the captured tree", p)

    def open(self, path: StrPath, flags: int) -> int:
        return _openat2(self._dirfd(), self.rel(path), flags)

    def _dirfd(self) -> int:
        if self.fd < 0:
            raise OSError(self.error.errno, self.error.strerror, self.base)
        return self.fd

    def parent(self, path: StrPath) -> tuple[int, str]:
        """The directory holding path, opened beneath the base and kept for the next call there,
        and path's last component (a plain name: what dir_fd calls may use without leaving it)."""
        rel = self.rel(path)
        head, _, name = rel.rpartition("/")
        if name in ("", ".", ".."):
            raise OSError(errno.EINVAL, "not a name in a directory", os.fspath(path))
        fd = self.dirs.get(head)
        return (self._keep(head) if fd is None else fd), name

    def dir(self, rel: str) -> int:
        """The directory rel ("" for the base), kept open for the next call there (do not close it)."""
        fd = self.dirs.get(rel)
        return self._keep(rel) if fd is None else fd

    def _keep(self, rel: str) -> int:
        fd = self.dirs[rel] = self._open_dir(rel)
        if len(self.dirs) > _DIRS_KEPT:
            os.close(self.dirs.pop(next(iter(self.dirs))))  # the oldest
        return fd

    def _open_dir(self, rel: str) -> int:
        # By name in its parent when that is open (a walk goes down one level at a time), never
        # through a link there; else, or when the name is a link, resolved beneath the base.
        head, _, name = rel.rpartition("/")
        above = self.dirs.get(head) if name not in ("", ".", "..") else None
        if above is not None:
            try:
                return os.open(name, _O_DIR | os.O_NOFOLLOW, dir_fd=above)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EACCES):
                    raise
        try:
            return _openat2(self._dirfd(), rel or ".", _O_DIR)
        except OSError as exc:
            if exc.errno != errno.EACCES:
                raise
        # Searchable, not readable: its files can still be opened (listing it says EACCES).
        return _openat2(self._dirfd(), rel or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()
        if self.fd >= 0:
            os.close(self.fd)


_TREE: ContextVar[_Tree | None] = ContextVar("unplugd_sysio_tree", default=None)


@contextlib.contextmanager
def beneath(roots: Roots) -> Iterator[None]:
    """Inside this block every reader of this module stays beneath a captured tree's base.

    The live system is read as it is (its links are the kernel's own).
    """
    if roots.live:
        yield
        return
    tree = _Tree(roots.base)
    token = _TREE.set(tree)
    try:
        yield
    finally:
        _TREE.reset(token)
        tree.close()


def _open_file(path: StrPath) -> int:
    tree = _TREE.get()
    if tree is None:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    # What the name is, asked without opening it: a FIFO is not waited on, a device never opened.
    dfd, name = tree.parent(path)
    mode = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
    if stat.S_ISLNK(mode):
        # Through the link, resolved beneath the base; O_PATH first for the same reasons.
        probe = tree.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            mode = os.fstat(probe).st_mode
        finally:
            os.close(probe)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        return tree.open(path, _O_FILE)
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    # The same name again: a tree is a snapshot nobody rewrites under us (O_NOFOLLOW all the same).
    return os.open(name, _O_FILE | os.O_NOFOLLOW, dir_fd=dfd)


def _list_dir(tree: _Tree, path: StrPath, listing: Callable[[int], _L]) -> _L:
    """listing(fd) of a directory of the tree, kept open (tree.dir) for what is read in it next.

    os.listdir/scandir of an fd list a dup of it and rewind it, so the kept fd is left as it was.
    """
    rel = tree.rel(path)
    try:
        return listing(tree.dir("" if rel == "." else rel))
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
    # kept O_PATH (searchable, not readable): open it to list it, for the kernel's answer (EACCES)
    fd = tree.open(path, _O_DIR)
    try:
        return listing(fd)
    finally:
        os.close(fd)


def os_open_dir(path: StrPath) -> int:
    """os.open(path, O_DIRECTORY): beneath the tree inside `beneath`, in one openat2 (its parent is
    not kept: this is for /proc/PID/fd, one directory per process)."""
    tree = _TREE.get()
    return os.open(path, _O_DIR) if tree is None else tree.open(path, _O_DIR)


def os_open_regular_at(dir_fd: int, name: str) -> int:
    """A regular file in an open directory, never through a link; OSError(EINVAL) for anything
    else, found by its name before any open (a FIFO is not waited on, a device never opened)."""
    if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", name)
    return os.open(name, _O_FILE | os.O_NOFOLLOW, dir_fd=dir_fd)


def os_readlink(path: StrPath) -> str:
    tree = _TREE.get()
    if tree is None:
        return os.readlink(path)
    dfd, name = tree.parent(path)
    return os.readlink(name, dir_fd=dfd)


def os_lstat(path: StrPath) -> os.stat_result:
    tree = _TREE.get()
    if tree is None:
        return os.lstat(path)
    dfd, name = tree.parent(path)
    return os.stat(name, dir_fd=dfd, follow_symlinks=False)


def os_exists(path: StrPath) -> bool:
    """os.path.exists: the path resolves (following links, beneath the tree inside `beneath`)."""
    tree = _TREE.get()
    if tree is None:
        return os.path.exists(path)
    try:
        os.close(tree.open(path, os.O_PATH | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def os_listdir(path: StrPath) -> list[str]:
    tree = _TREE.get()
    if tree is None:
        return os.listdir(path)
    return _list_dir(tree, path, os.listdir)


def os_scandir(path: StrPath) -> list[os.DirEntry[str]]:
    """os.scandir's entries as a list (entries of a tree's directory: stat them with follow_symlinks=False)."""
    tree = _TREE.get()
    if tree is None:
        with os.scandir(path) as it:
            return list(it)
    return _list_dir(tree, path, _scandir_list)


def _scandir_list(fd: int) -> list[os.DirEntry[str]]:
    with os.scandir(fd) as it:
        return list(it)


# --------------------------------------------------------------------------- readers


def _read_fd(fd: int) -> bytes:
    """Up to MAX_READ_BYTES from fd (closed here): one read for a sysfs attribute (at most a page),
    far cheaper than open() + read() over thousands of files. OSError(EFBIG) past the cap."""
    try:
        chunks = [os.read(fd, 8192)]
        if len(chunks[0]) == 8192:
            size = len(chunks[0])
            while chunk := os.read(fd, 65536):
                size += len(chunk)
                if size > MAX_READ_BYTES:
                    raise OSError(errno.EFBIG, f"larger than {MAX_READ_BYTES} bytes: not a kernel table")
                chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def os_read(path: StrPath) -> bytes:
    """A whole file, at most MAX_READ_BYTES; beneath the tree and regular files only inside `beneath`."""
    return _read_fd(_open_file(path))


def read_text(path: StrPath) -> str:
    """A file's text (surrogateescape for bytes that are not UTF-8), at most MAX_READ_BYTES."""
    try:
        return os_read(path).decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise as_read_error(path, exc) from exc


def read_system_file(path: StrPath) -> str:
    """A file of the machine the agent runs on (pci.ids), even while reading a captured tree."""
    try:
        return _read_fd(os.open(path, os.O_RDONLY | os.O_CLOEXEC)).decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise as_read_error(path, exc) from exc


def read_text_or(path: StrPath, default: str | None = None) -> str | None:
    """The stripped content, or default when the file is absent."""
    try:
        return read_text(path).strip()
    except Vanished:
        return default


def readlink(path: StrPath) -> str:
    try:
        return os_readlink(path)
    except OSError as exc:
        raise as_read_error(path, exc) from exc


def readlink_or(path: StrPath, default: str | None = None, *, when: type[ReadError] = Vanished) -> str | None:
    """The link text, or default when the link is absent (when=Vanished) or cannot be read at all
    (when=ReadError: also not a link, denied; for links that are evidence among others)."""
    try:
        return readlink(path)
    except when:
        return default


def listdir(path: StrPath) -> list[str]:
    """Sorted entries; a directory that does not exist is empty."""
    try:
        return sorted(os_listdir(path))
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
