"""Start the bridges the config enables; rpc/server.py's hook `start_bridges(config, backend)`.

The bridges are asyncio code; the agent's gRPC server is threaded, so they
run on their own event loop in one background thread. A bridge that cannot
start (no AF_VSOCK in this kernel, port taken) fails the whole start with
BridgeError: an agent that says it serves while the host cannot reach it is
worse than one that does not start. The virtio-serial bridge never fails to
start: its port may appear after the agent (at boot, on hotplug of the
channel), so it waits for it. TCP is not a bridge: grpc terminates mutual
TLS itself (tls.add_mtls_port), the server adds that port.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from unplugd.agent.config import Config
from unplugd.agent.errors import AgentError
from unplugd.agent.roots import Roots
from unplugd.agent.transports.listener import Listener
from unplugd.agent.transports.virtio_serial import DevicePort, VirtioSerialBridge, port_path
from unplugd.agent.transports.vsock import ListenerFactory, VsockBridge, local_cid, vsock_listener

__all__ = ["Bridge", "BridgeError", "BridgeThread", "make_bridges", "start_bridges"]

log = logging.getLogger(__name__)


class BridgeError(AgentError):
    """An enabled bridge could not start."""


class Bridge(Protocol):
    transport: str
    address: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def make_bridges(
    config: Config,
    backend: Path,
    *,
    roots: Roots | None = None,
    vsock_factory: ListenerFactory = vsock_listener,
) -> list[Bridge]:
    """The bridges the config enables, not started."""
    tr = config.transports
    out: list[Bridge] = []
    if tr.vsock.enabled:
        out.append(
            VsockBridge(
                tr.vsock.port,
                backend,
                allowed_cids=tr.vsock.allowed_cids,
                listener_factory=vsock_factory,
                cid=local_cid(),
            )
        )
    if tr.virtio_serial.enabled:
        dev = (roots or Roots.live_system()).dev
        path = port_path(dev, tr.virtio_serial.name)
        out.append(VirtioSerialBridge(lambda: DevicePort(path), backend, address=str(path)))
    return out


class BridgeThread:
    """Runs bridges on a private event loop in a daemon thread."""

    def __init__(self, bridges: Sequence[Bridge], *, name: str = "unplugd-bridges") -> None:
        self._bridges = list(bridges)
        self._running: list[Bridge] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)

    @property
    def listeners(self) -> Sequence[Listener]:
        return [Listener(b.transport, b.address) for b in self._running]

    def start(self, timeout: float = 10.0) -> None:
        """Start every bridge; BridgeError (and none left running) if one cannot start."""
        self._thread.start()
        for bridge in self._bridges:
            try:
                asyncio.run_coroutine_threadsafe(bridge.start(), self._loop).result(timeout)
            except Exception as exc:
                self.stop()
                raise BridgeError(
                    f"{bridge.transport} bridge on {bridge.address} cannot start: "
                    f"{getattr(exc, 'strerror', None) or exc}"
                ) from exc
            self._running.append(bridge)

    def stop(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        for bridge in reversed(self._running):
            try:
                asyncio.run_coroutine_threadsafe(bridge.stop(), self._loop).result(timeout)
            except Exception as exc:
                log.warning("%s bridge on %s did not stop cleanly: %s", bridge.transport, bridge.address, exc)
        self._running.clear()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the bridges' loop (tests, stats)."""
        self._loop.call_soon_threadsafe(fn)


def start_bridges(
    config: Config, backend: Path, *, roots: Roots | None = None, vsock_factory: ListenerFactory = vsock_listener
) -> BridgeThread:
    """rpc/server.py's hook: start every enabled bridge in front of `backend`; BridgeError if one cannot."""
    thread = BridgeThread(make_bridges(config, backend, roots=roots, vsock_factory=vsock_factory))
    thread.start()
    return thread
