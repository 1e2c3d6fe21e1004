"""Local relays: a private unix socket that grpcio can dial, carried to the agent.

grpcio dials unix sockets and TCP only. Each relay listens on a unix socket in
a private directory and carries every accepted connection over the real path:
- VsockRelay:        AF_VSOCK to (CID, port)
- HybridVsockRelay:  Firecracker / cloud-hypervisor: the VMM's unix socket,
                     "CONNECT <port>\\n" answered by "OK <n>\\n"
- SerialRelay:       QEMU's chardev socket of a virtio-serial port (libvirt's
                     <channel type='unix'> path is the same), speaking the
                     framed session protocol of agent/transports/PROTOCOL.md

A relay remembers why its last attempt failed (`last_error`), so the client
can say more than "connection closed".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from unplugd.framing import (
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameKind,
    data_frames,
    encode_frame,
    sync_preamble,
)
from unplugd.host.errors import HostError
from unplugd.splice import close_writer, first_done, splice

__all__ = ["Dialer", "HybridVsockRelay", "Relay", "RelayError", "SerialRelay", "VsockRelay", "dial_vsock"]

log = logging.getLogger(__name__)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_T = TypeVar("_T")


class RelayError(HostError):
    """The relay could not reach the agent; the message says where and why."""


class Relay(ABC):
    """Accepts on a private unix socket and carries each connection onward."""

    def __init__(self, *, connect_timeout: float = 5.0) -> None:
        self.connect_timeout = connect_timeout
        self.path: Path | None = None
        self.last_error: str | None = None
        # what an unanswered handshake is waiting for, while it waits: the reason a caller whose
        # deadline passes first gives (grpc's own dials supersede a handshake before it times out)
        self.waiting: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    @abstractmethod
    def target(self) -> str:
        """Where the relay goes, for messages."""

    async def start(self, directory: Path) -> Path:
        path = directory / "relay.sock"
        self._server = await asyncio.start_unix_server(self._accepted, path=str(path))
        os.chmod(path, 0o600)
        self.path = path
        return path

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._before_carry()
            await self._carry((reader, writer))
        except RelayError as exc:
            self.last_error = str(exc)
            log.info("relay to %s: %s", self.target, exc)
        except OSError as exc:
            self.last_error = f"{self.target}: {exc.strerror or exc}"
            log.info("relay to %s: %s", self.target, exc)
        except asyncio.CancelledError:
            # stopped or superseded; asyncio's server callback would log a
            # cancelled handler task as an error
            log.debug("relay to %s: connection cancelled", self.target)
        finally:
            self._tasks.discard(task)
            await close_writer(writer)

    async def _reach(self, opening: Awaitable[_T], silence: str) -> _T:
        """`opening` (a dial, a connect) within connect_timeout; RelayError naming the target if not."""
        try:
            return await asyncio.wait_for(opening, self.connect_timeout)
        except TimeoutError:
            raise RelayError(f"{self.target}: {silence}") from None
        except OSError as exc:
            raise RelayError(f"{self.target}: {exc.strerror or exc}") from exc

    async def _splice(self, client: Streams, upstream: Streams) -> None:
        # Assume the worst until the guest answers: when the far end hangs up
        # without a byte (CID not allowed, no agent behind it), grpc may see
        # the failure before this task resumes, and must find the reason.
        self.last_error = (
            f"{self.target}: the guest closed the connection without answering "
            "(peer not allowed, or the agent is not running)"
        )

        def answered() -> None:
            self.last_error = None

        await splice(client, upstream, label=self.target, on_reply=answered)

    async def _before_carry(self) -> None:  # noqa: B027  (a hook, not abstract)
        """Runs before each connection is carried; SerialRelay supersedes the current one."""

    @abstractmethod
    async def _carry(self, client: Streams) -> None: ...


Dialer = Callable[[int, int], Awaitable[socket.socket]]


async def dial_vsock(cid: int, port: int) -> socket.socket:
    """A connected, non-blocking AF_VSOCK socket to (cid, port)."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (cid, port))
    except BaseException:
        sock.close()
        raise
    return sock


class VsockRelay(Relay):
    def __init__(self, cid: int, port: int, *, dial: Dialer = dial_vsock, connect_timeout: float = 5.0) -> None:
        super().__init__(connect_timeout=connect_timeout)
        self.cid, self.port = cid, port
        self._dial = dial

    @property
    def target(self) -> str:
        return f"vsock CID {self.cid} port {self.port}"

    async def _carry(self, client: Streams) -> None:
        sock = await self._reach(self._dial(self.cid, self.port), f"no answer within {self.connect_timeout:g}s")
        upstream = await asyncio.open_connection(sock=sock)
        await self._splice(client, upstream)


class HybridVsockRelay(Relay):
    """Firecracker / cloud-hypervisor: connect to the VMM's socket, then CONNECT <port>."""

    def __init__(self, uds_path: str | Path, port: int, *, connect_timeout: float = 5.0) -> None:
        super().__init__(connect_timeout=connect_timeout)
        self.uds_path, self.port = str(uds_path), port

    @property
    def target(self) -> str:
        return f"hybrid vsock {self.uds_path} port {self.port}"

    async def _carry(self, client: Streams) -> None:
        upstream = await self._reach(asyncio.open_unix_connection(self.uds_path), "the VMM socket does not answer")
        reader, writer = upstream
        try:
            writer.write(f"CONNECT {self.port}\n".encode())
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), self.connect_timeout)
        except TimeoutError:
            await close_writer(writer)
            raise RelayError(f"{self.target}: no answer to CONNECT within {self.connect_timeout:g}s") from None
        except (OSError, ValueError) as exc:
            await close_writer(writer)
            raise RelayError(f"{self.target}: CONNECT failed: {exc}") from exc
        if not line.startswith(b"OK ") or not line.endswith(b"\n"):
            await close_writer(writer)
            # the VMM closes the connection when nothing listens on the port
            got = "the connection was closed" if not line else f"it answered {line[:80]!r}"
            raise RelayError(f"{self.target}: CONNECT refused ({got}); is unplugd listening on vsock port {self.port}?")
        await self._splice(client, upstream)


_SILENT_GUEST = "is unplugd running with [transports.virtio_serial] enabled? is another client connected?"


class SerialRelay(Relay):
    """QEMU's chardev socket of the agent's virtio-serial port.

    One session at a time: the port is a single stream. A new client
    supersedes the current one (grpc only dials again when it believes the
    old connection is dead).
    """

    def __init__(
        self,
        chardev_path: str | Path,
        *,
        connect_timeout: float = 5.0,
        open_retry: float = 0.5,
    ) -> None:
        super().__init__(connect_timeout=connect_timeout)
        self.chardev_path = str(chardev_path)
        self.open_retry = open_retry
        self._lock = asyncio.Lock()
        self._current: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return f"virtio-serial chardev {self.chardev_path}"

    async def _before_carry(self) -> None:
        old, self._current = self._current, asyncio.current_task()
        if old is not None and not old.done():
            old.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await old

    async def _connect(self) -> Streams:
        """The byte stream to the port; ChannelRelay (host/channel.py) opens it through libvirt instead."""
        return await self._reach(asyncio.open_unix_connection(self.chardev_path), "QEMU does not accept the connection")

    async def _disconnect(self, chardev: Streams) -> None:
        await close_writer(chardev[1])

    def _closed_why(self) -> str:
        """Why the port's stream ended before the guest answered."""
        return "QEMU closed the connection"

    async def _carry(self, client: Streams) -> None:
        async with self._lock:
            chardev = await self._connect()
            try:
                session = secrets.randbits(32) or 1
                decoder = FrameDecoder()
                early = await self._open(chardev, session, decoder)
                self.last_error = None
                await self._pump(client, chardev, session, decoder, early)
            finally:
                await self._disconnect(chardev)

    async def _open(self, chardev: Streams, session: int, decoder: FrameDecoder) -> list[Frame]:
        """Start the session; returns frames that came right behind the ACCEPT."""
        reader, writer = chardev
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        open_frame = encode_frame(Frame(FrameKind.OPEN, session))
        writer.write(sync_preamble() + open_frame)
        await writer.drain()
        self.waiting = f"{self.target}: no answer from the guest yet ({_SILENT_GUEST})"
        while (left := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(reader.read(65536), min(self.open_retry, left))
            except TimeoutError:
                # the guest may have missed it (not reading yet): say it again
                writer.write(open_frame)
                await asyncio.wait_for(writer.drain(), max(left, 0.01))
                continue
            if not data:
                raise RelayError(f"{self.target}: {self._closed_why()}")
            frames = decoder.feed(data)
            for i, frame in enumerate(frames):
                if frame.session != session:
                    continue
                if frame.kind is FrameKind.ACCEPT:
                    self.waiting = None
                    return frames[i + 1 :]
                if frame.kind is FrameKind.CLOSE:
                    why = frame.payload.decode(errors="replace") or "no reason given"
                    raise RelayError(f"{self.target}: the guest bridge refused the session: {why}")
        raise RelayError(f"{self.target}: no answer from the guest within {self.connect_timeout:g}s ({_SILENT_GUEST})")

    async def _pump(
        self, client: Streams, chardev: Streams, session: int, decoder: FrameDecoder, early: list[Frame]
    ) -> None:
        async def host_to_guest() -> None:
            while data := await client[0].read(MAX_PAYLOAD):
                chardev[1].writelines(data_frames(session, data))
                await chardev[1].drain()
            chardev[1].write(encode_frame(Frame(FrameKind.CLOSE, session, b"host client closed")))
            await chardev[1].drain()

        def deliver(frames: list[Frame]) -> bool:
            """Write our session's data to the client; False once the guest closed it."""
            for frame in frames:
                if frame.session != session:
                    continue
                if frame.kind is FrameKind.DATA:
                    client[1].write(frame.payload)
                elif frame.kind is FrameKind.CLOSE:
                    log.info("%s: session closed by the guest: %s", self.target, frame.payload.decode(errors="replace"))
                    return False
            return True

        async def guest_to_host() -> None:
            if not deliver(early):
                return
            while data := await chardev[0].read(65536):
                if not deliver(decoder.feed(data)):
                    return
                await client[1].drain()

        tasks = [asyncio.ensure_future(host_to_guest()), asyncio.ensure_future(guest_to_host())]
        try:
            await first_done(tasks)
        finally:
            if tasks[0].cancelled():
                # leaving without the CLOSE from host_to_guest: tell the guest anyway
                with contextlib.suppress(OSError, RuntimeError):
                    chardev[1].write(encode_frame(Frame(FrameKind.CLOSE, session, b"host relay stopped")))
