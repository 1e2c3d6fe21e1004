"""AgentClient: the host's gRPC client of the guest agent, over any transport.

Addresses:
    unix:/path                    the agent's unix socket (local tools, tests)
    vsock:CID:PORT                AF_VSOCK to the guest
    hvsock:/path/to/vmm.sock:PORT Firecracker / cloud-hypervisor hybrid vsock
    serial:/path/to/chardev.sock  QEMU chardev socket of the virtio-serial port
                                  (libvirt <channel type='unix'> path)
    tcp:HOST:PORT                 TCP, only with mutual TLS (TlsFiles)

grpcio dials only unix and TCP; the others go through a relay (relays.py) on
a private unix socket. Every call has a deadline; an agent that cannot be
reached or does not answer in time raises AgentUnreachable, any other failure
AgentCallFailed with the gRPC status code; both are AgentClientError, a
HostError (the tree: host/errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypedDict, TypeVar, Unpack, cast

import grpc
import grpc.aio

from unplugd.host.errors import HostError

if TYPE_CHECKING:
    # relays.py (framing, splice), and tempfile, shutil and pathlib for its directory, are imported
    # when an address needs a relay: not for unix: ones (~5 ms before the first request).
    from pathlib import Path

    # The messages (protobuf, ~25 ms) come with the first call that needs them (each imports them):
    # start_report's request goes out without them, so they load while the agent scans.
    from unplugd.host.relays import Relay
    from unplugd.v1 import agent_service_pb2 as pb
    from unplugd.v1 import agent_service_pb2_grpc as pb_grpc
    from unplugd.v1 import report_pb2

__all__ = [
    "AGENT_CALL_ERRORS",
    "RELEASE_MARGIN",
    "AgentAddress",
    "AgentCallFailed",
    "AgentClient",
    "AgentClientError",
    "AgentOptions",
    "AgentUnreachable",
    "SyncAgentClient",
    "TlsFiles",
    "parse_address",
]

# "channel": the agent's virtio-serial port opened through libvirt (host/channel.py), never parsed from
# the command line; `path` says which port of which domain on which connection, for messages.
Kind = Literal["unix", "vsock", "hvsock", "serial", "tcp", "channel"]
_T = TypeVar("_T")

# Reconnect quickly: a guest agent restarts in about a second. (Not
# grpc.min_reconnect_backoff_ms: grpc also uses it as the connect timeout,
# and a relay's handshake with the guest is part of connecting.)
_CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


# start_report's call, made before the messages are imported: the method's path in the generated stub
# (agent_service_pb2_grpc) and an empty GetReportRequest's wire form, which is no bytes at all
# (tests/unit/test_client_unix.py holds both to the generated code).
GET_REPORT_METHOD = "/unplugd.v1.AgentService/GetReport"
EMPTY_REQUEST = b""


# How much longer than its deadline a RequestRelease may take: the agent takes one report after
# the hooks even when they used the deadline up (release.FIRST_REPORT_GRACE, 10 s), plus transport.
RELEASE_MARGIN = 15.0


class AgentClientError(HostError):
    """Root of the agent client's errors."""


class AgentUnreachable(AgentClientError):
    def __init__(self, address: str, cause: str) -> None:
        super().__init__(f"agent at {address} is unreachable: {cause}")
        self.address = address
        self.cause = cause


class AgentCallFailed(AgentClientError):
    """The agent answered with an error; `code` is the grpc.StatusCode."""

    def __init__(self, address: str, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method} on {address} failed: {code.name}: {details}")
        self.address = address
        self.method = method
        self.code = code
        self.details = details


# What a caller of the agent may see go wrong: the client's own errors, the caller's wait_for
# deadlines, sockets. The orchestrator and plugging turn these into outcomes, never tracebacks.
AGENT_CALL_ERRORS = (AgentClientError, TimeoutError, OSError)


@dataclass(frozen=True)
class AgentAddress:
    kind: Kind
    path: str = ""  # unix socket, hybrid-vsock socket or chardev socket
    cid: int = 0
    port: int = 0
    host: str = ""

    def __str__(self) -> str:
        if self.kind in ("unix", "serial", "channel"):
            return f"{self.kind}:{self.path}"
        if self.kind == "vsock":
            return f"vsock:{self.cid}:{self.port}"
        if self.kind == "hvsock":
            return f"hvsock:{self.path}:{self.port}"
        return f"tcp:{self.host}:{self.port}"


def _number(text: str, what: str, address: str, limit: int) -> int:
    if not text.isdigit() or not 0 <= int(text) <= limit:
        raise ValueError(f"{address!r}: {what} must be a number up to {limit}, not {text!r}")
    return int(text)


def parse_address(text: str) -> AgentAddress:
    """Parse an agent address (see the module docstring); ValueError says what is wrong."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError(
            f"{text!r}: expected unix:PATH, vsock:CID:PORT, hvsock:PATH:PORT, serial:PATH or tcp:HOST:PORT"
        )
    if kind in ("unix", "serial"):
        return AgentAddress(kind, path=rest)  # type: ignore[arg-type]
    if kind == "vsock":
        cid, _, port = rest.partition(":")
        return AgentAddress(
            "vsock", cid=_number(cid, "CID", text, 0xFFFFFFFF), port=_number(port, "port", text, 0xFFFFFFFF)
        )
    if kind in ("hvsock", "tcp"):
        head, _, port = rest.rpartition(":")
        if not head:
            raise ValueError(f"{text!r}: expected {kind}:{'PATH' if kind == 'hvsock' else 'HOST'}:PORT")
        number = _number(port, "port", text, 0xFFFFFFFF if kind == "hvsock" else 65535)
        if kind == "hvsock":
            return AgentAddress("hvsock", path=head, port=number)
        return AgentAddress("tcp", host=head.removeprefix("[").removesuffix("]"), port=number)
    raise ValueError(f"{text!r}: unknown transport {kind!r} (unix, vsock, hvsock, serial, tcp)")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for mutual TLS: the CA that signed the agent's certificate, our chain and key."""

    ca: Path
    cert: Path
    key: Path

    def credentials(self) -> grpc.ChannelCredentials:
        try:
            return grpc.ssl_channel_credentials(
                root_certificates=self.ca.read_bytes(),
                private_key=self.key.read_bytes(),
                certificate_chain=self.cert.read_bytes(),
            )
        except OSError as exc:
            raise ValueError(f"TLS file {exc.filename}: {exc.strerror}") from exc


class AgentOptions(TypedDict, total=False):
    """How to reach the agent: the keyword arguments of AgentClient and SyncAgentClient."""

    timeout: float  # seconds each call may take (default 10)
    connect_timeout: float  # seconds to connect, a relay's handshake included (default 5)
    tls: TlsFiles | None  # mutual TLS; tcp: addresses need it
    tls_server_name: str | None  # the name in the agent's certificate, when it is not the address's host


def _relay_for(address: AgentAddress, connect_timeout: float) -> Relay | None:
    from unplugd.host.relays import HybridVsockRelay, SerialRelay, VsockRelay

    if address.kind == "vsock":
        return VsockRelay(address.cid, address.port, connect_timeout=connect_timeout)
    if address.kind == "hvsock":
        return HybridVsockRelay(address.path, address.port, connect_timeout=connect_timeout)
    if address.kind == "serial":
        return SerialRelay(address.path, connect_timeout=connect_timeout)
    return None


class AgentClient:
    """Async client of one agent. Use as `async with AgentClient(addr) as c:`."""

    def __init__(
        self, address: str | AgentAddress, *, relay: Relay | None = None, **options: Unpack[AgentOptions]
    ) -> None:
        """`relay` replaces the one the address implies (tests, custom transports)."""
        if unknown := options.keys() - AgentOptions.__optional_keys__:  # what a signature would refuse
            raise TypeError(f"AgentClient() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        self.address = parse_address(address) if isinstance(address, str) else address
        self._tls = options.get("tls")
        if self.address.kind == "tcp" and self._tls is None:
            raise ValueError(f"{self.address}: the agent serves TCP only with mutual TLS: give the CA, cert and key")
        self.timeout = options.get("timeout", 10.0)
        self.connect_timeout = options.get("connect_timeout", 5.0)
        self._tls_server_name = options.get("tls_server_name")
        self._relay: Relay | None = None
        self._custom_relay = relay
        self._relay_dir: Path | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.AgentServiceAsyncStub | None = None
        self._early: asyncio.Future[report_pb2.Report] | None = None  # start_report()'s call

    async def __aenter__(self) -> AgentClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connection -----------------------------------------------------
    async def connect(self) -> None:
        """Set up the channel (and relay); cheap, does not contact the agent."""
        if self._channel is not None:
            return
        addr = self.address
        options = list(_CHANNEL_OPTIONS)
        if addr.kind == "tcp":
            assert self._tls is not None
            if self._tls_server_name:
                options.append(("grpc.ssl_target_name_override", self._tls_server_name))
            host = f"[{addr.host}]" if ":" in addr.host else addr.host
            channel = grpc.aio.secure_channel(f"{host}:{addr.port}", self._tls.credentials(), options=options)
        else:
            target = addr.path
            # the relay gives up a little earlier than we do, so that its
            # reason (not just "timed out") reaches the caller
            relay = self._custom_relay or _relay_for(addr, self.connect_timeout * 0.8)
            if relay is None and addr.kind == "channel":
                raise ValueError(f"{addr}: a libvirt channel is reached only through its ChannelRelay")
            if relay is not None:
                import tempfile
                from pathlib import Path

                self._relay_dir = Path(tempfile.mkdtemp(prefix="unplugctl-relay-"))
                try:
                    target = str(await relay.start(self._relay_dir))
                except BaseException:
                    self._remove_relay_dir()
                    raise
                self._relay = relay
            # the authority is irrelevant on a unix socket; keep it stable
            options.append(("grpc.default_authority", "unplugd-agent"))
            # absolute as Path.absolute() makes it: joined to the working directory, not normalized
            channel = grpc.aio.insecure_channel(f"unix:{os.path.join(os.getcwd(), target)}", options=options)
        self._channel = channel

    async def close(self) -> None:
        early, self._early = self._early, None
        if early is not None:  # started and never asked for: its answer or error goes unread
            early.cancel()
            with contextlib.suppress(BaseException):
                await early
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close(None)
        relay, self._relay = self._relay, None
        if relay is not None:
            await relay.stop()
        self._remove_relay_dir()

    def _remove_relay_dir(self) -> None:
        if self._relay_dir is not None:
            import shutil

            shutil.rmtree(self._relay_dir, ignore_errors=True)
            self._relay_dir = None

    async def _ready_stub(self) -> pb_grpc.AgentServiceAsyncStub:
        """The stub once the channel is READY (_ready_channel)."""
        channel = await self._ready_channel()
        if self._stub is None:
            from unplugd.v1 import agent_service_pb2_grpc as pb_grpc

            # the generated class serves both APIs; the .pyi types the aio one separately
            self._stub = cast("pb_grpc.AgentServiceAsyncStub", pb_grpc.AgentServiceStub(channel))
        return self._stub

    async def _ready_channel(self) -> grpc.aio.Channel:
        """The channel once it is READY; fails on the first failed attempt or after connect_timeout."""
        await self.connect()
        channel = self._channel
        assert channel is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        state = channel.get_state(try_to_connect=True)
        # A failure counts once an attempt was made during this call (IDLE:
        # the get_state above starts one); a channel still backing off from
        # an earlier failure gets its next attempt first.
        attempted = False
        while state != grpc.ChannelConnectivity.READY:
            if state in (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING):
                attempted = True
            elif state == grpc.ChannelConnectivity.TRANSIENT_FAILURE and attempted and self._failed_for_good():
                raise self._unreachable("connection failed")
            elif state == grpc.ChannelConnectivity.SHUTDOWN:
                raise self._unreachable("client closed")
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError
                await asyncio.wait_for(channel.wait_for_state_change(state), left)
            except TimeoutError:
                raise self._unreachable(f"no connection within {self.connect_timeout:g}s") from None
            state = channel.get_state(try_to_connect=True)
        return channel

    def _failed_for_good(self) -> bool:
        """Whether a failed attempt ends the wait before connect_timeout.

        Direct sockets fail for a reason (refused, absent). A relay says why it failed (last_error)
        before it closes grpc's connection; a failure it did not explain is grpc's own handshake
        timer (20 s, whatever connect_timeout is) giving up while the relay still waits for a guest
        that may yet answer: an agent restarting, a bridge reopening its port. grpc dials again.
        """
        return self._relay is None or self._relay.last_error is not None

    def _unreachable(self, cause: str) -> AgentUnreachable:
        relay = self._relay
        relay_error = (relay.last_error or relay.waiting) if relay is not None else None
        if relay_error:
            cause = f"{relay_error} ({cause})"
        return AgentUnreachable(str(self.address), cause)

    def _translate(self, method: str, exc: grpc.aio.AioRpcError, timeout: float) -> AgentClientError:
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return self._unreachable(exc.details() or "unavailable")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return self._unreachable(f"{method} got no answer within {timeout:g}s")
        return AgentCallFailed(str(self.address), method, code, exc.details() or "")

    async def _unary(
        self, method: str, call: Callable[[pb_grpc.AgentServiceAsyncStub, float], Awaitable[_T]], timeout: float | None
    ) -> _T:
        stub = await self._ready_stub()
        deadline = self.timeout if timeout is None else timeout
        try:
            answer = await call(stub, deadline)
        except grpc.aio.AioRpcError as exc:
            raise self._translate(method, exc, deadline) from exc
        if answer is None:  # grpc.aio's answer when the stub could not parse the bytes (it logs why)
            raise self._undecodable(method)
        return answer

    def _undecodable(self, method: str) -> AgentCallFailed:
        """The agent's answer is no message of the method's type (a broken or hostile agent)."""
        return AgentCallFailed(
            str(self.address), method, grpc.StatusCode.INTERNAL, f"the answer is no {method} response"
        )

    # -- calls ----------------------------------------------------------
    async def start_report(self, *, timeout: float | None = None) -> None:
        """Ask for the full report now; the next get_report() of every device takes this answer.

        For a command whose first step reads the report (status, check, unplug): it returns once the
        request is with gRPC's core, which sends it and reads the answer from its own threads, so the
        agent's scan runs while this process imports and reads the rest (QEMU's topology). Errors
        come from that get_report(), as they would have.
        """
        if self._early is not None:
            return
        handed = asyncio.Event()
        self._early = asyncio.ensure_future(self._report_call(handed, timeout))
        await handed.wait()
        await asyncio.sleep(0)  # the call's own task runs once: that hands the request to the core

    async def _report_call(self, handed: asyncio.Event, timeout: float | None) -> report_pb2.Report:
        # bytes in and out: the request needs no protobuf, which is imported while the agent scans
        try:
            channel = await self._ready_channel()
            deadline = self.timeout if timeout is None else timeout
            # no (de)serializer: the request is these bytes and the answer comes back as bytes
            call = channel.unary_unary(GET_REPORT_METHOD, None, None)(EMPTY_REQUEST, timeout=deadline)
        finally:
            handed.set()
        try:
            answer = await call
        except grpc.aio.AioRpcError as exc:
            raise self._translate("GetReport", exc, deadline) from exc
        from google.protobuf.message import DecodeError

        from unplugd.v1 import agent_service_pb2 as pb

        try:
            return pb.GetReportResponse.FromString(answer).report
        except DecodeError:
            raise self._undecodable("GetReport") from None

    async def get_report(self, devices: Sequence[str] = (), *, timeout: float | None = None) -> report_pb2.Report:
        if not devices and self._early is not None:
            early, self._early = self._early, None
            return await early
        from unplugd.v1 import agent_service_pb2 as pb

        return await self._get_report(pb.GetReportRequest(devices=list(devices)), timeout)

    async def get_functions(self, *, timeout: float | None = None) -> report_pb2.Report:
        """Which PCI functions the guest has, unjudged (GetReport's functions_only): the agent's PCI
        scan alone, what confirming an unplug needs. An agent older than the field sends the full report."""
        from unplugd.v1 import agent_service_pb2 as pb

        return await self._get_report(pb.GetReportRequest(functions_only=True), timeout)

    async def _get_report(self, request: pb.GetReportRequest, timeout: float | None) -> report_pb2.Report:
        response: pb.GetReportResponse = await self._unary(
            "GetReport", lambda s, t: s.GetReport(request, timeout=t), timeout
        )
        return response.report

    async def get_agent_info(self, *, timeout: float | None = None) -> pb.GetAgentInfoResponse:
        from unplugd.v1 import agent_service_pb2 as pb

        request = pb.GetAgentInfoRequest()
        return await self._unary("GetAgentInfo", lambda s, t: s.GetAgentInfo(request, timeout=t), timeout)

    async def prepare_unplug(
        self,
        devices: Sequence[str],
        lease_seconds: int,
        take_interfaces_down: bool = False,
        *,
        lease_id: str = "",
        timeout: float | None = None,
    ) -> pb.PrepareUnplugResponse:
        """Claim the functions' block devices for `lease_seconds`; renew with `lease_id`."""
        from unplugd.v1 import agent_service_pb2 as pb

        request = pb.PrepareUnplugRequest(
            devices=list(devices),
            lease_seconds=lease_seconds,
            lease_id=lease_id,
            take_interfaces_down=take_interfaces_down,
        )
        return await self._unary("PrepareUnplug", lambda s, t: s.PrepareUnplug(request, timeout=t), timeout)

    async def release_unplug(self, lease_id: str, *, timeout: float | None = None) -> pb.ReleaseUnplugResponse:
        from unplugd.v1 import agent_service_pb2 as pb

        request = pb.ReleaseUnplugRequest(lease_id=lease_id)
        return await self._unary("ReleaseUnplug", lambda s, t: s.ReleaseUnplug(request, timeout=t), timeout)

    async def request_release(
        self, devices: Sequence[str], deadline_seconds: float, *, timeout: float | None = None
    ) -> pb.RequestReleaseResponse:
        """Ask the guest to release the functions (its release hooks, then a wait for READY) within
        `deadline_seconds`. `timeout` (default: the deadline plus RELEASE_MARGIN) bounds the call."""
        from unplugd.v1 import agent_service_pb2 as pb

        request = pb.RequestReleaseRequest(devices=list(devices), deadline_seconds=deadline_seconds)
        limit = deadline_seconds + RELEASE_MARGIN if timeout is None else timeout
        return await self._unary("RequestRelease", lambda s, t: s.RequestRelease(request, timeout=t), limit)

    async def watch_report(
        self, devices: Sequence[str] = (), *, timeout: float | None = None
    ) -> AsyncGenerator[pb.WatchReportResponse, None]:
        """The current report, then each change. The first message must come
        within the client's call timeout; `timeout` bounds the whole stream
        (None: until the caller stops iterating)."""
        from unplugd.v1 import agent_service_pb2 as pb

        stub = await self._ready_stub()
        call = stub.WatchReport(pb.WatchReportRequest(devices=list(devices)), timeout=timeout)
        first = True
        try:
            while True:
                try:
                    if first:
                        message = await asyncio.wait_for(call.read(), self.timeout)
                        first = False
                    else:
                        message = await call.read()
                except TimeoutError:
                    raise self._unreachable(f"WatchReport sent nothing within {self.timeout:g}s") from None
                except grpc.aio.AioRpcError as exc:
                    raise self._translate("WatchReport", exc, timeout or self.timeout) from exc
                if not isinstance(message, pb.WatchReportResponse):  # grpc.aio.EOF
                    return
                yield message
        finally:
            call.cancel()


class SyncAgentClient:
    """Blocking facade over AgentClient for scripts (not for use inside an event loop)."""

    def __init__(self, address: str | AgentAddress, **options: Unpack[AgentOptions]) -> None:
        self._client = AgentClient(address, **options)
        self._loop = asyncio.new_event_loop()
        self.address = self._client.address

    def __enter__(self) -> SyncAgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Awaitable[_T]) -> _T:
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._client.close())
            self._loop.close()

    def get_report(self, devices: Sequence[str] = (), *, timeout: float | None = None) -> report_pb2.Report:
        return self._run(self._client.get_report(devices, timeout=timeout))

    def get_agent_info(self, *, timeout: float | None = None) -> pb.GetAgentInfoResponse:
        return self._run(self._client.get_agent_info(timeout=timeout))

    def prepare_unplug(
        self,
        devices: Sequence[str],
        lease_seconds: int,
        take_interfaces_down: bool = False,
        *,
        lease_id: str = "",
        timeout: float | None = None,
    ) -> pb.PrepareUnplugResponse:
        return self._run(
            self._client.prepare_unplug(
                devices, lease_seconds, take_interfaces_down, lease_id=lease_id, timeout=timeout
            )
        )

    def release_unplug(self, lease_id: str, *, timeout: float | None = None) -> pb.ReleaseUnplugResponse:
        return self._run(self._client.release_unplug(lease_id, timeout=timeout))

    def request_release(
        self, devices: Sequence[str], deadline_seconds: float, *, timeout: float | None = None
    ) -> pb.RequestReleaseResponse:
        return self._run(self._client.request_release(devices, deadline_seconds, timeout=timeout))

    def watch_report(
        self, devices: Sequence[str] = (), *, timeout: float | None = None
    ) -> Generator[pb.WatchReportResponse, None, None]:
        stream = self._client.watch_report(devices, timeout=timeout)
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            with contextlib.suppress(RuntimeError):
                self._run(stream.aclose())
