"""unplugctl turns any HostError into one line and an exit code (the tree itself: test_exception_trees.py)."""

from __future__ import annotations

import argparse
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from unplugd.host import cli
from unplugd.host.backends.qmp import QmpCommandError
from unplugd.host.client import AgentCallFailed, AgentUnreachable
from unplugd.host.errors import AmbiguousDevice, DeviceNotFound, DomainNotFound, HostError
from unplugd.host.relays import RelayError


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (DomainNotFound("no domain 'dom' on qemu:///system"), 1),
        (QmpCommandError("query-pci", "the device is on fire"), 1),
        (AgentUnreachable("serial:/run/agent.sock", "connection refused"), 1),
        (AgentCallFailed("unix:/a", "GetReport", grpc.StatusCode.INTERNAL, "boom"), 1),
        (RelayError("vsock CID 3 port 7000: no answer"), 1),
        (DeviceNotFound("vdz"), 2),
        (AmbiguousDevice("disk", ["0000:00/02.0/00", "0000:00/02.1/00"]), 2),
        (cli.UsageError("mutual TLS needs --tls-ca, --tls-cert and --tls-key together"), 2),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_any_host_error_is_one_line_and_an_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: HostError, code: int
) -> None:
    @contextlib.asynccontextmanager
    async def broken(args: argparse.Namespace) -> AsyncIterator[cli.Session]:
        raise error
        yield  # pragma: no cover

    monkeypatch.setattr(cli, "open_session", broken)
    assert cli.main(["status", "dom"]) == code
    assert capsys.readouterr().err.splitlines() == [f"unplugctl: {error}"]


def test_a_silent_qmp_socket_says_what_did_not_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A unix socket that accepts and says nothing (another program's): the timeout's own text is
    empty, and the line ended in "QMP socket PATH: " with no reason."""
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)  # accepted by the kernel's backlog, never answered
    try:
        code = cli.main(["status", "--qmp", str(path), "--agent", "unix:/nonexistent", "--hypervisor-timeout", "0.2"])
    finally:
        listener.close()
    assert code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"unplugctl: cannot connect to QMP socket {path}: no QMP greeting within 0.2s (is it QEMU's QMP socket?)"
    ]
