"""AF_VSOCK listener in front of the agent's unix socket.

grpcio cannot listen on vsock, so this bridge accepts vsock connections and
splices each to the unix socket. Only allowed peer CIDs get through (by
default the host, CID 2): accept() reports the peer's CID, which the
hypervisor sets, so a process in another guest cannot pretend to be the host.
A port below 1024 can only be bound by root in the guest.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from unplugd.splice import close_writer, splice

__all__ = ["VMADDR_CID_HOST", "ListeningSocket", "VsockBridge", "local_cid", "vsock_listener"]

log = logging.getLogger(__name__)

VMADDR_CID_HOST = 2
# linux/vm_sockets.h: IOCTL_VM_SOCKETS_GET_LOCAL_CID = _IO(7, 0xb9)
_GET_LOCAL_CID = 0x7B9


class ListeningSocket(Protocol):
    """A non-blocking listening socket whose accept() returns (conn, (cid, port))."""

    def fileno(self) -> int: ...
    def accept(self) -> tuple[socket.socket, Any]: ...
    def close(self) -> None: ...


ListenerFactory = Callable[[int], ListeningSocket]


def vsock_listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def local_cid(dev_vsock: Path = Path("/dev/vsock")) -> int | None:
    """This guest's CID, for telling the host where to connect; None if unknown."""
    try:
        with open(dev_vsock, "rb") as dev:
            buf = array.array("I", [0])
            fcntl.ioctl(dev, _GET_LOCAL_CID, buf, True)
            return int(buf[0])
    except OSError:
        return None


class VsockBridge:
    transport = "vsock"

    def __init__(
        self,
        port: int,
        backend: Path | str,
        *,
        allowed_cids: Iterable[int] = (VMADDR_CID_HOST,),
        listener_factory: ListenerFactory = vsock_listener,
        max_connections: int = 32,
        cid: int | None = None,
    ) -> None:
        self.port = port
        self._backend = str(backend)
        self.allowed_cids = frozenset(allowed_cids)
        self._factory = listener_factory
        self._max = max_connections
        self.address = f"vsock:{cid if cid is not None else 'any'}:{port}"
        self._sock: ListeningSocket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.refused = 0

    async def start(self) -> None:
        sock = self._factory(self.port)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_accept)
        log.info(
            "vsock bridge on port %d -> %s (allowed CIDs: %s)",
            self.port,
            self._backend,
            ",".join(map(str, sorted(self.allowed_cids))),
        )

    async def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_accept(self) -> None:
        while self._sock is not None:
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # e.g. ECONNABORTED, EMFILE: keep listening
                log.warning("vsock accept failed: %s", exc)
                return
            cid = peer[0] if isinstance(peer, tuple) and peer else None
            if cid not in self.allowed_cids:
                self.refused += 1
                log.warning(
                    "vsock connection from CID %s refused (allowed: %s)",
                    cid,
                    ",".join(map(str, sorted(self.allowed_cids))),
                )
                conn.close()
                continue
            if len(self._tasks) >= self._max:
                self.refused += 1
                log.warning("vsock connection from CID %s refused: %d connections open", cid, len(self._tasks))
                conn.close()
                continue
            self.accepted += 1
            task = asyncio.get_running_loop().create_task(self._carry(conn, cid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _carry(self, conn: socket.socket, cid: int) -> None:
        conn.setblocking(False)
        client = await asyncio.open_connection(sock=conn)
        try:
            backend = await asyncio.open_unix_connection(self._backend)
        except OSError as exc:
            log.warning("vsock connection from CID %d: cannot reach the agent at %s: %s", cid, self._backend, exc)
            await close_writer(client[1])
            return
        with contextlib.suppress(OSError):
            await splice(client, backend, label=f"vsock CID {cid}")
