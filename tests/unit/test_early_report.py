"""cli.open_session: an agent named on the command line is asked for its report before the backend is
even imported, for the commands whose first step reads it (issue 13: the agent scans meanwhile)."""

from __future__ import annotations

import pytest

from unplugd.host import cli
from unplugd.host.backends.qmp import QmpBackend
from unplugd.host.client import AgentClient
from unplugd.host.errors import DomainNotFound


@pytest.mark.parametrize(
    ("argv", "early"),
    [
        (["status"], True),
        (["check", "vdb"], True),
        (["unplug", "vdb"], True),
        (["unplug", "vdb", "--release"], False),  # the guest's hooks come first
        (["wait-ready", "vdb", "--timeout", "5"], False),  # a watch, not a report
        (["release", "vdb"], False),
    ],
)
def test_the_report_is_asked_for_before_the_backend_connects(
    argv: list[str], early: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []

    async def start_report(self: AgentClient, *, timeout: float | None = None) -> None:
        order.append("start_report")

    async def connect(self: QmpBackend) -> None:
        order.append("qmp connect")
        raise DomainNotFound("the test stops here")

    monkeypatch.setattr(AgentClient, "start_report", start_report)
    monkeypatch.setattr(QmpBackend, "connect", connect)
    code = cli.main([*argv, "--qmp", "/nonexistent/qmp.sock", "--agent", "unix:/nonexistent/agent.sock"])
    assert code == cli.EXIT_FAILURE
    assert order == (["start_report", "qmp connect"] if early else ["qmp connect"])
