"""A WatchReport subscriber that timestamps every message, and mounts that should trigger one.

The mount is a bind mount of a directory on the root filesystem: it adds a
MOUNTED reason to the root disk's PCI function (vda on 0000:00:02.0 here),
so the report really changes. mount(2) is called directly (ctypes) so the
start time is the syscall's, not a `mount` process's start-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["WatchRecorder", "bind_mount", "nsenter_mount", "unmount", "wait_other_namespace"]

_MS_BIND = 4096
_libc = ctypes.CDLL(None, use_errno=True)


def bind_mount(src: str, dst: str) -> None:
    if _libc.mount(src.encode(), dst.encode(), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount --bind {src} {dst}: {os.strerror(err)}")


def unmount(path: str) -> None:
    if _libc.umount2(path.encode(), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {path}: {os.strerror(err)}")


def nsenter_mount(pid: int, args: Sequence[str]) -> None:
    """mount/umount inside the mount namespace of pid."""
    proc = subprocess.run(["nsenter", "-t", str(pid), "-m", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise OSError(f"nsenter -t {pid} -m {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


def wait_other_namespace(pid: int, timeout_s: float = 5.0) -> None:
    """Until pid (an `unshare -m` child) lives in a mount namespace other than ours."""
    own = os.readlink("/proc/self/ns/mnt")
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/{pid}/ns/mnt") != own:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} did not enter a new mount namespace in {timeout_s:.0f} s")
        time.sleep(0.01)


class WatchRecorder:
    """One WatchReport stream read by a thread: (arrival time, message) pairs in a queue."""

    def __init__(self, target: str, devices: Sequence[str] = ()) -> None:
        import grpc

        from unplugd.v1 import agent_service_pb2, agent_service_pb2_grpc

        self._grpc = grpc
        self._channel = grpc.insecure_channel(target)
        stub = agent_service_pb2_grpc.AgentServiceStub(self._channel)
        self._call = stub.WatchReport(agent_service_pb2.WatchReportRequest(devices=list(devices)))
        self._queue: queue.Queue[tuple[float, Any] | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._read, name="bench-watch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for msg in self._call:
                self._queue.put((time.perf_counter(), msg))
        except self._grpc.RpcError as exc:
            self._queue.put(exc)

    def next(self, timeout_s: float) -> tuple[float, Any] | None:
        """The next message, None on timeout; raises if the stream failed."""
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise RuntimeError(f"WatchReport stream ended: {item}")
        return item

    def wait_for(self, address: str, since: float, timeout_s: float) -> float | None:
        """Seconds from `since` to the first message naming `address` as changed; None on timeout."""
        deadline = time.perf_counter() + timeout_s
        while (left := deadline - time.perf_counter()) > 0:
            got = self.next(left)
            if got is None:
                return None
            at, msg = got
            if address in msg.changed and at >= since:
                return at - since
        return None

    def drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call.cancel()  # type: ignore[no-untyped-call]
        self._channel.close()
        self._thread.join(timeout=5)
