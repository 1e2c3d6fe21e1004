"""A virtio-serial port with the kernel driver's semantics, built on real fds.

Guest side (what the bridge opens):
- one opener at a time: a second open() raises EBUSY;
- no host connected: read() returns b"" and the read fd polls readable
  (POLLHUP), writes would block (the write fd does not poll writable);
- host connected: bytes flow through a socketpair.
Host side: connect / disconnect / send / recv, and `turnover()`: one host
client leaves and the next arrives without the guest seeing anything, with
whatever the old client left unread still buffered.

FakeChardev puts a unix socket in front of the host side, as QEMU's
`-chardev socket,server=on` does: one client at a time, connect = host
connected, hang-up = host disconnected (or invisible, `visible_hangup=False`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import select
import socket
from pathlib import Path

from unplugd.splice import first_done


class FakeVirtioPort:
    def __init__(self) -> None:
        self._guest, self._host = socket.socketpair()
        self._guest.setblocking(False)
        self._host.setblocking(False)
        self._hup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._rd = select.epoll()
        self._rd.register(self._guest.fileno(), select.EPOLLIN)
        self._rd.register(self._hup, select.EPOLLIN)
        # Write readiness: a pipe whose write end is kept full while no host
        # is connected, so it polls writable exactly when the port would.
        self._gate_r, self._gate_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self._gate_w, fcntl.F_SETPIPE_SZ, 4096)
        self.host_connected = False
        self.opened = False
        self.opens = 0
        self._set_hup(True)

    # -- state ----------------------------------------------------------
    def _set_hup(self, on: bool) -> None:
        if on:
            os.eventfd_write(self._hup, 1)
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(self._gate_w, bytes(4096))
        else:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._hup)
            with contextlib.suppress(BlockingIOError):
                while os.read(self._gate_r, 65536):
                    pass

    def host_connect(self) -> None:
        if not self.host_connected:
            self.host_connected = True
            self._set_hup(False)

    def host_disconnect(self) -> None:
        if self.host_connected:
            self.host_connected = False
            self._set_hup(True)

    def turnover(self) -> None:
        """The old host client is gone, a new one is here; the guest sees nothing."""

    # -- guest side -----------------------------------------------------
    def open(self) -> FakePortHandle:
        if self.opened:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        self.opened = True
        self.opens += 1
        return FakePortHandle(self)

    def _guest_read(self, n: int) -> bytes:
        try:
            return self._guest.recv(n)
        except BlockingIOError:
            if not self.host_connected:
                return b""
            raise

    def _guest_write(self, data: bytes) -> int:
        if not self.host_connected:
            raise BlockingIOError(errno.EAGAIN, "host not connected")
        return self._guest.send(data)

    # -- host side ------------------------------------------------------
    @property
    def host_socket(self) -> socket.socket:
        return self._host

    def close(self) -> None:
        for sock in (self._rd, self._guest, self._host):
            sock.close()
        for fd in (self._hup, self._gate_r, self._gate_w):
            os.close(fd)


class FakePortHandle:
    """What the bridge holds: the guest side of an opened port."""

    def __init__(self, port: FakeVirtioPort) -> None:
        self._port = port
        self.closed = False

    def read_fd(self) -> int:
        return self._port._rd.fileno()

    def write_fd(self) -> int:
        return self._port._gate_w

    def read(self, n: int) -> bytes:
        return self._port._guest_read(n)

    def write(self, data: bytes) -> int:
        return self._port._guest_write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._port.opened = False


class FakeChardev:
    """A unix socket in front of the port's host side, one client at a time."""

    def __init__(self, port: FakeVirtioPort, path: Path, *, visible_hangup: bool = True) -> None:
        self.port = port
        self.path = path
        self.visible_hangup = visible_hangup
        self.clients = 0
        self._busy = asyncio.Lock()
        self._current: asyncio.StreamWriter | None = None
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._client, path=str(self.path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def drop_client(self) -> None:
        """The host client dies: its connection is reset, no goodbye."""
        if self._current is not None:
            self._current.transport.abort()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._busy:  # QEMU serves one client; the next waits
            self.clients += 1
            self._current = writer
            if self.port.host_connected:
                self.port.turnover()
            self.port.host_connect()
            loop = asyncio.get_running_loop()
            host = self.port.host_socket

            async def to_guest() -> None:
                with contextlib.suppress(ConnectionError):
                    while data := await reader.read(65536):
                        await loop.sock_sendall(host, data)

            async def to_host() -> None:
                while data := await loop.sock_recv(host, 65536):
                    writer.write(data)
                    await writer.drain()

            try:
                await first_done([asyncio.ensure_future(to_guest()), asyncio.ensure_future(to_host())])
            finally:
                writer.close()
                self._current = None
                if self.visible_hangup:
                    self.port.host_disconnect()
