"""AgentService: converts requests, calls the engine, leases and watcher, maps errors.

Thin on purpose: every decision lives in the engine (readiness), agent/mutations
(leases, and what PrepareUnplug does with a request) or watch.py (what changed
for a stream). Here: requests validated and converted, responses built, every
method run inside `_guard`, so any exception becomes a status through
rpc/errors.py and the server lives on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NoReturn, TypeVar

import grpc
from google.protobuf import timestamp_pb2

import unplugd
from unplugd.agent.config import Config
from unplugd.agent.daemon.resources import agent_resources
from unplugd.agent.daemon.scans import EngineApi
from unplugd.agent.errors import InvalidArgument, MutationDisabled, ReleaseDisabled
from unplugd.agent.mutations.leases import LeaseGrant, LeaseManager
from unplugd.agent.mutations.prepare import prepare_unplug, select_named
from unplugd.agent.mutations.release import FunctionState, HookRun, HookStatus, NextStates, Released, Releaser
from unplugd.agent.report import state_name
from unplugd.agent.roots import Roots
from unplugd.agent.rpc.errors import status_for
from unplugd.agent.rpc.watch import ReportHub
from unplugd.agent.transports.listener import Listener
from unplugd.text import wire_text
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import agent_service_pb2_grpc as pb_grpc
from unplugd.v1 import report_pb2

__all__ = ["MAX_NAMES", "MAX_NAME_LENGTH", "AgentServicer", "validate_names"]

log = logging.getLogger(__name__)

MAX_NAMES = 512
MAX_NAME_LENGTH = 256

_R = TypeVar("_R")


def validate_names(names: Sequence[str]) -> list[str]:
    """Reject what cannot be a device name; matching is the engine's job."""
    if len(names) > MAX_NAMES:
        raise InvalidArgument(f"too many devices ({len(names)}; at most {MAX_NAMES})")
    out: list[str] = []
    for name in names:
        if not name or not name.strip():
            raise InvalidArgument("empty device name")
        if len(name) > MAX_NAME_LENGTH:
            raise InvalidArgument(f"device name longer than {MAX_NAME_LENGTH} characters")
        if not name.isprintable():
            raise InvalidArgument(f"device name with control characters: {name!r}")
        out.append(name.strip())
    return out


class AgentServicer(pb_grpc.AgentServiceServicer):
    def __init__(
        self,
        *,
        roots: Roots,
        engine: EngineApi,
        config: Config,
        leases: LeaseManager,
        hub: ReportHub,
        listeners: Callable[[], Sequence[Listener]] = lambda: (),
    ) -> None:
        self._roots = roots
        self._engine = engine
        self._config = config
        self._leases = leases
        self._hub = hub
        self._listeners = listeners
        self._releaser = Releaser(engine, roots, leases, config.release)
        self._watchers = threading.BoundedSemaphore(max(config.server.max_watchers, 1))
        self._watching = 0  # open WatchReport streams, for GetAgentInfo
        self._watching_lock = threading.Lock()

    # -- read-only ------------------------------------------------------------------

    def GetReport(self, request: pb.GetReportRequest, context: grpc.ServicerContext) -> pb.GetReportResponse:
        def call() -> pb.GetReportResponse:
            names = validate_names(request.devices)
            if request.functions_only:
                if names:
                    raise InvalidArgument("functions_only names no devices: it lists every function the guest has")
                return pb.GetReportResponse(report=self._engine.functions(self._roots))
            report = self._engine.inspect(
                self._roots, names, leased=self._leases.leased(), own_claims=self._leases.own_claims()
            )
            return pb.GetReportResponse(report=report)

        return _guard("GetReport", context, call)

    def GetAgentInfo(self, request: pb.GetAgentInfoRequest, context: grpc.ServicerContext) -> pb.GetAgentInfoResponse:
        def call() -> pb.GetAgentInfoResponse:
            uname = os.uname()
            caps = ["report", "watch"]
            if self._config.mutations.enabled:
                caps += ["prepare", "interfaces-down"]
                if self._config.release.enabled:
                    caps.append("release")
            return pb.GetAgentInfoResponse(
                version=unplugd.__version__,
                capabilities=caps,
                kernel=uname.release,
                hostname=wire_text(uname.nodename),  # the hostname is bytes too
                listeners=[pb.Listener(transport=lst.transport, address=lst.address) for lst in self._listeners()],
                mutating_enabled=self._config.mutations.enabled,
                resources=agent_resources(leases=len(self._leases.active()), watchers=self._watching),
            )

        return _guard("GetAgentInfo", context, call)

    def WatchReport(
        self, request: pb.WatchReportRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchReportResponse]:
        # A generator: errors before the first message still end as a status.
        try:
            names = validate_names(request.devices)
            addresses = None
            if names:
                functions = select_named(self._engine, self._roots, self._leases, names)[1]
                addresses = {str(f.address) for f in functions}
        except Exception as exc:
            _abort("WatchReport", context, exc)
        if not self._watchers.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {self._config.server.max_watchers} WatchReport streams at a time",
            )
        with self._watching_lock:
            self._watching += 1
        try:
            try:
                sub = self._hub.subscribe()
            except Exception as exc:  # the event sources could not be opened: a status, not a traceback
                _abort("WatchReport", context, exc)
            context.add_callback(sub.close)
            try:
                for change in sub.changes(addresses, context.is_active):
                    yield pb.WatchReportResponse(report=change.report, changed=change.changed, initial=change.initial)
            except Exception as exc:  # the scanner failed or stopped (WatchStopped)
                _abort("WatchReport", context, exc)
            finally:
                sub.close()
        finally:
            with self._watching_lock:
                self._watching -= 1
            self._watchers.release()

    # -- mutating -------------------------------------------------------------------

    def PrepareUnplug(
        self, request: pb.PrepareUnplugRequest, context: grpc.ServicerContext
    ) -> pb.PrepareUnplugResponse:
        def call() -> pb.PrepareUnplugResponse:
            self._require_mutations("PrepareUnplug")
            grant = prepare_unplug(
                self._engine,
                self._roots,
                self._leases,
                validate_names(request.devices),
                lease_id=request.lease_id,
                seconds=request.lease_seconds,
                take_interfaces_down=request.take_interfaces_down,
            )
            self._hub.poke()
            return _grant_response(grant)

        return _guard("PrepareUnplug", context, call)

    def ReleaseUnplug(
        self, request: pb.ReleaseUnplugRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseUnplugResponse:
        def call() -> pb.ReleaseUnplugResponse:
            self._require_mutations("ReleaseUnplug")
            if not request.lease_id:
                raise InvalidArgument("lease_id is required")
            restored = self._leases.release(request.lease_id)
            self._hub.poke()
            return pb.ReleaseUnplugResponse(released=True, interfaces_restored=list(restored))

        return _guard("ReleaseUnplug", context, call)

    def RequestRelease(
        self, request: pb.RequestReleaseRequest, context: grpc.ServicerContext
    ) -> pb.RequestReleaseResponse:
        def call() -> pb.RequestReleaseResponse:
            if not (self._config.mutations.enabled and self._config.release.enabled):
                raise ReleaseDisabled("RequestRelease", mutations=self._config.mutations.enabled)
            results = self._releaser.release(
                validate_names(request.devices), request.deadline_seconds, lambda: self._report_states(context)
            )
            return pb.RequestReleaseResponse(functions=[_release_message(r) for r in results])

        return _guard("RequestRelease", context, call)

    @contextlib.contextmanager
    def _report_states(self, context: grpc.ServicerContext) -> Iterator[NextStates]:
        """The watch's reports as the release waits for them: a subscription of its own, closed
        (the stream ends, so does the wait) when the caller leaves: nobody would read the answer,
        and the call would hold a worker thread until its deadline (up to max_wait_seconds)."""
        sub = self._hub.subscribe()
        if not context.add_callback(sub.close):  # the call has already ended
            sub.close()
        self._hub.poke()  # the hooks just changed things: a scan now, not at the next event

        def next_states(timeout: float) -> Mapping[str, FunctionState] | None:
            item = sub.next(timeout)
            if item is None:
                return None
            if isinstance(item, Exception):
                raise item
            return {f.address: FunctionState(state_name(f.state), tuple(f.reasons)) for f in item.report.functions}

        try:
            yield next_states
        finally:
            sub.close()

    def _require_mutations(self, call: str) -> None:
        if not self._config.mutations.enabled:
            raise MutationDisabled(call)


def _grant_response(grant: LeaseGrant) -> pb.PrepareUnplugResponse:
    expires = timestamp_pb2.Timestamp()
    expires.FromNanoseconds(int(grant.expires_at * 1e9))
    return pb.PrepareUnplugResponse(
        lease_id=grant.lease_id,
        expires_at=expires,
        functions=[str(a) for a in grant.functions],
        claimed=list(grant.claimed),
        interfaces_down=list(grant.interfaces_down),
    )


_HOOK_STATUS = {status: pb.HookStatus.Value(f"HOOK_STATUS_{status.value}") for status in HookStatus}


def _hook_message(run: HookRun) -> pb.HookResult:
    return pb.HookResult(
        name=wire_text(run.name),
        status=_HOOK_STATUS[run.status],
        exit_code=run.exit_code,
        signal=run.signal,
        stdout=wire_text(run.stdout.decode("utf-8", "surrogateescape")),
        stderr=wire_text(run.stderr.decode("utf-8", "surrogateescape")),
        stdout_truncated=run.stdout_truncated,
        stderr_truncated=run.stderr_truncated,
        detail=wire_text(run.detail),
        seconds=run.seconds,
    )


def _release_message(r: Released) -> pb.FunctionRelease:
    state = report_pb2.FunctionState.Value(f"FUNCTION_STATE_{r.state.state}") if r.state.state else 0
    return pb.FunctionRelease(
        address=r.address,
        pci_path=r.pci_path,
        outcome=pb.ReleaseOutcome.Value(f"RELEASE_OUTCOME_{r.outcome.value}"),
        state=state,  # type: ignore[arg-type]
        reasons=[x for x in r.state.reasons if isinstance(x, report_pb2.Reason)],
        hooks=[_hook_message(h) for h in r.hooks],
    )


def _guard(call: str, context: grpc.ServicerContext, fn: Callable[[], _R]) -> _R:
    try:
        return fn()
    except Exception as exc:
        _abort(call, context, exc)


def _abort(call: str, context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    status = status_for(exc, call=call)
    if status.metadata:
        context.set_trailing_metadata(status.metadata)
    log.info("call refused", extra={"call": call, "code": status.code.name, "error": status.message})
    context.abort(status.code, status.message)
    raise AssertionError("context.abort returned")  # it raises; keeps type checkers honest
