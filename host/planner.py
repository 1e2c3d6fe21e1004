"""The planner: guest report + hypervisor topology -> one SlotPlan per slot. Pure.

The two are joined by PCI path (the chain of slot.function hops from the root
bus), never by the guest's bus numbers. A slot is the unit of unplug: QEMU
removes every function of a slot when function 0 goes (ACPI ejects the slot,
PCIe powers the port off), and a bridge takes everything behind it. So each
plan covers every function that would leave, and the verdict weighs them all:

    NOT_HOTPLUGGABLE   the virtual hardware cannot do it (Slot.hotplug)
    GUEST_UNREACHABLE  no guest report, or the guest cannot vouch for a function
                       (UNKNOWN, or a function the guest does not report at all)
    BLOCKED_BY_GUEST   some function that would leave is BUSY in the guest
    NEEDS_COMPANIONS   functions that were not asked for would leave too
    UNPLUGGABLE        none of the above

Every finding is kept, not just the first: `--force` overrides all but the
companions (which only `with_companions` consents to), and the orchestrator
says exactly which findings it overrode.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

from unplugd.host.errors import AmbiguousDevice, DeviceNotFound
from unplugd.host.topology import Function, Hotplug, Slot, Topology
from unplugd.pci import PciAddress, PciPath
from unplugd.reason_codes import code_name
from unplugd.v1 import report_pb2

__all__ = [
    "Finding",
    "FunctionPlan",
    "GuestFunction",
    "GuestReason",
    "GuestView",
    "Plan",
    "Selection",
    "SlotPlan",
    "Step",
    "StepKind",
    "Verdict",
    "plan",
    "plan_slot",
    "resolve",
]


class Verdict(Enum):
    UNPLUGGABLE = "UNPLUGGABLE"
    BLOCKED_BY_GUEST = "BLOCKED_BY_GUEST"
    NOT_HOTPLUGGABLE = "NOT_HOTPLUGGABLE"
    NEEDS_COMPANIONS = "NEEDS_COMPANIONS"
    GUEST_UNREACHABLE = "GUEST_UNREACHABLE"


# Which finding names the verdict when there are several.
_PRECEDENCE = (
    Verdict.NOT_HOTPLUGGABLE,
    Verdict.BLOCKED_BY_GUEST,
    Verdict.GUEST_UNREACHABLE,
    Verdict.NEEDS_COMPANIONS,
)


# ---------------------------------------------------------------- the guest's side


@dataclass(frozen=True)
class GuestReason:
    code: str  # MOUNTED, SWAP, ... (reason_codes.code_name: the proto name without its prefix)
    detail: str
    blocking: bool
    object: str = ""


@dataclass(frozen=True)
class GuestFunction:
    address: str  # the guest's BDF, for people
    path: PciPath
    state: str  # READY | BUSY | UNKNOWN
    reasons: tuple[GuestReason, ...] = ()
    driver: str = ""
    block_devices: tuple[str, ...] = ()
    net_interfaces: tuple[str, ...] = ()
    hotplug_slot: str = ""
    is_bridge: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.block_devices, *self.net_interfaces)


@dataclass(frozen=True)
class GuestView:
    """What the guest agent reported, reduced to what the planner needs."""

    functions: tuple[GuestFunction, ...]
    hostname: str = ""
    problems: tuple[str, ...] = ()  # report problems and entries the planner could not read

    @classmethod
    def from_report(cls, report: report_pb2.Report) -> GuestView:
        functions: list[GuestFunction] = []
        problems = [f"{p.object}: {p.detail}" for p in report.problems]
        for f in report.functions:
            try:
                path = PciPath.parse(f.pci_path)
            except ValueError:
                problems.append(f"guest function {f.address or '?'} has no usable PCI path ({f.pci_path!r})")
                continue
            state = report_pb2.FunctionState.Name(f.state).removeprefix("FUNCTION_STATE_")
            functions.append(
                GuestFunction(
                    address=f.address,
                    path=path,
                    state=state if state in ("READY", "BUSY") else "UNKNOWN",
                    reasons=tuple(
                        GuestReason(
                            code_name(r.code),
                            r.detail,
                            r.blocking,
                            r.object,
                        )
                        for r in f.reasons
                    ),
                    driver=f.driver,
                    block_devices=tuple(b.name for b in f.block_devices),
                    net_interfaces=tuple(n.name for n in f.net_interfaces),
                    hotplug_slot=f.hotplug_slot,
                    is_bridge=f.is_bridge,
                )
            )
        return cls(tuple(functions), report.hostname, tuple(problems))

    def function(self, path: PciPath) -> GuestFunction | None:
        return next((f for f in self.functions if f.path == path), None)

    def inside(self, slot: PciPath, bridges: Iterable[PciPath]) -> list[GuestFunction]:
        """The functions in `slot`'s slot or behind one of `bridges`, in report order."""
        keys = [(slot.domain, slot.root_bus, (*slot.hops[:-1], (slot.hops[-1][0], -1)))]
        keys += [(b.domain, b.root_bus, b.hops) for b in bridges]
        found = {i for k in keys for i in self._within.get(k, ())}
        return [self.functions[i] for i in sorted(found)]

    @cached_property
    def _within(self) -> dict[tuple[int, int, tuple[tuple[int, int], ...]], tuple[int, ...]]:
        """(domain, root bus, hops of a slot or a bridge) -> the indexes of the functions in that slot
        or below that bridge. Built once: `status` plans every slot, and a scan of every function for
        each slot is quadratic (205 slots x 259 functions on the bench VM)."""
        out: dict[tuple[int, int, tuple[tuple[int, int], ...]], list[int]] = {}
        for i, g in enumerate(self.functions):
            p = g.path
            # its slot (the last hop with function -1), then every bridge above it
            out.setdefault((p.domain, p.root_bus, (*p.hops[:-1], (p.hops[-1][0], -1))), []).append(i)
            for k in range(1, len(p.hops)):
                out.setdefault((p.domain, p.root_bus, p.hops[:k]), []).append(i)
        return {k: tuple(v) for k, v in out.items()}


# ---------------------------------------------------------------- plans


@dataclass(frozen=True)
class FunctionPlan:
    path: PciPath
    host: Function | None  # None: only the guest reports it
    guest: GuestFunction | None  # None: the guest does not report it (or was not asked)
    requested: bool  # asked for, as opposed to leaving with the slot
    behind_bridge: bool = False  # below a bridge in the slot

    @property
    def name(self) -> str:
        if self.host is not None:
            return self.host.name
        return self.guest.address if self.guest else str(self.path)

    @property
    def guest_state(self) -> str:
        """READY | BUSY | UNKNOWN, or ABSENT when the guest does not report the function."""
        return self.guest.state if self.guest else "ABSENT"

    @property
    def blocking_reasons(self) -> tuple[GuestReason, ...]:
        return tuple(r for r in self.guest.reasons if r.blocking) if self.guest else ()


@dataclass(frozen=True)
class Finding:
    verdict: Verdict
    detail: str
    path: PciPath | None = None


class StepKind(Enum):
    PREPARE = "prepare"
    UNPLUG = "unplug"
    WAIT_DELETED = "wait-deleted"
    CONFIRM_GONE = "confirm-gone"
    RELEASE = "release"


@dataclass(frozen=True)
class Step:
    kind: StepKind
    detail: str
    target: Function | None = None  # UNPLUG: the function to device_del / detach
    paths: tuple[PciPath, ...] = ()  # PREPARE / WAIT_DELETED / CONFIRM_GONE: the functions concerned
    via_monitor: bool = False  # libvirt: device_del through the QEMU monitor (taints the domain)


@dataclass(frozen=True)
class SlotPlan:
    slot_path: str
    slot: Slot | None  # None: only the guest reports this slot
    hotplug: Hotplug
    functions: tuple[FunctionPlan, ...]  # everything that would leave: the slot and what is behind it
    findings: tuple[Finding, ...]
    steps: tuple[Step, ...]
    guest_reachable: bool

    @property
    def verdict(self) -> Verdict:
        for v in _PRECEDENCE:
            if any(f.verdict is v for f in self.findings):
                return v
        return Verdict.UNPLUGGABLE

    @property
    def companions(self) -> tuple[FunctionPlan, ...]:
        return tuple(f for f in self.functions if not f.requested)

    @property
    def requested(self) -> tuple[FunctionPlan, ...]:
        return tuple(f for f in self.functions if f.requested)

    @property
    def unplug_target(self) -> Function | None:
        return next((s.target for s in self.steps if s.kind is StepKind.UNPLUG), None)

    def overrides(self, *, force: bool, with_companions: bool) -> tuple[Finding, ...] | None:
        """The findings a go-ahead would override; None when it may not go ahead at all.

        Companions need `with_companions`; everything else needs `force`.
        """
        companions = [f for f in self.findings if f.verdict is Verdict.NEEDS_COMPANIONS]
        others = [f for f in self.findings if f.verdict is not Verdict.NEEDS_COMPANIONS]
        if companions and not with_companions:
            return None
        if others and not force:
            return None
        return tuple(others)

    def guest_devices(self) -> tuple[str, ...]:
        """Guest addresses of the leaving functions the guest knows (for PrepareUnplug)."""
        return tuple(f.guest.address for f in self.functions if f.guest and f.guest.address)


@dataclass(frozen=True)
class Plan:
    slots: tuple[SlotPlan, ...]
    guest_reachable: bool
    guest_error: str = ""
    # Functions only one side knows: a sign of a hot-plug in flight, a guest
    # that has not enumerated a bus yet, or a layout the join does not cover.
    guest_only: tuple[GuestFunction, ...] = ()
    host_only: tuple[Function, ...] = ()
    guest_problems: tuple[str, ...] = ()

    def slot(self, slot_path: str) -> SlotPlan | None:
        return next((s for s in self.slots if s.slot_path == slot_path), None)


@dataclass(frozen=True)
class Selection:
    """What a DEVICE argument named: a slot, and which of its functions."""

    slot_path: str
    paths: frozenset[PciPath] = field(default_factory=frozenset)  # empty: the whole slot
    how: str = ""  # how the selector matched, for people


# ---------------------------------------------------------------- resolving DEVICE


def _slot_selection(paths: Iterable[PciPath], selector: str, how: str) -> Selection:
    ps = frozenset(paths)
    slots = sorted({p.slot_path for p in ps})
    if not slots:
        raise DeviceNotFound(selector)
    if len(slots) > 1:
        raise AmbiguousDevice(selector, slots)
    return Selection(slots[0], ps, how)


def resolve(selector: str, topology: Topology, guest: GuestView | None = None) -> Selection:
    """DEVICE -> Selection. Forms, in order: PCI path of a function or a slot
    (0000:00/03.0/05.0, 0000:00/03.0/05), guest BDF (0000:01:05.0, through the
    guest's report when there is one: guest bus numbers are the guest's), a
    QEMU id / libvirt alias / target / QOM path, a guest block device or
    interface name."""
    s = selector.strip()
    try:
        path = PciPath.parse(s)
    except ValueError:
        path = None
    if path is not None:
        known = topology.function(path) or (guest.function(path) if guest else None)
        if known is None:
            raise DeviceNotFound(selector)
        return Selection(path.slot_path, frozenset({path}), "PCI path")
    if s.count("/") >= 1 and ":" in s:
        slot_funcs = [f.path for f in topology.functions() if f.slot_path == s]
        slot_funcs += [g.path for g in guest.functions if g.path.slot_path == s] if guest else []
        if slot_funcs:
            return Selection(s, frozenset(), "slot path")
        raise DeviceNotFound(selector)
    try:
        bdf = PciAddress.parse(s)
    except ValueError:
        bdf = None
    if bdf is not None:
        if guest is not None:
            hits = [g.path for g in guest.functions if g.address == str(bdf)]
            if hits:
                return _slot_selection(hits, selector, "guest address (from the guest's report)")
        hits = [f.path for f in topology.functions() if f.guest_address == bdf]
        return _slot_selection(hits, selector, "guest address (as the firmware numbered it)")
    hits = [f.path for f in topology.by_name(s)]
    if hits:
        return _slot_selection(hits, selector, "hypervisor name")
    if guest is not None:
        hits = [g.path for g in guest.functions if s in g.names]
        if hits:
            return _slot_selection(hits, selector, "guest device name")
    raise DeviceNotFound(selector)


# ---------------------------------------------------------------- planning


def _guest_findings(fp: FunctionPlan, reachable: bool) -> list[Finding]:
    if not reachable:
        return []
    g = fp.guest
    if g is None:
        return [
            Finding(
                Verdict.GUEST_UNREACHABLE,
                f"{fp.name} ({fp.path}): the guest does not report this function (not enumerated by the "
                "guest yet, or guest and host disagree on the PCI path)",
                fp.path,
            )
        ]
    if g.state == "BUSY":
        why = "; ".join(r.detail or r.code for r in fp.blocking_reasons) or "busy"
        return [Finding(Verdict.BLOCKED_BY_GUEST, f"{fp.name} ({g.address}) is busy in the guest: {why}", fp.path)]
    if g.state != "READY":
        why = "; ".join(r.detail or r.code for r in g.reasons) or "the agent could not tell"
        return [Finding(Verdict.GUEST_UNREACHABLE, f"{fp.name} ({g.address}): guest state unknown: {why}", fp.path)]
    return []


def plan_slot(
    slot_path: str,
    topology: Topology,
    guest: GuestView | None,
    *,
    requested: frozenset[PciPath] = frozenset(),
    prepare: bool = False,
    guest_error: str = "",
) -> SlotPlan:
    """Plan the unplug of one slot. `requested` empty: the whole slot was asked for."""
    slot = topology.slot(slot_path)
    reachable = guest is not None
    host_funcs: list[tuple[Function, bool]] = [(f, False) for f in (slot.functions if slot else ())]
    for f, _ in list(host_funcs):
        if f.is_bridge:
            host_funcs.extend((g, True) for s in topology.behind(f.path) for g in s.functions)
    paths = {f.path for f, _ in host_funcs}
    behind = {f.path for f, b in host_funcs if b}
    guest_funcs: dict[PciPath, GuestFunction] = {}
    if guest is not None:
        bridges = [f.path for f, _ in host_funcs if f.is_bridge]
        for g in guest.inside(_slot_as_path(slot_path), bridges):
            guest_funcs[g.path] = g
            if g.path not in paths and g.path.slot_path != slot_path:
                behind.add(g.path)
    by_host = {f.path: f for f, _ in host_funcs}
    all_paths = sorted(paths | set(guest_funcs))
    wanted = requested or frozenset(p for p in all_paths if p.slot_path == slot_path)
    functions = tuple(FunctionPlan(p, by_host.get(p), guest_funcs.get(p), p in wanted, p in behind) for p in all_paths)

    findings: list[Finding] = []
    hotplug = slot.hotplug if slot else Hotplug(False, "the hypervisor has no such slot")
    if not hotplug:
        findings.append(Finding(Verdict.NOT_HOTPLUGGABLE, hotplug.reason))
    if not reachable:
        findings.append(
            Finding(Verdict.GUEST_UNREACHABLE, f"no answer from the guest agent: {guest_error or 'not asked'}")
        )
    for fp in functions:
        # A function only the guest reports (an SR-IOV VF, say) leaves with the
        # slot all the same: its guest state counts like any other's.
        findings.extend(_guest_findings(fp, reachable))
    companions = [fp for fp in functions if not fp.requested]
    if companions:
        names = ", ".join(f"{fp.name} ({fp.path})" for fp in companions)
        findings.append(
            Finding(Verdict.NEEDS_COMPANIONS, f"these functions would leave with it: {names}", companions[0].path)
        )
    steps = _steps(slot, topology, functions, reachable, prepare)
    return SlotPlan(slot_path, slot, hotplug, functions, tuple(findings), steps, reachable)


def _steps(
    slot: Slot | None,
    topology: Topology,
    functions: Sequence[FunctionPlan],
    reachable: bool,
    prepare: bool,
) -> tuple[Step, ...]:
    if slot is None or not slot.functions:
        return ()
    leaving = tuple(fp.path for fp in functions if fp.host is not None)
    known = tuple(fp.path for fp in functions if fp.guest is not None)
    steps: list[Step] = []
    if prepare and reachable and known:
        steps.append(
            Step(StepKind.PREPARE, "lease the functions' block devices in the guest (PrepareUnplug)", paths=known)
        )
    target = slot.function0 or slot.functions[0]
    monitor = topology.source == "libvirt" and slot.multifunction
    if len(slot.functions) > 1:
        how = f"device_del {target.name} (function {target.path.function}): the whole slot leaves with it"
    else:
        how = f"unplug {target.name}"
    if monitor:
        how += (
            "; libvirt refuses to detach from a multifunction slot, so this goes through the QEMU monitor "
            "(libvirt marks the domain tainted)"
        )
    steps.append(Step(StepKind.UNPLUG, how, target=target, via_monitor=monitor))
    steps.append(
        Step(StepKind.WAIT_DELETED, f"wait until the hypervisor reports all {len(leaving)} gone", paths=leaving)
    )
    if reachable:
        steps.append(
            Step(StepKind.CONFIRM_GONE, "confirm with the agent that the guest no longer has them", paths=known)
        )
    if prepare and reachable and known:
        steps.append(Step(StepKind.RELEASE, "release the lease (also on any failure)", paths=known))
    return tuple(steps)


def plan(
    topology: Topology,
    guest: GuestView | None,
    *,
    guest_error: str = "",
) -> Plan:
    """Every slot of the VM, each as a whole (for `unplugctl status`)."""
    host_paths = {f.path for f in topology.functions()}
    guest_paths = {g.path for g in guest.functions} if guest else set()
    slot_paths = {s.path for s in topology.slots} | {p.slot_path for p in guest_paths}
    plans = tuple(plan_slot(sp, topology, guest, guest_error=guest_error) for sp in sorted(slot_paths, key=_slot_key))
    return Plan(
        slots=plans,
        guest_reachable=guest is not None,
        guest_error=guest_error,
        guest_only=tuple(g for g in guest.functions if g.path not in host_paths) if guest else (),
        host_only=tuple(f for f in topology.functions() if guest is not None and f.path not in guest_paths),
        guest_problems=guest.problems if guest else (),
    )


def _slot_as_path(slot_path: str) -> PciPath:
    """`0000:00/03.0/05` -> the path of its function 0 (what GuestView.inside keys by)."""
    return PciPath.parse(f"{slot_path}.0")


def _slot_key(slot_path: str) -> tuple[int, ...]:
    """Sort `0000:00/03.0/05` numerically."""
    head, *rest = slot_path.split("/")
    dom, bus = head.split(":")
    out = [int(dom, 16), int(bus, 16)]
    for hop in rest:
        s, _, f = hop.partition(".")
        out += [int(s, 16), int(f or "0")]
    return tuple(out)
