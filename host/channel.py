"""The agent's virtio-serial port through libvirt itself: virDomainOpenChannel, local or remote.

A `<channel type='unix'>` is a socket on the hypervisor: from a management host (`--connect
qemu+ssh://hv/system`) its path means nothing. libvirt opens the same port for us as a virStream
carried over the connection we already have (`dom.openChannel(name, stream, flags)`): no daemon,
no port on the hypervisor. ChannelRelay speaks the framed session protocol over that stream,
exactly as SerialRelay does over the socket (it is a SerialRelay with another way in).

What libvirt 9.0 answered here (tests/integration/test_libvirt_remote.py asserts each):
- openChannel works for the `<channel type='unix'>` (mode bind) our domains use, over
  qemu+tcp:// and over the local socket alike;
- a second openChannel while a stream holds the port: VIR_ERR_OPERATION_FAILED "Active channel
  stream exists for this domain"; with VIR_DOMAIN_CHANNEL_FORCE it takes the port and the old
  stream fails ("stream had I/O failure"). FORCE only on --force-channel;
- a client connected to the socket itself (not through libvirt) is invisible to libvirt: the open
  succeeds, the guest never answers, and the relay says so after its connect timeout;
- a blocked virStreamRecv returns at once on virStreamAbort, and with an error when the
  connection drops (libvirtd gone: "End of file while reading data").

So the stream is used blocking, one thread each way, bridged to asyncio through a socketpair;
ending a session aborts the stream, which frees both threads.

Local URIs keep using the socket path (unplugctl's behaviour before this module, measured
fastest and independent of libvirtd's stream bookkeeping); `--agent-channel libvirt` forces the
stream on a local URI too, `--agent-channel socket` the path on a remote one (an ssh tunnel).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import urlsplit

from unplugd.host.backends.libvirt import in_thread
from unplugd.host.errors import BackendError
from unplugd.host.relays import RelayError, SerialRelay, Streams
from unplugd.splice import close_writer

__all__ = ["ChannelRelay", "Route", "StreamOpener", "is_remote_uri", "route"]

log = logging.getLogger(__name__)

Route = Literal["socket", "libvirt"]
# (force) -> a blocking virStream on the agent's port, opened by the backend on its connection
StreamOpener = Callable[[bool], Awaitable[Any]]

_CHUNK = 64 * 1024  # bytes per virStreamRecv: one frame's payload at most (framing.MAX_PAYLOAD) plus headers
_CAUSE_GRACE = 1.0  # seconds a failed send waits for the receiving side to report why the stream ended
# libvirt's "another stream holds this channel" (qemuDomainOpenChannel -> virChrdevOpen)
_HELD = "active channel stream exists"


def is_remote_uri(uri: str) -> bool:
    """Does `uri` reach libvirtd over a network transport, where the hypervisor's socket paths are
    not ours to open? libvirt's rules: a transport other than unix (tcp, tls, ssh, libssh, ext),
    or a host name with no transport (TLS). Pure."""
    scheme = uri.partition(":")[0]
    transport = scheme.partition("+")[2].lower()
    if transport:
        return transport != "unix"
    try:
        host = urlsplit(uri).hostname
    except ValueError:
        return False
    return bool(host)


def route(uri: str, choice: str, socket_path: str | None) -> Route | None:
    """How to reach the agent's channel: "socket" (its path), "libvirt" (a virStream), or None (no
    channel). `choice`: auto | socket | libvirt (--agent-channel). Pure."""
    if socket_path is None:
        return None
    if choice == "socket":
        return "socket"
    if choice == "libvirt" or is_remote_uri(uri):
        return "libvirt"
    return "socket"


class _StreamBridge:
    """A blocking virStream as one end of a socketpair: a thread each way, both ended by abort."""

    def __init__(self, stream: Any, label: str) -> None:
        self.stream = stream
        self.ours, self._theirs = socket.socketpair()
        self.error: str | None = None
        self._error_is_cause = False
        self._ended = threading.Event()
        self._threads = [
            threading.Thread(target=self._up, name=f"channel-up {label}", daemon=True),
            threading.Thread(target=self._down, name=f"channel-down {label}", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _up(self) -> None:
        """Our socket -> the stream."""
        import libvirt

        try:
            while data := self._theirs.recv(_CHUNK):
                view = memoryview(data)
                while view:
                    sent = self.stream.send(bytes(view))
                    view = view[sent:]
        except (OSError, libvirt.libvirtError) as exc:
            self._fail(exc)
            # A failed send says only that the stream is gone; the receiving side hears why (end of
            # file, keepalive timeout). Give it a moment to say so before our abort silences it.
            self._ended.wait(_CAUSE_GRACE)
        finally:
            self.end()

    def _down(self) -> None:
        """The stream -> our socket, until end of stream or an error (connection gone, abort)."""
        import libvirt

        try:
            while True:
                try:
                    data = self.stream.recv(_CHUNK)
                except (OSError, libvirt.libvirtError) as exc:
                    self._fail(exc, cause=True)
                    break
                if not data:
                    break
                self._theirs.sendall(data)
        except OSError as exc:
            self._fail(exc)
        finally:
            self.end()

    def _fail(self, exc: BaseException, *, cause: bool = False) -> None:
        """Keep the best reason: what the stream said when it ended beats a write that failed."""
        if self._ended.is_set():
            return  # our own abort woke the thread: not an error
        msg = exc.get_error_message() if hasattr(exc, "get_error_message") else str(exc)
        msg = msg or type(exc).__name__
        if cause and not self._error_is_cause:
            self.error, self._error_is_cause = msg, True
        elif self.error is None:
            self.error = msg

    def end(self) -> None:
        """Abort the stream (frees a thread blocked in recv or send) and close our side; idempotent."""
        if self._ended.is_set():
            return
        self._ended.set()
        with contextlib.suppress(Exception):
            self.stream.abort()
        with contextlib.suppress(OSError):
            self._theirs.shutdown(socket.SHUT_RDWR)

    def join(self) -> None:
        self.end()
        for t in self._threads:
            t.join()
        self._theirs.close()


class ChannelRelay(SerialRelay):
    """The agent's virtio-serial port opened through libvirt (a virStream), not its socket path."""

    def __init__(
        self,
        opener: StreamOpener,
        label: str,
        *,
        force: bool = False,
        connect_timeout: float = 5.0,
        open_retry: float = 0.5,
    ) -> None:
        super().__init__(label, connect_timeout=connect_timeout, open_retry=open_retry)
        self.label = label
        self.force = force
        self._opener = opener
        self._bridge: _StreamBridge | None = None

    @property
    def target(self) -> str:
        return f"libvirt channel {self.label}"

    async def _connect(self) -> Streams:
        try:
            stream = await self._reach(self._opener(self.force), "libvirt did not open the channel")
        except BackendError as exc:
            hint = ""
            if _HELD in str(exc).lower():
                hint = " (another client holds the agent's channel through libvirt; --force-channel takes it over)"
            raise RelayError(f"{self.target}: {exc}{hint}") from exc
        bridge = self._bridge = _StreamBridge(stream, self.label)
        try:
            return await asyncio.open_unix_connection(sock=bridge.ours)
        except BaseException:
            await in_thread(bridge.join)
            bridge.ours.close()
            raise

    async def _disconnect(self, chardev: Streams) -> None:
        await close_writer(chardev[1])
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            await in_thread(bridge.join)
            if bridge.error:
                # grpc sees only a closed connection: this is the reason it will be given
                self.last_error = f"{self.target}: the stream broke: {bridge.error}"

    def _closed_why(self) -> str:
        bridge = self._bridge
        if bridge is not None and bridge.error:
            return f"the stream broke: {bridge.error}"
        return "libvirt closed the channel's stream"
