"""Bridge from a virtio-serial port (/dev/virtio-ports/<name>) to the agent's unix socket.

The port is one byte stream shared by every host client in turn, with the
semantics of the kernel's virtio_console driver:
- one opener at a time (a second open fails with EBUSY);
- while no host is connected, read() returns 0 and poll() reports POLLHUP
  (so the fd is "readable" all the time: we must not spin on it);
- a host client leaving and the next one arriving may be invisible, and
  bytes of the old session can still be buffered.
Hence the framed session protocol (framing.py, session.py, PROTOCOL.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from unplugd.agent.transports.session import (
    Action,
    CloseBackend,
    GuestSession,
    OpenBackend,
    SendFrame,
    ToBackend,
)
from unplugd.framing import FrameDecoder, FrameKind, data_frames, encode_frame
from unplugd.splice import close_writer

__all__ = ["DEFAULT_PORT_NAME", "BridgeStats", "DevicePort", "Port", "VirtioSerialBridge", "port_path"]

log = logging.getLogger(__name__)

DEFAULT_PORT_NAME = "org.unplugd.agent.0"
READ_SIZE = 64 * 1024
# Pause reading from one side while this much is waiting for the other.
HIGH_WATER = 256 * 1024
# Bytes a host may send before the agent's socket accepted the session.
MAX_PENDING = 1024 * 1024


class Port(Protocol):
    """What the bridge needs from a port; DevicePort is the real one."""

    def read_fd(self) -> int: ...
    def write_fd(self) -> int: ...
    def read(self, n: int) -> bytes:
        """Bytes; b"" while no host is connected; BlockingIOError when nothing is there yet."""
        ...

    def write(self, data: bytes) -> int: ...
    def close(self) -> None: ...


def port_path(dev_root: Path, name: str) -> Path:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad virtio-serial port name {name!r}")
    return dev_root / "virtio-ports" / name


class DevicePort:
    """A virtio-serial port device node, opened non-blocking."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)

    def read_fd(self) -> int:
        return self._fd

    def write_fd(self) -> int:
        return self._fd

    def read(self, n: int) -> bytes:
        return os.read(self._fd, n)

    def write(self, data: bytes) -> int:
        return os.write(self._fd, data)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


@dataclass
class BridgeStats:
    """Counters for logs, tests and benchmarks."""

    port_opens: int = 0
    sessions: int = 0
    # bytes of garbage or of departed hosts skipped by the decoder
    skipped_bytes: int = 0
    rejected_frames: int = 0
    # frames of a session that is no longer current
    stale_frames: int = 0
    # bytes waiting to be written to the port
    queued_bytes: int = 0


class _Backend:
    """The unix-socket connection that carries one session."""

    def __init__(self, session: int) -> None:
        self.session = session
        self.writer: asyncio.StreamWriter | None = None
        self.pending = bytearray()
        self.task: asyncio.Task[None] | None = None


class _PortSession:
    """Serves one opened port until it fails or the bridge stops."""

    def __init__(self, port: Port, backend_path: str, hup_retry: tuple[float, float], stats: BridgeStats) -> None:
        self.port = port
        self.stats = stats
        self.backend_path = backend_path
        # look again after min, doubling to max while no host is there
        self.hup_min, self.hup_max = hup_retry
        self.hup_delay = self.hup_min
        self.loop = asyncio.get_running_loop()
        self.decoder = FrameDecoder()
        self.state = GuestSession()
        self.backend: _Backend | None = None
        # (session, encoded frame); the head may be partly written
        self.out: collections.deque[tuple[int, bytes]] = collections.deque()
        self.out_offset = 0
        self.out_bytes = 0
        self.out_drained = asyncio.Event()
        self.out_drained.set()
        self.failed: asyncio.Future[str] = self.loop.create_future()
        self.reading = False
        self.writing = False
        self.retry: asyncio.TimerHandle | None = None
        self._base = (stats.skipped_bytes, stats.rejected_frames, stats.stale_frames)

    async def run(self) -> str:
        self._start_reading()
        try:
            return await self.failed
        finally:
            self._count()
            self._stop_reading()
            self._stop_writing()
            if self.retry is not None:
                self.retry.cancel()
            backend, self.backend = self.backend, None
            if backend is not None:
                await self._close(backend)

    def _count(self) -> None:
        self.stats.skipped_bytes = self._base[0] + self.decoder.stats.skipped_bytes
        self.stats.rejected_frames = self._base[1] + self.decoder.stats.rejected_frames
        self.stats.stale_frames = self._base[2] + self.state.stale_frames
        self.stats.queued_bytes = self.out_bytes

    def _fail(self, why: str) -> None:
        if not self.failed.done():
            self.failed.set_result(why)

    # -- port reading ---------------------------------------------------
    def _start_reading(self) -> None:
        self.retry = None
        if not self.reading and not self.failed.done():
            self.loop.add_reader(self.port.read_fd(), self._on_readable)
            self.reading = True

    def _stop_reading(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.port.read_fd())
            self.reading = False

    def _on_readable(self) -> None:
        try:
            data = self.port.read(READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(f"read: {os.strerror(exc.errno or 0)}")
            return
        if not data:
            # No host connected: POLLHUP keeps the fd readable, so look
            # again later instead of spinning.
            self._stop_reading()
            self.retry = self.loop.call_later(self.hup_delay, self._start_reading)
            self.hup_delay = min(self.hup_delay * 2, self.hup_max)
            if self.state.current is not None:
                log.info("virtio-serial host went away; closing session %08x", self.state.current)
            self.decoder.reset()
            self._do(self.state.on_host_gone())
            # what was queued for the host that left would go to the next one, before its OPEN
            # is even read: keep only a frame already begun (session ids are never 0)
            self._drop_queued(0)
            self._count()
            return
        self.hup_delay = self.hup_min
        for frame in self.decoder.feed(data):
            self._do(self.state.on_frame(frame))
        self._count()
        writer = self.backend.writer if self.backend else None
        if writer is not None and writer.transport.get_write_buffer_size() > HIGH_WATER:
            self._stop_reading()
            self.loop.create_task(self._resume_after_drain(writer))

    async def _resume_after_drain(self, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            await writer.drain()
        self._start_reading()

    # -- port writing ---------------------------------------------------
    def _send(self, session: int, encoded: bytes) -> None:
        self.out.append((session, encoded))
        self.out_bytes += len(encoded)
        if self.out_bytes > HIGH_WATER:
            self.out_drained.clear()
        if not self.writing and not self.failed.done():
            self.loop.add_writer(self.port.write_fd(), self._on_writable)
            self.writing = True

    def _stop_writing(self) -> None:
        if self.writing:
            self.loop.remove_writer(self.port.write_fd())
            self.writing = False

    def _on_writable(self) -> None:
        while self.out:
            _, chunk = self.out[0]
            try:
                n = self.port.write(chunk[self.out_offset :])
            except BlockingIOError:
                # writable said yes but write said no: back off briefly
                self._stop_writing()
                self.loop.call_later(0.05, self._rearm_writer)
                return
            except OSError as exc:
                self._fail(f"write: {os.strerror(exc.errno or 0)}")
                return
            self.out_offset += n
            self.out_bytes -= n
            if self.out_offset == len(chunk):
                self.out.popleft()
                self.out_offset = 0
        if self.out_bytes <= HIGH_WATER:
            self.out_drained.set()
        self._stop_writing()

    def _rearm_writer(self) -> None:
        if self.out and not self.writing and not self.failed.done():
            self.loop.add_writer(self.port.write_fd(), self._on_writable)
            self.writing = True

    def _drop_queued(self, keep_session: int) -> None:
        """Forget unsent frames of other sessions; a frame already begun is finished."""
        kept = collections.deque(
            item for i, item in enumerate(self.out) if item[0] == keep_session or (i == 0 and self.out_offset)
        )
        self.out_bytes = sum(len(c) for _, c in kept) - self.out_offset
        self.out = kept
        if self.out_bytes <= HIGH_WATER:
            self.out_drained.set()

    # -- actions --------------------------------------------------------
    def _do(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendFrame):
                frame = action.frame
                if (frame.session != self.state.current or frame.kind is FrameKind.ACCEPT) and (
                    self.out_bytes > HIGH_WATER
                ):
                    # a courtesy CLOSE for a stale session, or the ACCEPT that answers a
                    # retried OPEN (a session's first ACCEPT finds the queue emptied by its
                    # OPEN): a host that floods either and reads nothing must not grow our queue
                    continue
                self._send(action.frame.session, encode_frame(action.frame))
            elif isinstance(action, OpenBackend):
                self._drop_queued(action.session)
                self._drop_backend()
                self.stats.sessions += 1
                backend = self.backend = _Backend(action.session)
                backend.task = self.loop.create_task(self._serve_backend(backend))
                log.info("virtio-serial session %08x opened", action.session)
            elif isinstance(action, CloseBackend):
                self._drop_backend()
            elif isinstance(action, ToBackend):
                self._to_backend(action.data)

    def _to_backend(self, data: bytes) -> None:
        backend = self.backend
        if backend is None:
            return
        if backend.writer is not None:
            backend.writer.write(data)
            return
        backend.pending += data
        if len(backend.pending) > MAX_PENDING:
            self._do(self.state.on_backend_failed(backend.session, "too much data before the session was accepted"))
            self._drop_backend()

    def _drop_backend(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            self.loop.create_task(self._close(backend))

    async def _close(self, backend: _Backend) -> None:
        if backend.task is not None and backend.task is not asyncio.current_task():
            backend.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await backend.task
        if backend.writer is not None:
            await close_writer(backend.writer)

    async def _serve_backend(self, backend: _Backend) -> None:
        sid = backend.session
        try:
            reader, writer = await asyncio.open_unix_connection(self.backend_path)
        except OSError as exc:
            log.warning("virtio-serial session %08x: cannot reach the agent at %s: %s", sid, self.backend_path, exc)
            if self.backend is backend:
                self.backend = None
            self._do(self.state.on_backend_failed(sid, f"agent socket: {exc.strerror or exc}"))
            return
        if self.backend is not backend:
            await close_writer(writer)
            return
        backend.writer = writer
        if backend.pending:
            writer.write(bytes(backend.pending))
            backend.pending.clear()
        self._do(self.state.on_backend_connected(sid))
        try:
            while data := await reader.read(READ_SIZE):
                for encoded in data_frames(sid, data):
                    self._send(sid, encoded)
                await self.out_drained.wait()
        except OSError as exc:
            log.debug("virtio-serial session %08x: agent connection: %s", sid, exc)
        if self.backend is backend:
            self.backend = None
            await close_writer(writer)
            self._do(self.state.on_backend_closed(sid))


PortOpener = Callable[[], Port]


class VirtioSerialBridge:
    """Keeps the port open and serves one framed session at a time.

    If the port cannot be opened (not there yet, EBUSY: another opener) or
    fails (hot-unplugged), the bridge retries after `reopen_delay`, doubling
    up to `max_reopen_delay` while it stays absent. That ceiling is what a
    host waits, at worst, once the port is back: an open() every 5 s costs
    nothing, and a host's connect attempt (grpc's is 20 s) must outlast it.

    While no host is connected the port reads 0 and polls POLLHUP, so there
    is no event to wait for: the bridge looks again after `hup_retry`,
    doubling up to `max_hup_retry` (a new host waits at most that long; an
    idle bridge costs two reads a second).
    """

    transport = "virtio-serial"

    def __init__(
        self,
        open_port: PortOpener,
        backend: Path | str,
        *,
        address: str = "",
        hup_retry: float = 0.05,
        max_hup_retry: float = 0.5,
        reopen_delay: float = 1.0,
        max_reopen_delay: float = 5.0,
    ) -> None:
        self._open_port = open_port
        self._backend = str(backend)
        self.address = address
        self._hup_retry = (hup_retry, max(hup_retry, max_hup_retry))
        self._reopen_delay = reopen_delay
        self._max_reopen_delay = max(reopen_delay, max_reopen_delay)
        self._task: asyncio.Task[None] | None = None
        self.stats = BridgeStats()

    @classmethod
    def for_device(cls, path: Path, backend: Path | str, **kw: float) -> VirtioSerialBridge:
        return cls(lambda: DevicePort(path), backend, address=str(path), **kw)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        quiet_errno: int | None = None
        delay = self._reopen_delay
        while True:
            try:
                port = self._open_port()
            except OSError as exc:
                # say it once, not every retry; back off while the port is absent
                if exc.errno != quiet_errno:
                    hint = " (another process has it open)" if exc.errno == errno.EBUSY else ""
                    log.warning("virtio-serial port %s: %s%s; retrying", self.address, exc.strerror or exc, hint)
                    quiet_errno = exc.errno
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_reopen_delay)
                continue
            quiet_errno, delay = None, self._reopen_delay
            self.stats.port_opens += 1
            log.info("virtio-serial bridge on %s -> %s", self.address, self._backend)
            try:
                why = await _PortSession(port, self._backend, self._hup_retry, self.stats).run()
                log.warning("virtio-serial port %s failed (%s); reopening", self.address, why)
            finally:
                port.close()
            await asyncio.sleep(delay)
