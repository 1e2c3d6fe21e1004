"""A reviewable text archive of a directory tree (files, directories, symlinks).

Captured and hand-built /sys, /proc and /dev trees live in the repository in
this form, so a change to a fixture reads as a diff. Example:

    # treetext 1
    dir sys/block/vda/holders
    file sys/block/vda/dev
    |254:0
    file proc/1/comm noeol
    |init
    link sys/class/block/vda -> ../../devices/pci0000:00/0000:00:02.0/virtio1/block/vda

* one record per entry, sorted by path; a directory is listed only when it is
  empty (the others are implied by what they contain);
* `file PATH [noeol]`: its content follows, one `|`-prefixed line per line of
  the file; `noeol` when the last line has no newline;
* `link PATH -> TARGET`: the link text, kept as it is (never followed);
* in paths and targets, backslash, space, control characters and bytes that
  are not UTF-8 are written `\\xNN`; in content lines backslash is `\\\\`,
  NUL is `\\0` and the others `\\xNN` (tab stays a tab).

pack(unpack(text)) == text for what pack writes, and unpack refuses any entry
that would land outside the target directory (absolute paths, `..`, or a
path through a symlink).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from unplugd.agent.errors import AgentError

__all__ = [
    "HEADER",
    "MAX_ARCHIVE_BYTES",
    "Entry",
    "TreeTextError",
    "pack",
    "pack_entries",
    "parse",
    "read_archive",
    "unpack",
]

HEADER = "# treetext 1"
# The generated 256-function guest with 2,000 processes x 20 fds (tests/bench/gen_tree.py) packs
# to 2.3 MiB, this machine's capture to 27 KiB. An archive is held three times while unpacked
# (text, entries, files), so 64 MiB keeps a hostile one well under a GiB of memory.
MAX_ARCHIVE_BYTES = 64 << 20
_HEX = "0123456789abcdefABCDEF"


class TreeTextError(AgentError):
    """The archive is malformed or would write outside its directory."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"treetext line {line}: {message}" if line else f"treetext: {message}")
        self.line = line


@dataclass(frozen=True)
class Entry:
    path: str  # relative, "/"-separated, already unescaped (surrogateescape for non-UTF-8)
    kind: str  # "file" | "dir" | "link"
    content: bytes = b""  # files
    target: str = ""  # links


# --------------------------------------------------------------------------- escaping


def _escape_name(name: str) -> str:
    out: list[str] = []
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in {"\\", " "} or code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def _escape_line(line: str) -> str:
    out: list[str] = []
    for ch in line:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\0":
            out.append("\\0")
        elif (code < 0x20 and ch != "\t") or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def _unescape(text: str, lineno: int, *, content: bool) -> bytes:
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode("utf-8", "surrogateescape")
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if content and nxt == "\\":
            out.append(0x5C)
            i += 2
        elif content and nxt == "0":
            out.append(0)
            i += 2
        elif nxt == "x" and len(text) >= i + 4 and text[i + 2] in _HEX and text[i + 3] in _HEX:
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            raise TreeTextError(lineno, f"bad escape {text[i : i + 4]!r}")
    return bytes(out)


def _check_path(path: str, lineno: int) -> str:
    """A relative path that stays inside the tree, or TreeTextError."""
    if not path or path.startswith("/"):
        raise TreeTextError(lineno, f"path must be relative: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise TreeTextError(lineno, f"path escapes or is not normal: {path!r}")
    if "\0" in path:
        raise TreeTextError(lineno, "NUL in path")
    return path


def _name(text: str, lineno: int) -> str:
    return _unescape(text, lineno, content=False).decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- text <-> entries


def parse(text: str) -> list[Entry]:
    """The entries of an archive; TreeTextError on anything malformed or unsafe."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    entries: list[Entry] = []
    seen: set[str] = set()
    i = 0
    while i < len(lines):
        lineno = i + 1
        line = lines[i]
        i += 1
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "file":
            fields = rest.split(" ")
            if len(fields) not in (1, 2) or (len(fields) == 2 and fields[1] != "noeol"):
                raise TreeTextError(lineno, f"expected 'file PATH [noeol]': {line!r}")
            path = _check_path(_name(fields[0], lineno), lineno)
            body: list[bytes] = []
            while i < len(lines) and lines[i].startswith("|"):
                body.append(_unescape(lines[i][1:], i + 1, content=True))
                i += 1
            noeol = len(fields) == 2
            if noeol and not body:
                raise TreeTextError(lineno, "noeol on a file without content")
            content = b"\n".join(body) + (b"" if noeol or not body else b"\n")
            entry = Entry(path, "file", content=content)
        elif word == "dir":
            entry = Entry(_check_path(_name(rest, lineno), lineno), "dir")
        elif word == "link":
            src, sep, dst = rest.partition(" -> ")
            if not sep or not dst or " " in src or " " in dst:
                raise TreeTextError(lineno, f"expected 'link PATH -> TARGET': {line!r}")
            target = _name(dst, lineno)
            if "\0" in target:
                raise TreeTextError(lineno, "NUL in link target")
            entry = Entry(_check_path(_name(src, lineno), lineno), "link", target=target)
        elif line.startswith("|"):
            raise TreeTextError(lineno, "content line outside a file")
        else:
            raise TreeTextError(lineno, f"unknown record {word!r}")
        if entry.path in seen:
            raise TreeTextError(lineno, f"duplicate entry {entry.path!r}")
        seen.add(entry.path)
        entries.append(entry)
    return entries


def pack_entries(entries: list[Entry]) -> str:
    """The canonical text of a list of entries (sorted, implied directories left out)."""
    ancestors: set[str] = set()
    for e in entries:
        parts = e.path.split("/")
        ancestors.update("/".join(parts[:i]) for i in range(1, len(parts)))
    out = [HEADER]
    for e in sorted(entries, key=lambda e: e.path.split("/")):
        name = _escape_name(e.path)
        if e.kind == "dir":
            if e.path not in ancestors:
                out.append(f"dir {name}")
        elif e.kind == "link":
            out.append(f"link {name} -> {_escape_name(e.target)}")
        else:
            text = e.content.decode("utf-8", "surrogateescape")
            noeol = bool(text) and not text.endswith("\n")
            body = text.split("\n")
            if not noeol:
                body.pop()  # the empty string after the final newline
            out.append(f"file {name}" + (" noeol" if noeol else ""))
            out.extend("|" + _escape_line(line) for line in body)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- tree <-> entries


def _walk(root: Path, rel: str = "") -> Iterator[Entry]:
    here = root / rel if rel else root
    with os.scandir(here) as it:
        children = sorted(it, key=lambda d: d.name)
    for d in children:
        path = f"{rel}/{d.name}" if rel else d.name
        st = d.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            yield Entry(path, "link", target=os.readlink(d.path))
        elif stat.S_ISDIR(st.st_mode):
            yield Entry(path, "dir")
            yield from _walk(root, path)
        elif stat.S_ISREG(st.st_mode):
            with open(d.path, "rb") as f:
                yield Entry(path, "file", content=f.read())
        else:
            raise TreeTextError(0, f"{d.path}: only files, directories and symlinks can be packed")


def pack(root: Path | str) -> str:
    """The archive of everything under root (root itself not included)."""
    return pack_entries(list(_walk(Path(root))))


def _ensure_inside(base: Path, path: str) -> Path:
    """base/path with every parent a real directory (created), never a symlink."""
    cur = base
    for part in path.split("/")[:-1]:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise TreeTextError(0, f"{path!r} goes through {cur.relative_to(base)!s}, which is not a directory")
    return base / path


def read_archive(path: Path | str) -> str:
    """An archive's text: a regular file (a FIFO is not waited on) of at most MAX_ARCHIVE_BYTES."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TreeTextError(0, f"{path}: not a regular file")
        data = f.read(MAX_ARCHIVE_BYTES + 1)
    if len(data) > MAX_ARCHIVE_BYTES:
        raise TreeTextError(0, f"{path}: larger than {MAX_ARCHIVE_BYTES} bytes")
    return data.decode("utf-8", "surrogateescape")


def unpack(text: str, dest: Path | str) -> list[Entry]:
    """Write the archive's entries under dest (created if needed); returns them."""
    entries = parse(text)
    base = Path(dest)
    base.mkdir(parents=True, exist_ok=True)
    for e in entries:
        target = _ensure_inside(base, e.path)
        if os.path.lexists(target):
            if e.kind == "dir" and target.is_dir() and not target.is_symlink():
                continue
            raise TreeTextError(0, f"{e.path!r} already exists")
        if e.kind == "dir":
            os.mkdir(target)
        elif e.kind == "link":
            os.symlink(e.target, target)
        else:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(e.content)
    return entries
