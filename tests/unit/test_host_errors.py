"""The host side's one exception root: the tree drawn in host/errors.py is the tree in the code,
and unplugctl turns any HostError into one line and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import pkgutil
import re
from collections.abc import AsyncIterator

import grpc
import pytest

import unplugd.host
from unplugd.host import cli, errors
from unplugd.host.backends.qmp import QmpCommandError
from unplugd.host.client import AgentCallFailed, AgentUnreachable
from unplugd.host.errors import AmbiguousDevice, DeviceNotFound, DomainNotFound, HostError
from unplugd.host.relays import RelayError


def _host_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of unplugd.host, by name."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(unplugd.host.__path__, "unplugd.host."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[name] = obj
    return found


def _drawn_tree() -> dict[str, str]:
    """child -> parent, as host/errors.py's docstring draws them."""
    assert errors.__doc__ is not None
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (column of the name, name) of the open branches
    for line in errors.__doc__.splitlines():
        m = re.match(r"^[| ]*\+-- (\w+)", line) or re.match(r"^ *(HostError)$", line)
        if m is None:
            continue
        name, column = m.group(1), m.start(1)
        while stack and stack[-1][0] >= column:
            stack.pop()
        if stack:
            parents[name] = stack[-1][1]
        stack.append((column, name))
    return parents


def test_the_docstring_tree_is_the_class_tree() -> None:
    drawn = _drawn_tree()
    defined = _host_exceptions()
    assert set(drawn) | {"HostError"} == set(defined)
    for name, parent in drawn.items():
        assert defined[name].__bases__ == (defined[parent],), name


def test_every_host_exception_is_a_host_error() -> None:
    for name, cls in _host_exceptions().items():
        assert issubclass(cls, HostError), name


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
