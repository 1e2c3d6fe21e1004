"""The agent's gRPC server and its lifecycle (what `unplugd serve` runs).

The server always listens on a root-only unix socket; beside it, the report
socket answers `unplugd inspect` (daemon/reportserver.py: JSON, no gRPC). The transport bridges
(vsock, virtio-serial: agent/transports) carry remote connections to it.
They are started through one hook, `start_bridges(config, socket)`, which
returns a BridgeSet: its listeners (for GetAgentInfo) and stop(). TCP is
served by grpc itself, only with mutual TLS (transports/tls.py).

Start fails (ServeError) when a transport the config enables cannot be
served (TLS files unusable, the vsock port not bound); health turns SERVING,
and `serve` tells systemd READY=1, only once every one is up. The
virtio-serial bridge waits for its port, which may appear later.

Shutdown (SIGTERM, SIGINT): health NOT_SERVING, bridges stopped, watch
streams ended, in-flight calls given a grace period, every lease released,
the sockets removed. A crash or SIGKILL still frees the device claims: the
kernel drops them with the process's file descriptors.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import grpc

from unplugd.agent.config import Config
from unplugd.agent.daemon.events import EventSources
from unplugd.agent.daemon.reportserver import ReportServer
from unplugd.agent.daemon.scans import Coalescer, CoalescingEngine, EngineApi, ModuleEngine
from unplugd.agent.errors import AgentError
from unplugd.agent.mutations.leases import LeaseManager
from unplugd.agent.mutations.links import LinkControl, NetlinkLinks
from unplugd.agent.roots import Roots
from unplugd.agent.rpc.errors import DecodeGuard, guard_registered
from unplugd.agent.rpc.health import HealthRegistry, add_health
from unplugd.agent.rpc.reflection import add_reflection
from unplugd.agent.rpc.service import AgentServicer
from unplugd.agent.rpc.watch import ReportHub
from unplugd.agent.transports.listener import Listener
from unplugd.v1 import agent_service_pb2, agent_service_pb2_grpc

__all__ = [
    "AgentServer",
    "BridgeSet",
    "BridgeStarter",
    "ServeError",
    "start_bridges",
]

log = logging.getLogger(__name__)

AGENT_SERVICE = agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name

# The report socket's client reads as soon as bytes come (a report of 2,000 processes, ~1 MB,
# takes milliseconds); one that has not taken the answer in this long is not going to, and
# holds a worker until then.
REPORT_WRITE_TIMEOUT_S = 10.0
# Connections the kernel queues for the report socket while its slots are busy; past them a
# client's connect fails at once and it scans for itself.
REPORT_BACKLOG = 64


if TYPE_CHECKING:
    from unplugd.agent.rpc.errors import _Generic, _Handler


class _DecodeGuarded:
    """The server as the add_*_to_server functions see it: each handler they add answers a
    request that does not parse with INVALID_ARGUMENT and one log line (rpc/errors.py)."""

    def __init__(self, server: grpc.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[_Generic]) -> None:
        self._server.add_generic_rpc_handlers(tuple(DecodeGuard(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, _Handler]) -> None:
        # absent from grpc-stubs 1.53; present since grpcio 1.62, which calls it for newer generated code
        self._server.add_registered_method_handlers(service, guard_registered(service, handlers))  # type: ignore[attr-defined,unused-ignore]


class ServeError(AgentError):
    """The server could not start (socket in use, bad path, ...)."""


class BridgeSet(Protocol):
    @property
    def listeners(self) -> Sequence[Listener]: ...

    def stop(self) -> None: ...


BridgeStarter = Callable[[Config, Path], BridgeSet]


class _NoBridges:
    listeners: Sequence[Listener] = ()

    def stop(self) -> None:
        pass


def start_bridges(config: Config, backend: Path) -> BridgeSet:
    """The hook: start the bridges the config enables (vsock, virtio-serial) in front of `backend`.

    agent/transports/bridges.py implements it; TCP is no bridge (grpc does
    the mutual TLS itself, see AgentServer._add_tcp).
    """
    tr = config.transports
    if not (tr.vsock.enabled or tr.virtio_serial.enabled):
        return _NoBridges()
    from unplugd.agent.transports import bridges  # type: ignore[attr-defined,unused-ignore]

    started: BridgeSet = bridges.start_bridges(config, backend)
    return started


class AgentServer:
    """The agent's gRPC server on its unix socket; easy to start from a script or test."""

    def __init__(
        self,
        config: Config,
        *,
        roots: Roots | None = None,
        engine: EngineApi | None = None,
        sources: Callable[[], EventSources] | None = None,
        links: LinkControl | None = None,
        bridges: BridgeStarter = start_bridges,
        report_json: Callable[[], bytes] | None = None,
    ) -> None:
        self.config = config
        self.roots = roots if roots is not None else Roots.live_system()
        # Concurrent GetReports (and the watcher) share scans instead of stacking them.
        self.engine = CoalescingEngine(
            engine if engine is not None else ModuleEngine(exclusive_probe=config.readiness.exclusive_probe)
        )
        self._links = links if links is not None else (NetlinkLinks() if self.roots.live else None)
        self._bridge_starter = bridges
        self._bridges: BridgeSet = _NoBridges()
        self._tcp: list[Listener] = []
        self._server: grpc.Server | None = None
        self._health: HealthRegistry | None = None
        self._socket_id: tuple[int, int] | None = None
        # The report socket's answer (tests hand in their own); its scans shared like GetReport's.
        self._report_json = report_json if report_json is not None else self._fresh_report_json
        self._report_rounds: Coalescer[bytes] = Coalescer()
        self._report: ReportServer | None = None
        self._report_id: tuple[int, int] | None = None
        if sources is None:
            live, cap = self.roots, config.watch.max_namespace_fds
            sources = (lambda: EventSources(live, max_namespace_fds=cap)) if live.live else EventSources.none
        self.hub = ReportHub(
            self._produce,
            sources=sources,
            debounce=config.watch.debounce_seconds,
            rescan_seconds=config.watch.fd_rescan_seconds,
        )
        self.leases = LeaseManager(
            self.roots,
            default_seconds=config.mutations.default_lease_seconds,
            max_seconds=config.mutations.max_lease_seconds,
            links=self._links,
            on_change=self.hub.poke,
        )

    @property
    def socket_path(self) -> Path:
        return self.config.server.socket

    @property
    def target(self) -> str:
        """What grpc.insecure_channel() takes to reach this server."""
        return f"unix:{self.socket_path}"

    def _produce(self) -> Any:
        return self.engine.inspect(self.roots, (), leased=self.leases.leased(), own_claims=self.leases.own_claims())

    def _fresh_report_json(self) -> bytes:
        """What `unplugd inspect --json` prints (compact), for this system now, with the agent's
        leases and [readiness] exclusive_probe."""
        from unplugd.agent import engine
        from unplugd.agent.reportdata import to_json

        data = engine.inspect_data(
            self.roots,
            (),
            leased=self.leases.leased(),
            own_claims=self.leases.own_claims(),
            exclusive_probe=self.config.readiness.exclusive_probe,
        )
        return to_json(data, indent=None).encode()

    def _report_answer(self) -> bytes:
        # Each connection gets the first run that starts after it came (Coalescer): fresh, never cached.
        return self._report_rounds.run("report", self._report_json)

    def listeners(self) -> list[Listener]:
        return [Listener("unix", str(self.socket_path)), *self._tcp, *self._bridges.listeners]

    def start(self) -> None:
        path = self.socket_path
        _prepare_socket_path(path)
        cfg = self.config.server
        workers = futures.ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="unplugd-rpc")
        server = grpc.server(
            workers,
            # Calls past the workers wait in grpc's queue (a few KiB each); past
            # max_queued_calls more, refuse (RESOURCE_EXHAUSTED) rather than queue without bound.
            maximum_concurrent_rpcs=cfg.max_workers + cfg.max_queued_calls,
        )
        servicer = AgentServicer(
            roots=self.roots,
            engine=self.engine,
            config=self.config,
            leases=self.leases,
            hub=self.hub,
            listeners=self.listeners,
        )
        guarded = cast(grpc.Server, _DecodeGuarded(server))
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(servicer, guarded)
        self._health = add_health(guarded)
        # grpc's health service starts with "" SERVING: not before every transport is up.
        self._health.set("", False)
        self._health.set(AGENT_SERVICE, False)
        add_reflection(guarded, [agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"]])
        self._add_tcp(server)
        old_umask = os.umask(0o177)  # the socket is born root-only, never briefly open
        try:
            try:
                bound = server.add_insecure_port(self.target)
            except RuntimeError as exc:
                raise ServeError(f"cannot listen on {path}: {exc}") from exc
            if not bound:
                raise ServeError(f"cannot listen on {path}")
            server.start()
        finally:
            os.umask(old_umask)
        self._socket_id = _own_socket(path, cfg.socket_mode)
        self._server = server
        self._start_report_socket(workers)
        try:
            self._bridges = self._bridge_starter(self.config, path)
        except AgentError as exc:
            raise ServeError(str(exc)) from exc
        # Healthy only now: every transport the config enables is up (stop() undoes a failed start).
        self._health.set("", True)
        self._health.set(AGENT_SERVICE, True)
        log.info(
            "serving",
            extra={
                "socket": str(path),
                "report_socket": str(self.config.server.report_socket),
                "mutations": self.config.mutations.enabled,
                "config": self.config.source,
                "listeners": ",".join(f"{x.transport}:{x.address}" for x in self.listeners()),
            },
        )

    def _start_report_socket(self, workers: futures.ThreadPoolExecutor) -> None:
        """The report socket beside the gRPC one, made the same way (a stale one replaced, another
        agent's refused, born with the socket's mode), answered in the gRPC workers."""
        cfg = self.config.server
        path = cfg.report_socket
        _prepare_socket_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
            sock.listen(REPORT_BACKLOG)
        except OSError as exc:
            sock.close()
            raise ServeError(f"cannot listen on {path}: {exc}") from exc
        finally:
            os.umask(old_umask)
        self._report_id = _own_socket(path, cfg.socket_mode)
        # Half the workers that watch streams cannot take (8 of the default 16): GetReport and the
        # other calls keep the rest even while every report slot waits on a client.
        slots = max(1, (cfg.max_workers - cfg.max_watchers) // 2)
        self._report = ReportServer(
            sock, self._report_answer, workers.submit, slots=slots, write_timeout_s=REPORT_WRITE_TIMEOUT_S
        )
        self._report.start()

    def _add_tcp(self, server: grpc.Server) -> None:
        tcp = self.config.transports.tcp
        if not tcp.enabled:
            return
        from unplugd.agent.transports.tls import add_mtls_port  # type: ignore[import-not-found,unused-ignore]

        try:
            self._tcp = [Listener("tcp-mtls", add_mtls_port(server, tcp))]
        except AgentError as exc:
            # Enabled but unusable: no start at all rather than a healthy agent the host cannot reach.
            raise ServeError(f"TCP with mutual TLS cannot be served: {exc}") from exc

    def stop(self, grace: float = 2.0) -> None:
        if self._health is not None:
            self._health.shutdown()
        with _logged("stopping bridges"):
            self._bridges.stop()
        self._bridges = _NoBridges()
        if self._report is not None:
            self._report.stop()
            self._report = None
        if self._report_id is not None:
            _remove_own_socket(self.config.server.report_socket, self._report_id)
            self._report_id = None
        self.hub.close()
        if self._server is not None:
            self._server.stop(grace).wait(grace + 1)
            self._server = None
        self.leases.release_all()
        if self._socket_id is not None:
            _remove_own_socket(self.socket_path, self._socket_id)
            self._socket_id = None
        if isinstance(self._links, NetlinkLinks):
            self._links.close()
        log.info("stopped")

    def __enter__(self) -> AgentServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=0.5)


@contextlib.contextmanager
def _logged(what: str) -> Any:
    try:
        yield
    except Exception:
        log.exception("%s failed", what)


def _prepare_socket_path(path: Path) -> None:
    """Make the directory, and clear a stale socket left by a killed agent.

    A socket someone still answers on means another agent runs: refuse. Any
    other kind of file at the path is not ours to remove.
    """
    if not path.is_absolute():
        raise ServeError(f"socket path must be absolute: {path}")
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:  # a file where a directory should be, a read-only /run: say which
        raise ServeError(f"cannot make the socket's directory {path.parent}: {exc.strerror or exc}") from exc
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeError(f"{path} exists and is not a socket; not removing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ServeError(f"cannot tell whether {path} is in use: {exc}") from exc
        else:
            raise ServeError(f"another agent is listening on {path}")
    log.info("removing stale socket", extra={"socket": str(path)})
    path.unlink(missing_ok=True)


def _own_socket(path: Path, mode: int) -> tuple[int, int]:
    """Give the socket just bound its configured mode; its identity, so that stop removes this
    socket and never one a later agent made at the same path (_remove_own_socket)."""
    os.chmod(path, mode)
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _remove_own_socket(path: Path, ident: tuple[int, int]) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == ident:  # not a successor's socket
        path.unlink(missing_ok=True)
