"""Logs journald keeps structured, and sd_notify, without libsystemd.

`journal`: python-systemd's JournalHandler when installed; else the native
journal protocol written by hand to /run/systemd/journal/socket (one datagram
of FIELD=value lines per record, so `extra={...}` keys become journal fields:
`journalctl -u unplugd LEASE=...`); else `<priority>key=value` lines on stderr,
which journald reads from a service's stderr with their priority.
`text`: `key=value` (logfmt) lines on stderr.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from unplugd.text import display_text

__all__ = ["JOURNAL_SOCKET", "JournalSocketHandler", "LogfmtFormatter", "sd_notify", "setup_logging"]

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def _syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def record_fields(record: logging.LogRecord) -> Iterator[tuple[str, str]]:
    """The `extra={...}` fields of a record, in the order given."""
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            yield key, str(value)


def _quote(value: str) -> str:
    """A logfmt value; guest text (paths, names) may carry any byte: printed escaped (display_text),
    so no log line can be forged or colour a terminal that tails the journal."""
    if value and not any(c in value for c in ' "=\\') and value.isprintable():
        return value
    escaped = display_text(value.replace("\\", "\\\\").replace('"', '\\"'))
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    def __init__(self, *, with_time: bool = True, priority_prefix: bool = False) -> None:
        super().__init__()
        self._with_time = with_time
        self._prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self._with_time:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            parts.append(f"time={stamp}.{int(record.msecs):03d}")
        parts += [f"level={record.levelname.lower()}", f"logger={record.name}", f"msg={_quote(record.getMessage())}"]
        parts += [f"{k}={_quote(v)}" for k, v in record_fields(record)]
        if record.exc_info:
            parts.append(f"exception={_quote(self.formatException(record.exc_info))}")
        line = " ".join(parts)
        return f"<{_syslog_priority(record.levelno)}>{line}" if self._prefix else line


def message_with_fields(record: logging.LogRecord) -> str:
    """The message followed by its fields in logfmt: what `journalctl -u unplugd` shows by default
    (the fields are journal fields too, but its default output prints MESSAGE alone)."""
    return " ".join([record.getMessage(), *(f"{k}={_quote(v)}" for k, v in record_fields(record))])


class _WithFields(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = message_with_fields(record)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JournalSocketHandler(logging.Handler):
    """journald's native protocol: FIELD=value lines, binary-safe form for multi-line values."""

    def __init__(self, path: Path = JOURNAL_SOCKET, identifier: str = "unplugd") -> None:
        super().__init__()
        self._path = str(path)
        self._identifier = identifier
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @staticmethod
    def encode(fields: list[tuple[str, str]]) -> bytes:
        out = bytearray()
        for key, value in fields:
            data = str(value).encode("utf-8", "replace")
            if b"\n" in data:
                out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
            else:
                out += key.encode() + b"=" + data + b"\n"
        return bytes(out)

    @staticmethod
    def field_name(key: str) -> str:
        name = "".join(c if c.isalnum() else "_" for c in key.upper()).lstrip("_")
        return name if name and not name[0].isdigit() else f"F_{name}"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = message_with_fields(record)
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            fields = [
                ("MESSAGE", message),
                ("PRIORITY", str(_syslog_priority(record.levelno))),
                ("SYSLOG_IDENTIFIER", self._identifier),
                ("LOGGER", record.name),
                ("CODE_FILE", record.pathname),
                ("CODE_LINE", str(record.lineno)),
                ("CODE_FUNC", record.funcName or ""),
            ]
            fields += [(self.field_name(k), v) for k, v in record_fields(record)]
            self._sock.sendto(self.encode(fields), self._path)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._sock.close()
        super().close()


def setup_logging(fmt: str | None, *, level: int = logging.INFO, stream: TextIO | None = None) -> str:
    """Configure the root logger for `serve`; returns the form chosen.

    fmt None: journal when started by systemd (JOURNAL_STREAM is set), else text.
    """
    stream = stream if stream is not None else sys.stderr
    if fmt is None:
        fmt = "journal" if os.environ.get("JOURNAL_STREAM") else "text"
    handler: logging.Handler
    chosen = fmt
    if fmt == "journal":
        try:
            from systemd.journal import JournalHandler  # type: ignore[import-not-found]

            handler = JournalHandler(SYSLOG_IDENTIFIER="unplugd")
            handler.setFormatter(_WithFields())
            chosen = "journal (python-systemd)"
        except ImportError:
            if JOURNAL_SOCKET.exists():
                handler = JournalSocketHandler()
                chosen = "journal (native socket)"
            else:
                handler = logging.StreamHandler(stream)
                handler.setFormatter(LogfmtFormatter(with_time=False, priority_prefix=True))
                chosen = "journal (stderr with priorities)"
    elif fmt == "text":
        handler = logging.StreamHandler(stream)
        handler.setFormatter(LogfmtFormatter())
    else:
        raise ValueError(f"unknown log format {fmt!r} (journal or text)")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return chosen


def sd_notify(state: str, *, environ: dict[str, str] | None = None) -> bool:
    """Tell systemd (Type=notify) our state; False when not started that way."""
    env = os.environ if environ is None else environ
    target = env.get("NOTIFY_SOCKET", "")
    if not target:
        return False
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        logging.getLogger(__name__).warning("sd_notify failed", extra={"error": str(exc)})
        return False
    return True
