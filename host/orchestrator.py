"""The orchestrator: performs a SlotPlan, with explicit timeouts everywhere.

    check -> [prepare lease -> check again] -> unplug (function 0 or the device)
    -> wait for the hypervisor's removal event of every function in the slot
    -> confirm with the agent that the guest no longer has them -> release the lease

After the lease is granted the guest is asked once more, before anything is
unplugged: the lease itself (LEASED) may be the only new reason. Anything
else that appeared since the check (a mount that won the race, an agent that
stopped answering) releases the lease and refuses (GUEST_CHANGED); --force
overrides only the findings it was shown at the check.

It never unplugs on a verdict other than UNPLUGGABLE unless `force`, and then
the result lists exactly the findings it overrode; companions leave only with
`with_companions`. The lease is released on every path out; if the agent is
gone by then, its claims went with its file descriptors (the kernel drops an
O_EXCL claim when the fd closes), and the result says so. Waiting is driven by
removal events (QMP DEVICE_DELETED, libvirt device-removed), never by sleeping;
when the deadline passes, one fresh topology read tells which functions are
still present (an unplug QEMU keeps pending).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from unplugd.host.client import AGENT_CALL_ERRORS, AgentUnreachable
from unplugd.host.errors import BackendError, HostError, UnplugRefused
from unplugd.host.planner import (
    Finding,
    GuestView,
    Plan,
    SlotPlan,
    StepKind,
    Verdict,
    plan,
    plan_slot,
    resolve,
)
from unplugd.host.topology import Function, Removal, Topology
from unplugd.pci import PciPath
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import report_pb2

if TYPE_CHECKING:
    # hot-add's (slots, plug): imported by those two methods, not by status, check and unplug
    # (devicespec brings tomllib, placement and plugging their dataclasses: ~20 ms of a status)
    from unplugd.host.devicespec import SlotRequest
    from unplugd.host.placement import BusRoom
    from unplugd.host.plugging import PlugResult

__all__ = [
    "AgentLike",
    "Backend",
    "FunctionOutcome",
    "Orchestrator",
    "Outcome",
    "Progress",
    "UnplugResult",
]

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What the orchestrator needs from a hypervisor backend (QmpBackend, LibvirtBackend)."""

    source: str

    async def topology(self) -> Topology: ...

    async def request_unplug(self, fn: Function, *, via_monitor: bool = False) -> None: ...

    def removals(self) -> AbstractAsyncContextManager[AsyncIterator[Removal]]: ...

    async def reconnect(self) -> None:
        """After the connection broke: connect again, or raise BackendError if the VM cannot be reached."""
        ...


class AgentLike(Protocol):
    """The slice of host/client.py's AgentClient the orchestrator calls, as it calls it."""

    async def get_report(self, *, timeout: float | None = None) -> report_pb2.Report: ...

    async def get_functions(self, *, timeout: float | None = None) -> report_pb2.Report: ...

    async def prepare_unplug(
        self, devices: Sequence[str], lease_seconds: int, *, timeout: float | None = None
    ) -> pb.PrepareUnplugResponse: ...

    async def release_unplug(self, lease_id: str, *, timeout: float | None = None) -> pb.ReleaseUnplugResponse: ...

    def watch_report(
        self, devices: Sequence[str] = (), *, timeout: float | None = None
    ) -> AsyncIterator[pb.WatchReportResponse]: ...


class Outcome(Enum):
    UNPLUGGED = "UNPLUGGED"  # gone from the hypervisor and confirmed gone by the guest
    UNPLUGGED_UNCONFIRMED = "UNPLUGGED_UNCONFIRMED"  # gone from the hypervisor; the guest could not confirm
    REFUSED = "REFUSED"  # the plan's verdict forbids it (no --force / --with-companions)
    DRY_RUN = "DRY_RUN"
    PREPARE_FAILED = "PREPARE_FAILED"  # the guest could not lease the devices: nothing was unplugged
    GUEST_CHANGED = "GUEST_CHANGED"  # after the lease the guest reported a new use, or no answer: nothing unplugged
    HYPERVISOR_REFUSED = "HYPERVISOR_REFUSED"  # device_del / detach said no
    PENDING = "PENDING"  # requested, but not every function left before the timeout
    HYPERVISOR_LOST = "HYPERVISOR_LOST"  # the hypervisor connection broke while waiting and did not come back
    FAILED = "FAILED"


@dataclass(frozen=True)
class Progress:
    """One thing that happened, for a progress display."""

    event: str  # planned | prepared | requested | deleted | waiting | confirmed | released | note
    detail: str
    path: PciPath | None = None
    elapsed: float = 0.0


@dataclass(frozen=True)
class FunctionOutcome:
    path: PciPath
    name: str
    requested: bool
    removed: bool  # the hypervisor reported it gone
    guest_gone: bool | None  # the guest confirmed it gone; None: not asked / could not ask


@dataclass(frozen=True)
class UnplugResult:
    outcome: Outcome
    message: str
    plan: SlotPlan | None
    functions: tuple[FunctionOutcome, ...] = ()
    overridden: tuple[Finding, ...] = ()
    lease_id: str = ""
    lease_released: bool | None = None  # None: there was no lease
    notes: tuple[str, ...] = ()
    # seconds: command start -> unplug request sent; last removal -> result
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.UNPLUGGED, Outcome.DRY_RUN)


ProgressCallback = Callable[[Progress], None]


class _Say(Protocol):
    def __call__(self, event: str, detail: str, path: PciPath | None = None) -> None: ...


class Orchestrator:
    """Ties one VM's backend to its agent (or to none: then the guest is unreachable)."""

    def __init__(
        self,
        backend: Backend,
        agent: AgentLike | None,
        *,
        agent_timeout: float = 5.0,
        confirm_timeout: float = 10.0,
        lease_seconds: int = 120,
    ) -> None:
        self.backend = backend
        self.agent = agent
        self.agent_timeout = agent_timeout
        self.confirm_timeout = confirm_timeout
        self.lease_seconds = lease_seconds

    # ------------------------------------------------------------ reading

    async def guest(self) -> tuple[GuestView | None, str]:
        """The guest's report, or None and why not."""
        if self.agent is None:
            return None, "no agent address given"
        try:
            report = await asyncio.wait_for(self.agent.get_report(timeout=self.agent_timeout), self.agent_timeout + 1)
        except AGENT_CALL_ERRORS as e:
            return None, str(e) or type(e).__name__
        return GuestView.from_report(report), ""

    async def snapshot(self) -> tuple[Topology, GuestView | None, str]:
        topo_task = asyncio.ensure_future(self.backend.topology())
        try:
            guest, why = await self.guest()
            topo = await topo_task
        finally:
            topo_task.cancel()
        return topo, guest, why

    async def status(self) -> Plan:
        topo, guest, why = await self.snapshot()
        return plan(topo, guest, guest_error=why)

    async def check(self, device: str, *, prepare: bool = False) -> SlotPlan:
        return (await self._check(device, prepare=prepare))[1]

    async def _check(self, device: str, *, prepare: bool) -> tuple[Topology, SlotPlan]:
        topo, guest, why = await self.snapshot()
        sel = resolve(device, topo, guest)
        return topo, plan_slot(sel.slot_path, topo, guest, requested=sel.paths, prepare=prepare, guest_error=why)

    # ------------------------------------------------------------ unplug

    async def unplug(
        self,
        device: str,
        *,
        with_companions: bool = False,
        prepare: bool = False,
        force: bool = False,
        dry_run: bool = False,
        timeout: float = 30.0,
        progress: ProgressCallback | None = None,
    ) -> UnplugResult:
        start = time.monotonic()

        def say(event: str, detail: str, path: PciPath | None = None) -> None:
            log.info("%s: %s", event, detail)
            if progress is not None:
                progress(Progress(event, detail, path, time.monotonic() - start))

        topo, sp = await self._check(device, prepare=prepare)
        say("planned", f"slot {sp.slot_path}: {sp.verdict.value}")
        overridden = sp.overrides(force=force, with_companions=with_companions)
        if overridden is None:
            return self._refusal(sp, force=force, with_companions=with_companions)
        if overridden:
            for f in overridden:
                say("note", f"--force overrides {f.verdict.value}: {f.detail}", f.path)
        if dry_run:
            return UnplugResult(Outcome.DRY_RUN, "dry run: nothing was changed", sp, overridden=overridden)
        target = sp.unplug_target
        if target is None:
            return UnplugResult(
                Outcome.FAILED,
                f"the hypervisor has nothing to unplug in slot {sp.slot_path}",
                sp,
                overridden=overridden,
            )

        lease_id = ""
        notes: list[str] = []
        if any(s.kind is StepKind.PREPARE for s in sp.steps):
            try:
                lease_id, short = await self._prepare(sp, timeout)
            except AGENT_CALL_ERRORS as e:
                return UnplugResult(
                    Outcome.PREPARE_FAILED, f"the guest could not prepare the unplug: {e}", sp, overridden=overridden
                )
            say("prepared", "a lease holds the slot's block devices in the guest")
            if short:
                notes.append(short)
                say("note", short)

        released: bool | None = None
        try:
            changed = await self._recheck(topo, sp, overridden) if lease_id else None
            if changed is not None:
                why = "; ".join(f.detail for f in changed.findings if _new_guest_finding(f, overridden))
                result = UnplugResult(
                    Outcome.GUEST_CHANGED,
                    f"after the lease the guest reports: {why} (nothing was unplugged)",
                    changed,
                    self._outcomes(sp, set(), None),
                )
            else:
                result = await self._unplug_and_wait(sp, target, timeout, say, start)
        finally:  # also when cancelled or failing: the lease must not outlive the attempt
            if lease_id:
                released, note = await self._release(lease_id)
                notes.append(note)
                say("released", note)
        return UnplugResult(
            result.outcome,
            result.message,
            result.plan,
            result.functions,
            overridden,
            lease_id,
            released,
            (*result.notes, *notes),
            result.timings,
        )

    def _refusal(self, sp: SlotPlan, *, force: bool, with_companions: bool) -> UnplugResult:
        needs: list[str] = []
        if any(f.verdict is Verdict.NEEDS_COMPANIONS for f in sp.findings) and not with_companions:
            needs.append("--with-companions")
        if any(f.verdict is not Verdict.NEEDS_COMPANIONS for f in sp.findings) and not force:
            needs.append("--force")
        why = "; ".join(f.detail for f in sp.findings)
        return UnplugResult(
            Outcome.REFUSED,
            f"{sp.verdict.value}: {why} (nothing was unplugged; it would take {' and '.join(needs)})",
            sp,
        )

    async def _prepare(self, sp: SlotPlan, timeout: float) -> tuple[str, str]:
        """The lease id, and a note when the agent granted less time than the attempt may take."""
        assert self.agent is not None
        devices = sp.guest_devices()
        # Long enough to outlast the whole attempt (re-check, wait, confirm, release):
        # a lease that expired mid-wait would hold nothing. The agent caps it at its maximum.
        seconds = max(self.lease_seconds, math.ceil(timeout + self.confirm_timeout + 4 * (self.agent_timeout + 1)))
        asked = time.time()
        resp = await asyncio.wait_for(
            self.agent.prepare_unplug(devices, seconds, timeout=self.agent_timeout), self.agent_timeout + 1
        )
        granted = resp.expires_at.ToNanoseconds() / 1e9 - asked
        if resp.HasField("expires_at") and granted < seconds - 1:  # 1 s: the clocks of two machines
            return resp.lease_id, (
                f"the agent granted the lease for {max(granted, 0):.0f} s of the {seconds} s asked (its [mutations] "
                "max_lease_seconds): it may end before the unplug does"
            )
        return resp.lease_id, ""

    async def _recheck(self, topo: Topology, sp: SlotPlan, overridden: Sequence[Finding]) -> SlotPlan | None:
        """The slot planned again from a fresh report; None when only the lease is new."""
        guest, why = await self.guest()
        fresh = plan_slot(
            sp.slot_path,
            topo,
            guest,
            requested=frozenset(fp.path for fp in sp.functions if fp.requested),
            prepare=True,
            guest_error=f"the agent did not answer after the lease: {why}" if guest is None else "",
        )
        return fresh if any(_new_guest_finding(f, overridden) for f in fresh.findings) else None

    async def _release(self, lease_id: str) -> tuple[bool, str]:
        # The notes say "the lease", never its id: they are printed and logged.
        assert self.agent is not None
        try:
            await asyncio.wait_for(
                self.agent.release_unplug(lease_id, timeout=self.agent_timeout), self.agent_timeout + 1
            )
        except AGENT_CALL_ERRORS as e:
            if isinstance(e, AgentUnreachable | TimeoutError | OSError):
                return False, (
                    f"the lease was not released: the agent is unreachable ({e}); if the agent died, the kernel "
                    "dropped its claims with its file descriptors, otherwise the lease expires on its own"
                )
            return False, f"the lease was not released: {e} (it expires on its own)"
        return True, "the lease was released"

    async def _unplug_and_wait(
        self,
        sp: SlotPlan,
        target: Function,
        timeout: float,
        say: _Say,
        start: float,
    ) -> UnplugResult:
        leaving = {fp.path: fp.host for fp in sp.functions if fp.host is not None}
        requested = {fp.path for fp in sp.functions if fp.requested}
        monitor = next((s.via_monitor for s in sp.steps if s.kind is StepKind.UNPLUG), False)
        removed: set[PciPath] = set()
        timings: dict[str, float] = {}
        async with contextlib.AsyncExitStack() as stack:
            events = await stack.enter_async_context(self.backend.removals())
            try:
                if monitor:
                    say("note", "device_del through the QEMU monitor: libvirt marks the domain tainted")
                timings["to_request"] = time.monotonic() - start
                await self.backend.request_unplug(target, via_monitor=monitor)
            except UnplugRefused as e:
                return UnplugResult(Outcome.HYPERVISOR_REFUSED, str(e), sp, self._outcomes(sp, removed, None))
            except BackendError as e:
                return UnplugResult(Outcome.FAILED, str(e), sp, self._outcomes(sp, removed, None))
            say("requested", f"unplug of {target.name} requested; waiting for {len(leaving)} function(s) to leave")
            try:
                last, lost = await self._wait_removed(stack, events, leaving, removed, timeout, say=say)
            except asyncio.CancelledError:
                # Ctrl-C or SIGTERM mid-wait: a device_del cannot be taken back, so say where things stand
                # (the lease is released on the way out, in unplug).
                say(
                    "note",
                    f"interrupted: the unplug of {target.name} was requested and {len(removed)} of {len(leaving)} "
                    "function(s) had left; the hypervisor keeps the rest pending and may still complete it",
                )
                raise
        if lost and removed != set(leaving):
            still = _still_there(leaving, removed)
            return UnplugResult(
                Outcome.HYPERVISOR_LOST,
                f"lost the hypervisor ({self.backend.source}) while waiting: {lost}. {len(removed)} of "
                f"{len(leaving)} function(s) had left; "
                f"not known for: {still}",
                sp,
                self._outcomes(sp, removed, None),
                timings=timings,
            )
        if removed != set(leaving):
            # The deadline passed. Events can only be missed if the listener
            # broke, so read the topology once to be sure what is still there.
            with contextlib.suppress(HostError):
                now = await self.backend.topology()
                removed |= {p for p in leaving if now.function(p) is None}
        if removed != set(leaving):
            still = _still_there(leaving, removed)
            return UnplugResult(
                Outcome.PENDING,
                f"not gone after {timeout:g}s: {still}. The hypervisor keeps the unplug pending until the guest "
                "ejects the slot (guest not booted, no hotplug driver, or busy); it may still complete",
                sp,
                self._outcomes(sp, removed, None),
                timings=timings,
            )
        gone = await self._confirm(sp, say)
        timings["after_last_removal"] = time.monotonic() - last if last else 0.0
        outcomes = self._outcomes(sp, removed, gone)
        names = ", ".join(f.name for f in outcomes if f.path in requested)
        if gone is None:
            return UnplugResult(
                Outcome.UNPLUGGED_UNCONFIRMED,
                f"the hypervisor removed {names}; the guest agent could not confirm it",
                sp,
                outcomes,
                timings=timings,
            )
        left = [f for f in outcomes if f.guest_gone is False]
        if left:
            return UnplugResult(
                Outcome.UNPLUGGED_UNCONFIRMED,
                "the hypervisor removed the slot but the guest still reports "
                + ", ".join(f"{f.name} ({f.path})" for f in left),
                sp,
                outcomes,
                timings=timings,
            )
        return UnplugResult(Outcome.UNPLUGGED, f"unplugged {names}", sp, outcomes, timings=timings)

    async def _wait_removed(
        self,
        stack: contextlib.AsyncExitStack,
        events: AsyncIterator[Removal],
        leaving: Mapping[PciPath, Function],
        removed: set[PciPath],
        timeout: float,
        *,
        say: _Say,
    ) -> tuple[float, str]:
        """Collect removal events until every leaving function is gone or the timeout.

        Returns the last removal's time, and why the hypervisor was lost ("" if
        it was not). A broken connection (QEMU gone, libvirtd restarting) is
        reconnected within the timeout: a fresh listener, then one topology
        read for what left while nobody listened.
        """
        last = 0.0
        deadline = time.monotonic() + timeout

        def gone(path: PciPath, fn: Function) -> None:
            nonlocal last
            removed.add(path)
            last = time.monotonic()
            say("deleted", f"{fn.name} ({path}) is gone ({len(removed)}/{len(leaving)})", path)

        async def collect(stream: AsyncIterator[Removal]) -> None:
            async for ev in stream:
                for path, fn in leaving.items():
                    if path not in removed and ev.matches(fn):
                        gone(path, fn)
                if len(removed) == len(leaving):
                    return

        while True:
            try:
                await asyncio.wait_for(collect(events), max(deadline - time.monotonic(), 0))
                return last, ""
            except TimeoutError:
                return last, ""
            except BackendError as lost:
                say("note", f"{lost}; connecting again")
                try:
                    await asyncio.wait_for(self.backend.reconnect(), max(deadline - time.monotonic(), 0))
                    events = await stack.enter_async_context(self.backend.removals())
                    now = await self.backend.topology()
                except (HostError, TimeoutError) as e:
                    return last, f"{lost}; {e or 'no connection before the timeout'}"
                say("note", f"connected to {self.backend.source} again")
                for path, fn in leaving.items():
                    if path not in removed and now.function(path) is None:
                        gone(path, fn)
                if len(removed) == len(leaving):
                    return last, ""

    async def _confirm(self, sp: SlotPlan, say: Callable[[str, str, PciPath | None], None]) -> set[PciPath] | None:
        """Guest paths of the slot confirmed gone; None when the agent could not be asked."""
        if self.agent is None:
            return None
        paths = {fp.path for fp in sp.functions if fp.guest is not None}
        if not paths:
            return set()

        def present(report: report_pb2.Report) -> set[PciPath]:
            view = GuestView.from_report(report)
            return {g.path for g in view.functions if g.path in paths}

        try:
            # Only which functions the guest still has: its PCI scan, not a full report (~1/3 of its
            # time on the bench's 256-function guest with 2,000 processes, a few ms on most guests).
            report = await asyncio.wait_for(
                self.agent.get_functions(timeout=self.agent_timeout), self.agent_timeout + 1
            )
            still = present(report)
            if still:
                # The guest may not have finished removing them: watch, bounded.
                async def watch() -> set[PciPath]:
                    assert self.agent is not None
                    left = still
                    async for msg in self.agent.watch_report(timeout=self.confirm_timeout):
                        left = present(msg.report)
                        if not left:
                            break
                    return left

                with contextlib.suppress(TimeoutError):
                    still = await asyncio.wait_for(watch(), self.confirm_timeout)
        except AGENT_CALL_ERRORS as e:
            say("note", f"could not confirm with the agent: {e}", None)
            return None
        say("confirmed", "the guest no longer has them" if not still else f"the guest still has {len(still)}", None)
        return paths - still

    @staticmethod
    def _outcomes(sp: SlotPlan, removed: set[PciPath], gone: set[PciPath] | None) -> tuple[FunctionOutcome, ...]:
        return tuple(
            FunctionOutcome(
                fp.path,
                fp.name,
                fp.requested,
                fp.path in removed,
                None if gone is None or fp.guest is None else fp.path in gone,
            )
            for fp in sp.functions
        )

    # ------------------------------------------------------------ hot-add (host/plugging.py, host/placement.py)

    async def slots(self) -> tuple[BusRoom, ...]:
        """Every bus with its free and taken slots: where a hot-add can go."""
        from unplugd.host.placement import room

        return room(await self.backend.topology())

    async def plug(self, requests: Sequence[SlotRequest], **options: Any) -> PlugResult:
        """Hot-add whole slots, confirmed by the guest, all or nothing (see plugging.plug for options)."""
        from unplugd.host import plugging

        return await plugging.plug(self.backend, self.agent, requests, agent_timeout=self.agent_timeout, **options)

    # ------------------------------------------------------------ wait-ready

    async def wait_ready(self, device: str, *, timeout: float, progress: ProgressCallback | None = None) -> SlotPlan:
        """Until the guest releases the slot (verdict no longer BLOCKED_BY_GUEST) or the timeout.

        Driven by the agent's WatchReport stream; returns the last plan.
        """
        start = time.monotonic()
        topo, guest, why = await self.snapshot()
        sel = resolve(device, topo, guest)
        sp = plan_slot(sel.slot_path, topo, guest, requested=sel.paths, guest_error=why)
        if self.agent is None or not _waiting(sp):
            return sp
        devices = sp.guest_devices()

        async def watch() -> SlotPlan:
            assert self.agent is not None
            latest = sp
            async for msg in self.agent.watch_report(devices, timeout=timeout):
                view = GuestView.from_report(msg.report)
                # the filtered report only has the slot's functions; plan from them
                latest = plan_slot(sel.slot_path, topo, view, requested=sel.paths)
                if progress is not None:
                    progress(Progress("waiting", f"{latest.verdict.value}", None, time.monotonic() - start))
                if not _waiting(latest):
                    break
            return latest

        try:
            return await asyncio.wait_for(watch(), timeout)
        except TimeoutError:
            topo2, guest2, why2 = await self.snapshot()
            return plan_slot(sel.slot_path, topo2, guest2, requested=sel.paths, guest_error=why2)
        except AGENT_CALL_ERRORS as e:
            return plan_slot(sel.slot_path, topo, None, requested=sel.paths, guest_error=str(e))


def _new_guest_finding(f: Finding, overridden: Sequence[Finding]) -> bool:
    """A finding about the guest that --force did not accept at the check (same verdict, same function)."""
    if f.verdict not in (Verdict.BLOCKED_BY_GUEST, Verdict.GUEST_UNREACHABLE):
        return False
    return not any(o.verdict is f.verdict and o.path == f.path for o in overridden)


def _still_there(leaving: Mapping[PciPath, Function], removed: set[PciPath]) -> str:
    """The functions that have not left yet, for a message."""
    return ", ".join(f"{f.name} ({p})" for p, f in leaving.items() if p not in removed)


def _waiting(sp: SlotPlan) -> bool:
    """Still blocked by something the guest may release?"""
    return sp.verdict in (Verdict.BLOCKED_BY_GUEST, Verdict.GUEST_UNREACHABLE) and sp.guest_reachable
