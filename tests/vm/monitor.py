"""A minimal synchronous QMP client for the harness' own monitor (quit, powerdown, helpers).

Tests that exercise unplugd's host side connect their own client (qemu.qmp, asyncio) to the
VM's second, public QMP socket; this one stays private to the harness so the two never compete
for the single connection a QMP chardev accepts.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["Monitor", "MonitorError"]


class MonitorError(Exception):
    """QMP returned an error, timed out, or the connection broke."""


class Monitor:
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
            deadline = time.monotonic() + timeout
            greeting = self._read(deadline)
            if "QMP" not in greeting:
                raise MonitorError(f"no QMP greeting on {path}: {greeting}")
            self._call("qmp_capabilities", None, deadline)
        except (OSError, MonitorError) as exc:
            self._sock.close()
            raise MonitorError(f"QMP handshake on {path} failed: {exc}") from exc

    def close(self) -> None:
        self._sock.close()

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MonitorError("QMP timed out")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise MonitorError("QMP timed out") from exc
            if not chunk:
                raise MonitorError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise MonitorError(f"unexpected QMP message: {msg!r}")
        return msg

    def _call(self, command: str, arguments: dict[str, Any] | None, deadline: float) -> Any:
        req_id = next(self._ids)
        req: dict[str, Any] = {"execute": command, "id": req_id}
        if arguments:
            req["arguments"] = arguments
        self._sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._read(deadline)
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != req_id:
                continue
            if "error" in msg:
                err = msg["error"]
                raise MonitorError(f"{command}: {err.get('class')}: {err.get('desc')}")
            return msg.get("return")

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        with self._lock:
            try:
                return self._call(command, arguments, time.monotonic() + timeout)
            except OSError as exc:
                raise MonitorError(f"{command}: {exc}") from exc

    def wait_event(
        self, name: str, timeout: float, match: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        """Return (and consume) the first event called name that match accepts, waiting up to timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for i, ev in enumerate(self.events):
                    if ev.get("event") == name and (match is None or match(ev)):
                        return self.events.pop(i)
                try:
                    msg = self._read(deadline)
                except OSError as exc:
                    raise MonitorError(f"waiting for {name}: {exc}") from exc
                except MonitorError as exc:
                    raise MonitorError(f"no {name} event within {timeout:.0f}s ({exc})") from exc
                if "event" in msg:
                    self.events.append(msg)
