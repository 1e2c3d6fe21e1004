"""Debian's qemu-guest-agent, run on this machine on a unix socket, spoken to in its JSON protocol.

This is what a host would otherwise ask a guest: guest-get-fsinfo,
guest-get-disks and guest-network-get-interfaces. Running it locally with
`-m unix-listen` measures the agent's own cost without a VM in between.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.bench.measure import spawn, stop

__all__ = ["QGA_CALLS", "QgaClient", "qga_binary", "running_qga"]

QGA_CALLS = ("guest-get-fsinfo", "guest-get-disks", "guest-network-get-interfaces")


def qga_binary() -> str | None:
    return shutil.which("qemu-ga") or next(
        (p for p in ("/usr/sbin/qemu-ga", "/usr/bin/qemu-ga") if Path(p).exists()), None
    )


class QgaClient:
    """One connection; each call is a JSON object per line, answered by one line."""

    def __init__(self, path: Path, timeout_s: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rwb")
        # guest-sync flushes anything a previous client left in the stream.
        self.call("guest-sync", {"id": 424242})

    def call(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        self._file.write(json.dumps(msg).encode() + b"\n")
        self._file.flush()
        line = self._file.readline()
        if not line:
            raise ConnectionError("qemu-ga closed the connection")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply["return"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()


@contextlib.contextmanager
def running_qga() -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """qemu-ga listening on a private socket; (process, socket path)."""
    binary = qga_binary()
    if binary is None:
        raise FileNotFoundError("qemu-ga not installed (packaging/dev/system-deps.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="unplugd-bench-qga-") as tmp:
        sock = Path(tmp) / "qga.sock"
        proc = spawn(
            [binary, "-m", "unix-listen", "-p", str(sock), "-t", tmp, "-l", str(Path(tmp) / "qga.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("qemu-ga did not start listening")
                time.sleep(0.01)
            yield proc, sock
        finally:
            stop(proc)
