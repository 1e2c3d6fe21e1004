"""A real `unplugd serve` on this machine answers `unplugd inspect` over its report socket.

What the agent sends is what the local scan prints, on the same system; the socket is
root-only and answers one client after another, each with a fresh report; a client that
writes garbage changes nothing (the agent reads nothing from it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from unplugd.agent import reportsock

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent reads every process's fds as root")

# Fields that differ between two reports of an unchanged system: when each was made.
PER_RUN = ("generatedAt",)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`unplugd serve` on the live system, its sockets in a temporary directory; the report socket's path."""
    tmp = tmp_path_factory.mktemp("report-agent")
    cfg = tmp / "config.toml"
    cfg.write_text("[transports.virtio_serial]\nenabled = false\n")  # this machine's port is not ours
    run = tmp / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "unplugd.agent.cli", "serve", "--config", str(cfg), "--socket", str(run / "agent.sock")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    path = run / reportsock.REPORT_SOCKET_NAME
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no report socket after 30 s"
            time.sleep(0.05)
        yield path
        assert proc.poll() is None, "the agent died"
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    assert not path.exists(), "the report socket outlived the agent"


def _inspect(socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The console script's module (Debian's /usr/bin/unplugd runs it too).
    return subprocess.run(
        [sys.executable, "-m", "unplugd.agent.entry", "inspect", *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, reportsock.SOCKET_ENV: str(socket_path)},
        timeout=120,
    )


def _without_per_run(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in PER_RUN}


PROBE = """
import sys
from unplugd.agent.entry import main
code = main(["inspect", "--json"])
sys.stderr.write(repr(sorted(m for m in sys.modules if m.startswith("unplugd"))))
raise SystemExit(code)
"""


def test_inspect_json_from_the_agent_is_the_local_scan(agent: Path) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, reportsock.SOCKET_ENV: str(agent)},
    )
    # Answered by the agent: this process imported no engine, only the entry point and the client.
    assert probe.stderr == repr(["unplugd", "unplugd.agent", "unplugd.agent.entry", "unplugd.agent.reportsock"])
    # The same system a moment apart: retried a few times in case something changed in between
    # (a process, a connection); only the timestamp may differ.
    for _ in range(3):
        served = json.loads(_inspect(agent, "--json").stdout)
        local = json.loads(_inspect(agent, "--json", "--local").stdout)
        if _without_per_run(served) == _without_per_run(local):
            break
    assert _without_per_run(served) == _without_per_run(local)
    assert served["functions"], "a report without functions proves nothing"


def test_the_table_from_the_agent_is_the_local_table(agent: Path) -> None:
    for _ in range(3):
        served = _inspect(agent, "-v").stdout
        local = _inspect(agent, "-v", "--local").stdout
        if served == local:
            break
    assert served == local


def _read_answer(path: Path, send: bytes = b"") -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(30)
        c.connect(str(path))
        if send:
            with contextlib.suppress(OSError):  # the agent may close first
                c.sendall(send)
        chunks = []
        with contextlib.suppress(ConnectionResetError):  # what the agent never read: a reset after the data
            while chunk := c.recv(1 << 16):
                chunks.append(chunk)
        return b"".join(chunks)


def test_a_root_only_socket_answers_client_after_client_afresh(agent: Path) -> None:
    assert stat.S_IMODE(os.lstat(agent).st_mode) == 0o600
    stamps = []
    for _ in range(10):
        answer = reportsock.check_answer(_read_answer(agent))
        assert isinstance(answer, reportsock.Answer), answer
        stamps.append(answer.doc["generatedAt"])
    assert len(set(stamps)) == 10  # a new report for each: none cached


def test_garbage_from_a_client_is_never_read_and_the_agent_stays_up(agent: Path) -> None:
    got = _read_answer(agent, send=os.urandom(1 << 20) + b"\n{}\n")
    assert got == b"" or isinstance(reportsock.check_answer(got), reportsock.Answer)
    assert isinstance(reportsock.check_answer(_read_answer(agent)), reportsock.Answer)


def test_absent_agent_falls_back_silently_to_the_local_scan(tmp_path: Path, agent: Path) -> None:
    done = _inspect(tmp_path / "no-agent.sock", "--json")
    assert done.stderr == ""
    assert json.loads(done.stdout)["functions"]
