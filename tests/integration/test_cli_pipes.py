"""`unplugd inspect | head -1` and `unplugctl status ... | head -1`: the reader leaves, the command ends quietly.

A real pipe whose read end is closed before the command writes: every write
fails with EPIPE, as after `head -1` exits. No traceback, no "Exception
ignored" from the flush at exit, status 141 (what a shell shows for a tool
killed by SIGPIPE).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.fixtures.build_scenarios import SCENARIOS
from tests.integration.qemu import QEMU, run_qemu
from unplugd.stdio import EXIT_BROKEN_PIPE

ENV = {"PYTHONPATH": str(REPO / ".dev"), "PATH": "/usr/bin:/bin"}


def _into_closed_pipe(argv: list[str]) -> subprocess.CompletedProcess[str]:
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    try:
        return subprocess.run(argv, stdout=w, stderr=subprocess.PIPE, env=ENV, text=True, timeout=60, check=False)
    finally:
        os.close(w)


def _with_head(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """The shell pipeline itself, with pipefail: the status is the command's."""
    return subprocess.run(
        ["bash", "-c", f"set -o pipefail; {shlex.join(argv)} | head -1"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _quiet(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == EXIT_BROKEN_PIPE, done.stderr
    assert done.stderr == ""


@pytest.mark.parametrize("args", [["inspect"], ["inspect", "--json"], ["check", "vdb"]])
def test_unplugd_ends_quietly_when_its_reader_left(args: list[str]) -> None:
    root = ["--root", str(SCENARIOS / "multifunction8.tree")]
    _quiet(_into_closed_pipe([sys.executable, "-m", "unplugd.agent.cli", *args, *root]))


def test_unplugd_inspect_piped_into_head() -> None:
    argv = [sys.executable, "-m", "unplugd.agent.cli", "inspect", "--root", str(SCENARIOS / "multifunction8.tree")]
    done = _with_head(argv)
    assert len(done.stdout.splitlines()) == 1 and done.stderr == ""
    assert done.returncode in (0, EXIT_BROKEN_PIPE)  # 0 when everything fit in the pipe before head left


@pytest.mark.skipif(shutil.which(QEMU) is None, reason="needs QEMU")
@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["check", "net0"]])
def test_unplugctl_ends_quietly_when_its_reader_left(args: list[str]) -> None:
    with run_qemu("pc") as vm:
        done = _into_closed_pipe([sys.executable, "-m", "unplugd.host.cli", args[0], "--qmp", vm.qmp, *args[1:]])
    _quiet(done)
