"""Waiting for an `unplugd serve` started as a process in a test: ready once its socket accepts."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any


def accepts(sock: Path) -> bool:
    """A connect() succeeds: the socket file alone is not enough, it exists from bind(), before listen()."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(sock))
        except OSError:
            return False
    return True


def wait_accepting(proc: subprocess.Popen[Any], sock: Path, timeout: float = 30) -> None:
    """Until `sock` accepts; AssertionError with the agent's stderr (if piped) when it exits or times out."""
    deadline = time.monotonic() + timeout
    while not accepts(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"agent did not start: {proc.communicate(timeout=5)[1]}")
        time.sleep(0.05)
