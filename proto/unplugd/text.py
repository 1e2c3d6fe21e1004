"""Guest text: how it travels (valid UTF-8 on the wire) and how it is shown (escaped on a terminal).

Every string the agent reads from /proc, /sys and netlink is arbitrary bytes a
guest user chose: a mount point, a process name, an interface name, a loop
backing file. Inside the agent they are `str` decoded with surrogateescape
(Python's own convention for file names, what os.readlink and os.fsdecode
return), so the same bytes compare equal wherever they were read: a loop's
backing file still matches a mount point, byte for byte.

Two encodings leave the agent, both with the kernel's own escape, a backslash
and three octal digits (`\\ooo`, as in /proc/self/mountinfo):

- wire_text(): protobuf `string` fields must be valid UTF-8 (the runtime
  raises on serialize otherwise). Each byte that is not part of valid UTF-8
  becomes \\ooo, and a backslash becomes \\134 so that the encoding stays
  reversible: unescape_octal(wire_text(s)) == s. Everything else, control
  characters included, is carried as is: the wire is data, not a terminal.
- display_text(): what a terminal receives. Every character that
  str.isprintable() rejects (C0 and C1 controls, DEL, line and paragraph
  separators, bidi overrides and other format characters such as U+202E,
  lone surrogates, unassigned code points) becomes \\ooo of its UTF-8 bytes,
  so no guest text can start a line, move the cursor or colour the terminal.
  A newline shows as \\012, ESC as \\033, U+202E as \\342\\200\\256.

Guest and host import this module and nothing of each other.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False  # not typing's: `unplugctl --help` imports no typing (tests/unit/test_startup_imports.py)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import TextIO

__all__ = ["display_text", "paint", "unescape_octal", "wants_colour", "wire_text"]

_SURROGATE_ESCAPED = range(0xDC80, 0xDD00)  # what surrogateescape decodes a stray byte 0x80-0xFF to
_WIRE_UNSAFE = re.compile("[\\\\\ud800-\udfff]")
_OCTAL = re.compile(rb"\\([0-7]{3})")


def _octal(ch: str) -> str:
    """A character as the \\ooo escapes of its bytes (the byte itself for a surrogateescape)."""
    code = ord(ch)
    if code in _SURROGATE_ESCAPED:
        return f"\\{code - 0xDC00:03o}"
    # surrogatepass: a lone surrogate that did not come from surrogateescape (JSON "\ud800") still
    # has a byte form; every other character is plain UTF-8.
    return "".join(f"\\{b:03o}" for b in ch.encode("utf-8", "surrogatepass"))


def wire_text(text: str) -> str:
    """Valid UTF-8 for a protobuf string field: undecodable bytes and backslashes as \\ooo."""
    if text.isascii():  # O(1) in CPython: the fast path for almost every kernel name
        return text.replace("\\", "\\134") if "\\" in text else text
    return _WIRE_UNSAFE.sub(lambda m: _octal(m.group()), text)


def wants_colour(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set to anything (no-color.org)."""
    return not environ.get("NO_COLOR") and stream.isatty()


def paint(sgr: str, text: str, colour: bool) -> str:
    """`text` in the SGR colour `sgr` ("31": red) when `colour`; escape guest text before, never after."""
    return f"\033[{sgr}m{text}\033[0m" if colour else text


def display_text(text: str) -> str:
    """Text safe to write to a terminal: every non-printable character as \\ooo."""
    if text.isprintable():  # C speed; true for nearly every string
        return text
    return "".join(ch if ch.isprintable() else _octal(ch) for ch in text)


def unescape_octal(text: str) -> str:
    """Undo \\ooo escaping (the kernel's in mountinfo and /proc/swaps; wire_text's).

    Bytes that are not UTF-8 come back as surrogateescapes. Raises ValueError on a
    backslash that does not start a three-digit octal escape: the kernel, like
    wire_text, always escapes a literal backslash as \\134.
    """
    if "\\" not in text:
        return text
    raw = text.encode("utf-8", "surrogateescape")
    if raw.count(b"\\") != len(_OCTAL.findall(raw)):
        raise ValueError(f"bad escape in {text!r}")
    out = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), raw)
    return out.decode("utf-8", "surrogateescape")
