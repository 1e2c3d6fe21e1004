"""Logs journald keeps structured, and sd_notify written by hand."""

from __future__ import annotations

import io
import logging
import socket
import struct
from pathlib import Path

import pytest

from unplugd.agent.daemon.logs import JournalSocketHandler, LogfmtFormatter, sd_notify, setup_logging


def _record(msg: str, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("unplugd.agent.mutations.leases", level, __file__, 12, msg, (), None)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_logfmt_quotes_and_extra_fields() -> None:
    line = LogfmtFormatter(with_time=False).format(
        _record("lease prepared", lease="ab12", functions="0000:00:06.0,0000:00:07.0", note='say "hi"\nthere')
    )
    assert line == (
        'level=info logger=unplugd.agent.mutations.leases msg="lease prepared" lease=ab12 '
        'functions=0000:00:06.0,0000:00:07.0 note="say \\"hi\\"\\012there"'
    )


def test_logfmt_priority_prefix_for_journald_stderr() -> None:
    fmt = LogfmtFormatter(with_time=False, priority_prefix=True)
    assert fmt.format(_record("x", logging.ERROR)).startswith("<3>level=error")
    assert fmt.format(_record("x", logging.WARNING)).startswith("<4>")
    assert fmt.format(_record("x", logging.DEBUG)).startswith("<7>")


def test_journal_native_encoding() -> None:
    data = JournalSocketHandler.encode([("MESSAGE", "one line"), ("EXCEPTION", "two\nlines")])
    assert data.startswith(b"MESSAGE=one line\nEXCEPTION\n")
    assert data[len(b"MESSAGE=one line\nEXCEPTION\n") :][:8] == struct.pack("<Q", 9)
    assert data.endswith(b"two\nlines\n")
    assert JournalSocketHandler.field_name("lease") == "LEASE"
    assert JournalSocketHandler.field_name("mount-point") == "MOUNT_POINT"
    assert JournalSocketHandler.field_name("_secret") == "SECRET"
    assert JournalSocketHandler.field_name("9x") == "F_9X"


def test_journal_handler_sends_fields_to_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "journal.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
        journal.bind(str(path))
        journal.settimeout(5)
        handler = JournalSocketHandler(path)
        handler.emit(_record("bad configuration", logging.INFO, error="server.max_workers: must be <= 256"))
        handler.close()
        datagram = journal.recv(65536)
    fields = dict(line.split("=", 1) for line in datagram.decode().splitlines())
    # journalctl shows MESSAGE alone by default: the fields are in it too, so the reason is seen
    assert fields["MESSAGE"] == 'bad configuration error="server.max_workers: must be <= 256"'
    assert fields["PRIORITY"] == "6"
    assert fields["ERROR"] == "server.max_workers: must be <= 256"
    assert fields["SYSLOG_IDENTIFIER"] == "unplugd"


def test_setup_logging_text_and_bad_format() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        assert setup_logging("text", stream=stream) == "text"
        logging.getLogger("unplugd.test").info("hello", extra={"k": "v"})
        assert "msg=hello k=v" in stream.getvalue()
        with pytest.raises(ValueError, match="log format"):
            setup_logging("xml")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify(tmp_path: Path, abstract: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        if abstract:
            name = f"unplugd-test-{id(tmp_path)}"
            systemd.bind("\0" + name)
            env = {"NOTIFY_SOCKET": "@" + name}
        else:
            systemd.bind(str(tmp_path / "notify"))
            env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
        systemd.settimeout(5)
        assert sd_notify("READY=1", environ=env)
        assert systemd.recv(100) == b"READY=1"
    assert not sd_notify("READY=1", environ={})
    assert not sd_notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "nobody")})


def test_logfmt_escapes_guest_text() -> None:
    """A mount path with a newline and an ANSI escape cannot forge a line or colour a terminal."""
    line = LogfmtFormatter(with_time=False).format(_record("scan problem", logging.WARNING, path="/mnt/a\n\x1b[31mb"))
    assert "\n" not in line and "\x1b" not in line
    assert 'path="/mnt/a\\012\\033[31mb"' in line
