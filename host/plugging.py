"""Hot-add, performed: backends, device_add in the planned order, the guest's confirmation, rollback.

    snapshot (topology + the guest's report) -> plan (placement.plan_plug)
    -> per slot: backends (netdev, blockdev), then functions 1..7, function 0 last
    -> wait until the agent reports every new function PRESENT (WatchReport), or the timeout
    -> all PRESENT: done; otherwise, and when QEMU rejects anything halfway: roll back

Rollback removes what this call added and nothing else: device_del of function 0 when it
arrived (QEMU removes the whole slot with it, the guest ejecting it), else of each function
added (a function without its function 0 was never shown to the guest, so QEMU removes it at
once); DEVICE_DELETED is awaited for each, then the backends are deleted. Afterwards the
topology and the agent are asked again: anything of ours they still show is a leftover, and
the result says so (ROLLBACK_INCOMPLETE). `keep_partial` skips the rollback.

Under libvirt a single-function device is attached with its device XML (attachDeviceFlags),
so libvirt knows it. A multifunction slot is refused: libvirt attaches one device at a time,
refuses any function but 0 of a new slot, and a slot built behind its back (device_add through
its monitor) would be devices libvirt does not know (lost from its XML, its migration, its
detach). Such slots are for QEMU's own QMP socket (--qmp).

The agent is required: without it nothing could confirm, so nothing is added.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from unplugd.host.client import AGENT_CALL_ERRORS
from unplugd.host.devicespec import DeviceSpec, SlotRequest, SpecError, parse_netdev
from unplugd.host.errors import AddRejected, BackendError, HostError, UnplugRefused
from unplugd.host.placement import (
    Arrival,
    FunctionArrival,
    NoRoom,
    PlannedFunction,
    SlotPlug,
    arrival,
    plan_plug,
)
from unplugd.host.planner import GuestView
from unplugd.host.topology import Removal, Topology
from unplugd.pci import PciPath
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import report_pb2

__all__ = [
    "LibvirtPlugging",
    "PlugOutcome",
    "PlugProgress",
    "PlugResult",
    "QmpPlugging",
    "libvirt_device",
    "plug",
]

log = logging.getLogger(__name__)

# After a failed WatchReport, subscribe again this much later: not in a tight loop against an agent
# that refuses, and soon enough that a guest busy enumerating the new slot is not waited on for long.
_RESUBSCRIBE_S = 1.0


class _Hypervisor(Protocol):
    source: str

    async def topology(self) -> Topology: ...

    def removals(self) -> AbstractAsyncContextManager[AsyncIterator[Removal]]: ...


@runtime_checkable
class QmpPlugging(Protocol):
    """What plug needs of QEMU (QmpBackend)."""

    source: str

    async def topology(self) -> Topology: ...

    def removals(self) -> AbstractAsyncContextManager[AsyncIterator[Removal]]: ...

    async def device_add(self, arguments: Mapping[str, str]) -> None: ...

    async def device_del(self, qemu_id: str) -> None: ...

    async def netdev_add(self, spec: str) -> None: ...

    async def netdev_del(self, qemu_id: str) -> None: ...

    async def blockdev_add(self, arguments: Mapping[str, Any]) -> None: ...

    async def blockdev_del(self, node_name: str) -> None: ...


@runtime_checkable
class LibvirtPlugging(Protocol):
    """What plug needs of libvirt (LibvirtBackend)."""

    source: str

    async def topology(self) -> Topology: ...

    def removals(self) -> AbstractAsyncContextManager[AsyncIterator[Removal]]: ...

    async def attach_xml(self, xml: str, *, persistent: bool = False) -> None: ...

    async def detach_xml(self, xml: str, *, persistent: bool = False) -> None: ...


class AgentForPlug(Protocol):
    """The slice of the agent client plug calls (orchestrator.AgentLike has it too)."""

    async def get_report(self, *, timeout: float | None = None) -> report_pb2.Report: ...

    def watch_report(
        self, devices: Sequence[str] = (), *, timeout: float | None = None
    ) -> AsyncIterator[pb.WatchReportResponse]: ...


class PlugOutcome(Enum):
    PLUGGED = "PLUGGED"  # every function PRESENT in the guest
    DRY_RUN = "DRY_RUN"
    REFUSED = "REFUSED"  # nothing added: no room, not hotpluggable, libvirt and a multifunction slot
    GUEST_UNREACHABLE = "GUEST_UNREACHABLE"  # nothing added: no agent to confirm with
    REJECTED = "REJECTED"  # the hypervisor refused a device or backend: what was added is removed again
    NOT_CONFIRMED = "NOT_CONFIRMED"  # a function did not arrive before the timeout: removed again
    ROLLBACK_INCOMPLETE = "ROLLBACK_INCOMPLETE"  # the rollback left something behind (listed)
    HYPERVISOR_LOST = "HYPERVISOR_LOST"  # the hypervisor connection broke midway


@dataclass(frozen=True)
class PlugProgress:
    event: str  # planned | backend | added | waiting | arrived | rollback | note
    detail: str
    elapsed: float = 0.0


@dataclass(frozen=True)
class PlugResult:
    outcome: PlugOutcome
    message: str
    slots: tuple[SlotPlug, ...] = ()
    arrivals: tuple[FunctionArrival, ...] = ()
    rolled_back: bool = False  # a rollback ran (complete unless ROLLBACK_INCOMPLETE)
    kept_partial: bool = False
    leftovers: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    # seconds: command start -> first device_add; last device_add -> every function PRESENT
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome in (PlugOutcome.PLUGGED, PlugOutcome.DRY_RUN)


ProgressCallback = Callable[[PlugProgress], None]


@dataclass
class _Added:
    """What this call created, in creation order: exactly what a rollback removes."""

    devices: list[tuple[SlotPlug, PlannedFunction]] = field(default_factory=list)
    netdevs: list[str] = field(default_factory=list)
    blockdevs: list[str] = field(default_factory=list)
    xml: dict[str, str] = field(default_factory=dict)  # libvirt: alias -> the XML attached


# ---------------------------------------------------------------- libvirt device XML


_TAG_OBJECTS = {"interface": "interface", "disk": "block device"}
_CONTROLLER_INDEX = re.compile(r"^pci\.(\d+)$")


def libvirt_device(xml: str, sp: SlotPlug, fn: PlannedFunction) -> tuple[str, str, str]:
    """The user's device XML placed at the planned slot, with a user alias (ua-...) unless it has one.
    Returns (xml, alias, expected objects). Pure."""
    try:
        el = ET.fromstring(xml)  # noqa: S314 (the operator's own argument, not guest text)
    except ET.ParseError as e:
        raise SpecError(f"device XML does not parse: {e}") from e
    m = _CONTROLLER_INDEX.match(sp.bus.name)
    if m is None:
        raise NoRoom(f"bus {sp.bus.name} has no libvirt controller index to address (expected an alias pci.N)")
    for old in el.findall("address"):
        el.remove(old)
    ET.SubElement(
        el,
        "address",
        {"type": "pci", "domain": f"{sp.bus.domain:#06x}", "bus": f"{int(m.group(1)):#04x}",
         "slot": f"{sp.slot:#04x}", "function": "0x0"},
    )  # fmt: skip
    alias_el = el.find("alias")
    if alias_el is None or not alias_el.get("name"):
        if alias_el is None:
            alias_el = ET.SubElement(el, "alias")
        alias_el.set("name", fn.qemu_id if fn.qemu_id.startswith("ua-") else f"ua-{fn.qemu_id}")
    alias = alias_el.get("name", "")
    return ET.tostring(el, encoding="unicode"), alias, _TAG_OBJECTS.get(el.tag, "")


# ---------------------------------------------------------------- plug


async def plug(
    backend: _Hypervisor,
    agent: AgentForPlug | None,
    requests: Sequence[SlotRequest],
    *,
    timeout: float = 60.0,
    keep_partial: bool = False,
    persistent: bool = False,
    dry_run: bool = False,
    agent_timeout: float = 5.0,
    progress: ProgressCallback | None = None,
) -> PlugResult:
    start = time.monotonic()

    def say(event: str, detail: str) -> None:
        log.info("%s: %s", event, detail)
        if progress is not None:
            progress(PlugProgress(event, detail, time.monotonic() - start))

    if not isinstance(backend, QmpPlugging | LibvirtPlugging):
        return PlugResult(PlugOutcome.REFUSED, f"the {backend.source} backend cannot hot-add (nothing was added)")
    topo_task = asyncio.ensure_future(backend.topology())
    try:
        guest, why = await _guest(agent, agent_timeout)
        topo = await topo_task
    finally:
        topo_task.cancel()
    try:
        slots = plan_plug(topo, requests)
    except NoRoom as e:
        return PlugResult(PlugOutcome.REFUSED, f"{e} (nothing was added)")
    if not isinstance(backend, QmpPlugging):
        multi = [sp for sp in slots if sp.multifunction]
        if multi:
            return PlugResult(
                PlugOutcome.REFUSED,
                f"libvirt cannot hot-add a multifunction slot ({len(multi[0].functions)} functions for "
                f"{multi[0].slot_path}): it attaches one device at a time and refuses any function but 0 of a "
                "new slot, and devices added behind its back through its QEMU monitor would be unknown to it "
                "(its XML, migration, detach). Add the slot through QEMU's QMP socket instead: unplugctl plug "
                "--qmp SOCKET --agent ADDRESS SPEC... (nothing was added)",
                slots,
            )
    for sp in slots:
        how = "chosen" if sp.chosen else "asked for"
        say("planned", f"slot {sp.slot_path} ({sp.bus.kind.value} {sp.bus.name} slot {sp.slot:#x}, {how}): "
            + ", ".join(f"{pf.function}={pf.spec.driver} {pf.qemu_id}" for pf in sp.functions))  # fmt: skip
    if guest is None:
        return PlugResult(
            PlugOutcome.GUEST_UNREACHABLE,
            f"no answer from the guest agent ({why}): nothing could confirm the devices arrived, so nothing was added",
            slots,
        )
    if dry_run:
        return PlugResult(PlugOutcome.DRY_RUN, "dry run: nothing was added", slots)

    added = _Added()
    timings: dict[str, float] = {}
    try:
        timings["to_first_add"] = time.monotonic() - start
        if isinstance(backend, QmpPlugging):
            await _add(backend, slots, added, say)
        else:
            slots = await _attach(backend, slots, added, persistent, say)
        timings["adding"] = time.monotonic() - start - timings["to_first_add"]
    except AddRejected as e:
        say("note", f"rejected: {e}; removing what was added")
        return await _undo(
            backend, agent, slots, added, outcome=PlugOutcome.REJECTED, message=f"the hypervisor rejected {e}",
            timeout=timeout, keep_partial=keep_partial, persistent=persistent, say=say,
        )  # fmt: skip
    except BackendError as e:
        return PlugResult(PlugOutcome.HYPERVISOR_LOST, f"{e} (added so far: {_names(added)})", slots)
    added_at = time.monotonic()
    try:
        arrivals = await _await_arrival(agent, slots, timeout, agent_timeout, say)
    except asyncio.CancelledError:
        # Ctrl-C or SIGTERM before the guest confirmed: no rollback then (it waits on the guest), so say what stays
        say("note", f"interrupted: left in place, not confirmed by the guest and not rolled back: {_names(added)}")
        raise
    if all(a.arrival is Arrival.PRESENT for a in arrivals):
        timings["to_confirmed"] = time.monotonic() - added_at
        n = len(arrivals)
        return PlugResult(
            PlugOutcome.PLUGGED, f"{n} function(s) in {len(slots)} slot(s) present in the guest", slots, arrivals,
            timings=timings,
        )  # fmt: skip
    late = [a for a in arrivals if a.arrival is not Arrival.PRESENT]
    why_not = "; ".join(f"{a.planned.name} ({a.planned.path}) {a.arrival.value}: {a.detail}" for a in late)
    result = await _undo(
        backend, agent, slots, added, outcome=PlugOutcome.NOT_CONFIRMED,
        message=f"not confirmed after {timeout:g}s: {why_not}",
        timeout=timeout, keep_partial=keep_partial, persistent=persistent, say=say,
    )  # fmt: skip
    return PlugResult(
        result.outcome, result.message, slots, arrivals, result.rolled_back, result.kept_partial, result.leftovers,
        result.notes, timings,
    )  # fmt: skip


async def _guest(agent: AgentForPlug | None, agent_timeout: float) -> tuple[GuestView | None, str]:
    if agent is None:
        return None, "no agent address given"
    try:
        report = await asyncio.wait_for(agent.get_report(timeout=agent_timeout), agent_timeout + 1)
    except AGENT_CALL_ERRORS as e:
        return None, str(e) or type(e).__name__
    return GuestView.from_report(report), ""


async def _add(backend: QmpPlugging, slots: Sequence[SlotPlug], added: _Added, say: Callable[[str, str], None]) -> None:
    for sp in slots:
        for spec in sp.request.netdevs:
            await backend.netdev_add(spec)
            added.netdevs.append(_netdev_id(spec))
            say("backend", f"netdev {added.netdevs[-1]}")
        for bd in sp.request.blockdevs:
            await backend.blockdev_add(bd)
            added.blockdevs.append(str(bd["node-name"]))
            say("backend", f"blockdev {added.blockdevs[-1]}")
        for pf in sp.order:
            await backend.device_add(sp.device_add(pf))
            added.devices.append((sp, pf))
            say("added", f"{pf.qemu_id} ({pf.spec.driver}) at {pf.path}")


async def _attach(
    backend: LibvirtPlugging,
    slots: Sequence[SlotPlug],
    added: _Added,
    persistent: bool,
    say: Callable[[str, str], None],
) -> tuple[SlotPlug, ...]:
    """libvirt: each (single-function) slot's XML attached; the plan with the aliases as ids."""
    out: list[SlotPlug] = []
    # Every device's XML first: one that does not parse stops the call before anything is attached.
    placed_xml = [(sp, libvirt_device(sp.functions[0].spec.text, sp, sp.functions[0])) for sp in slots]
    for sp, (xml, ours, expects) in placed_xml:
        asked = sp.functions[0]
        await backend.attach_xml(xml, persistent=persistent)
        # libvirt keeps a user alias only if it likes it (ua-, no dots...), else names the device itself:
        # the live XML says what it is called now, which is what a detach and the removal event use.
        found = (await backend.topology()).function(asked.path)
        alias = found.alias if found is not None and found.alias else ours
        pf = PlannedFunction(DeviceSpec(asked.spec.driver, (), xml), 0, alias, asked.path, expects)
        placed = SlotPlug(sp.request, sp.bus, sp.slot, (pf,), sp.chosen)
        added.devices.append((placed, pf))
        added.xml[alias] = xml
        say("added", f"{alias} at {pf.path} (attachDeviceFlags{', live and config' if persistent else ', live'})")
        out.append(placed)
    return tuple(out)


def _netdev_id(spec: str) -> str:
    return parse_netdev(spec)


def _names(added: _Added) -> str:
    return ", ".join(pf.qemu_id for _, pf in added.devices) or "nothing"


def _evaluate(slots: Sequence[SlotPlug], report: report_pb2.Report) -> tuple[FunctionArrival, ...]:
    view = GuestView.from_report(report)
    return tuple(arrival(pf, view) for sp in slots for pf in sp.functions)


async def _await_arrival(
    agent: AgentForPlug | None,
    slots: Sequence[SlotPlug],
    timeout: float,
    agent_timeout: float,
    say: Callable[[str, str], None],
) -> tuple[FunctionArrival, ...]:
    """Watch the guest's report until every new function is PRESENT or the timeout; then the last word."""
    assert agent is not None
    missing: tuple[FunctionArrival, ...] = tuple(
        FunctionArrival(pf, Arrival.MISSING, "not asked yet") for sp in slots for pf in sp.functions
    )
    latest = missing
    shown = -1

    def note(arrivals: tuple[FunctionArrival, ...]) -> bool:
        nonlocal latest, shown
        latest = arrivals
        present = sum(a.arrival is Arrival.PRESENT for a in arrivals)
        if present != shown:
            shown = present
            say("waiting", f"{present}/{len(arrivals)} present in the guest")
        return present == len(arrivals)

    async def watch(seconds: float) -> bool:
        async for msg in agent.watch_report(timeout=seconds):
            if note(_evaluate(slots, msg.report)):
                return True
        return False  # the stream ended

    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            if await asyncio.wait_for(watch(left), left):
                break
        except TimeoutError:
            break
        except AGENT_CALL_ERRORS as e:  # a busy or restarting agent: subscribe again until the deadline
            say("note", f"watching the guest failed ({e}); asking again")
            await asyncio.sleep(min(_RESUBSCRIBE_S, max(deadline - time.monotonic(), 0)))
    if any(a.arrival is not Arrival.PRESENT for a in latest):
        # The deadline passed (or the stream ended): one fresh report is the last word.
        with contextlib.suppress(*AGENT_CALL_ERRORS):
            report = await asyncio.wait_for(agent.get_report(timeout=agent_timeout), agent_timeout + 1)
            note(_evaluate(slots, report))
    for a in latest:
        say("arrived" if a.arrival is Arrival.PRESENT else "note", f"{a.planned.name} {a.arrival.value}: {a.detail}")
    return latest


# ---------------------------------------------------------------- rollback


async def _undo(
    backend: _Hypervisor,
    agent: AgentForPlug | None,
    slots: tuple[SlotPlug, ...],
    added: _Added,
    *,
    outcome: PlugOutcome,
    message: str,
    timeout: float,
    keep_partial: bool,
    persistent: bool,
    say: Callable[[str, str], None],
) -> PlugResult:
    if keep_partial:
        return PlugResult(
            outcome, f"{message}; kept what was added (--keep-partial): {_names(added)}", slots, kept_partial=True
        )
    if not (added.devices or added.netdevs or added.blockdevs):
        return PlugResult(outcome, f"{message} (nothing had been added)", slots, rolled_back=True)
    leftovers = await _rollback(backend, agent, added, timeout=timeout, persistent=persistent, say=say)
    if leftovers:
        return PlugResult(
            PlugOutcome.ROLLBACK_INCOMPLETE,
            f"{message}; the rollback left: {'; '.join(leftovers)}",
            slots,
            rolled_back=True,
            leftovers=tuple(leftovers),
        )
    return PlugResult(outcome, f"{message}; everything added was removed again", slots, rolled_back=True)


async def _rollback(
    backend: _Hypervisor,
    agent: AgentForPlug | None,
    added: _Added,
    *,
    timeout: float,
    persistent: bool,
    say: Callable[[str, str], None],
) -> list[str]:
    leftovers: list[str] = []
    by_slot: dict[str, list[PlannedFunction]] = {}
    for sp, pf in added.devices:
        by_slot.setdefault(sp.slot_path, []).append(pf)
    waiting = {pf.qemu_id: pf for pfs in by_slot.values() for pf in pfs}
    if waiting:
        async with backend.removals() as events:
            for slot_path, pfs in by_slot.items():
                f0 = next((pf for pf in pfs if pf.function == 0), None)
                # Function 0 takes the slot with it; without it the others were never shown to the guest.
                for pf in [f0] if f0 is not None else pfs:
                    say("rollback", f"removing {pf.qemu_id} ({slot_path})")
                    try:
                        await _remove(backend, added, pf, persistent)
                    except UnplugRefused as e:
                        leftovers.append(f"{pf.qemu_id}: {e}")
            with contextlib.suppress(TimeoutError, BackendError):
                await asyncio.wait_for(_removed(events, waiting, say), timeout)
    if isinstance(backend, QmpPlugging):  # backends are QMP's alone: libvirt's devices carry their own
        for netdev in added.netdevs:
            await _delete(backend.netdev_del, f"netdev {netdev}", netdev, leftovers, say)
        for node in added.blockdevs:
            await _delete(backend.blockdev_del, f"blockdev {node}", node, leftovers, say)
    # The last word: what the hypervisor and the guest still show at the paths we used.
    paths = {pf.path: pf for _, pf in added.devices}
    try:
        now = await backend.topology()
        leftovers += [f"{paths[p].qemu_id} still at {p} (hypervisor)" for p in sorted(paths) if now.function(p)]
    except HostError as e:
        leftovers.append(f"could not read the topology after the rollback: {e}")
    if agent is not None and paths:
        still = await _guest_still_has(agent, set(paths), timeout)
        leftovers += [f"{paths[p].qemu_id} still at {p} (guest)" for p in sorted(still)]
    return leftovers


async def _remove(backend: _Hypervisor, added: _Added, pf: PlannedFunction, persistent: bool) -> None:
    if isinstance(backend, QmpPlugging):
        await backend.device_del(pf.qemu_id)
    elif isinstance(backend, LibvirtPlugging):
        await backend.detach_xml(added.xml[pf.qemu_id], persistent=persistent)


async def _removed(
    events: AsyncIterator[Removal], waiting: dict[str, PlannedFunction], say: Callable[[str, str], None]
) -> None:
    async for ev in events:
        if ev.device in waiting:
            say("rollback", f"{ev.device} is gone")
            del waiting[ev.device]
        if not waiting:
            return


async def _delete(
    delete: Callable[[str], Awaitable[None]],
    what: str,
    name: str,
    leftovers: list[str],
    say: Callable[[str, str], None],
) -> None:
    try:
        await delete(name)
        say("rollback", f"{what} deleted")
    except HostError as e:
        leftovers.append(f"{what}: {e}")


async def _guest_still_has(agent: AgentForPlug, paths: set[PciPath], timeout: float) -> set[PciPath]:
    """Paths the guest still reports; watched until it stops (the guest ejects a slot a moment after QEMU)."""
    still = set(paths)

    def left(report: report_pb2.Report) -> set[PciPath]:
        return {g.path for g in GuestView.from_report(report).functions if g.path in paths}

    async def watch() -> None:
        nonlocal still
        async for msg in agent.watch_report(timeout=timeout):
            still = left(msg.report)
            if not still:
                return

    try:
        still = left(await asyncio.wait_for(agent.get_report(timeout=timeout), timeout + 1))
        if still:
            await asyncio.wait_for(watch(), timeout)
    except (TimeoutError, *AGENT_CALL_ERRORS):
        pass
    return still
