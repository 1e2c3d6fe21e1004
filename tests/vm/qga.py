"""A small synchronous client for qemu-guest-agent over QEMU's chardev unix socket.

The virtio-serial port behind the socket keeps bytes across host connections, so a reply read after
a reconnect may belong to an earlier request. Each call therefore first sends guest-sync-delimited
with a fresh id: qemu-ga answers it with a 0xFF byte before the JSON, everything before that marker
is stale and dropped, and replies with another id are skipped.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

__all__ = ["ExecResult", "GuestAgent", "GuestAgentError", "GuestExecTimeout"]

_SYNC_MARK = b"\xff"


class GuestAgentError(Exception):
    """qemu-ga did not answer in time, the connection broke, or it answered with an error."""


class GuestExecTimeout(GuestAgentError):
    """A guest-exec'd command did not finish in time."""


class ExecResult(NamedTuple):
    rc: int
    stdout: str
    stderr: str


class GuestAgent:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buf = b""
        self._ids = itertools.count(int(time.time()) % 100000 * 1000)
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

    # -- wire --

    def _connect(self, deadline: float) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                sock.close()
                raise GuestAgentError(f"cannot connect to {self.path}: {exc}") from exc
            self._sock = sock
            self._buf = b""
        return self._sock

    def _send(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError as exc:
            self.close()
            raise GuestAgentError(f"send to qemu-ga failed: {exc}") from exc

    def _fill(self, sock: socket.socket, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GuestAgentError("qemu-ga did not answer in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError as exc:
            raise GuestAgentError("qemu-ga did not answer in time") from exc
        except OSError as exc:
            self.close()
            raise GuestAgentError(f"reading from qemu-ga failed: {exc}") from exc
        if not chunk:
            self.close()
            raise GuestAgentError("qemu-ga connection closed")
        self._buf += chunk

    def _read_line(self, sock: socket.socket, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            self._fill(sock, deadline)
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _sync(self, sock: socket.socket, deadline: float) -> None:
        sync_id = next(self._ids)
        req = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        self._send(sock, _SYNC_MARK + json.dumps(req).encode() + b"\n")
        while True:
            while _SYNC_MARK not in self._buf:
                self._buf = b""
                self._fill(sock, deadline)
            self._buf = self._buf.split(_SYNC_MARK, 1)[1]
            line = self._read_line(sock, deadline)
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if isinstance(reply, dict) and reply.get("return") == sync_id:
                return

    def call(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Run one qemu-ga command and return its "return" value."""
        deadline = time.monotonic() + timeout
        with self._lock:
            sock = self._connect(deadline)
            try:
                self._sync(sock, deadline)
            except GuestAgentError:
                self.close()
                raise
            req: dict[str, Any] = {"execute": command}
            if arguments:
                req["arguments"] = arguments
            self._send(sock, json.dumps(req).encode() + b"\n")
            while True:
                try:
                    line = self._read_line(sock, deadline)
                except GuestAgentError:
                    self.close()
                    raise
                try:
                    reply = json.loads(line.strip(_SYNC_MARK))
                except ValueError:
                    continue
                if not isinstance(reply, dict):
                    continue
                if "error" in reply:
                    err = reply["error"]
                    raise GuestAgentError(f"{command}: {err.get('class')}: {err.get('desc')}")
                if "return" in reply:
                    return reply["return"]

    def send(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> None:
        """Send a command that qemu-ga does not answer on success (guest-shutdown): sync, send, go.

        Waiting for guest-exec-status of a `reboot` instead races the reboot, which may stop qemu-ga
        before it answers.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            sock = self._connect(deadline)
            try:
                self._sync(sock, deadline)
                req: dict[str, Any] = {"execute": command}
                if arguments:
                    req["arguments"] = arguments
                self._send(sock, json.dumps(req).encode() + b"\n")
            finally:
                self.close()  # whatever comes back belongs to a guest going down

    def ping(self, timeout: float = 3.0) -> bool:
        try:
            self.call("guest-ping", timeout=timeout)
        except GuestAgentError:
            return False
        return True

    # -- guest-exec --

    def exec(
        self,
        argv: Sequence[str],
        timeout: float = 60.0,
        input: bytes | None = None,
        env: Sequence[str] | None = None,
    ) -> ExecResult:
        """Run argv in the guest, wait for it, return (rc, stdout, stderr).

        The guest side runs under timeout(1) as well, so a command that hangs does not outlive the call.
        """
        limit = max(1, int(timeout + 0.999))
        full = ["timeout", "--kill-after=5", str(limit), *argv]
        args: dict[str, Any] = {"path": full[0], "arg": full[1:], "capture-output": True}
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
        if env is not None:
            args["env"] = list(env)
        deadline = time.monotonic() + timeout + 10
        pid = self.call("guest-exec", args, timeout=10)["pid"]
        delay = 0.02
        while True:
            status = self.call("guest-exec-status", {"pid": pid}, timeout=max(1.0, deadline - time.monotonic()))
            if status.get("exited"):
                break
            if time.monotonic() > deadline:
                raise GuestExecTimeout(f"guest command did not finish in {timeout:.0f}s: {list(argv)}")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        rc = status.get("exitcode")
        if rc is None:
            rc = 128 + int(status.get("signal", 0))
        out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
        if rc == 124 or rc == 137:
            log.warning("guest command may have been stopped by its timeout (%ss): %s", limit, list(argv))
        return ExecResult(int(rc), out, err)
