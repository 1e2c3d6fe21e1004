"""Hand-built topologies and guest reports for the host side's unit tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from unplugd.host.client import AgentCallFailed, AgentUnreachable
from unplugd.host.errors import BackendError
from unplugd.host.topology import Bus, BusKind, Function, Removal, Slot, Topology
from unplugd.pci import PciAddress, PciPath
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import report_pb2

ROOT_Q35 = Bus(BusKind.PCIE_ROOT, 0, 0, None, "pcie.0", hotplug=False)
ROOT_PC = Bus(BusKind.PCI_ROOT, 0, 0, None, "pci.0", hotplug=True, mechanism="acpi")


def port(bridge: str, name: str, *, hotplug: bool | None = True, kind: BusKind = BusKind.PCIE_ROOT_PORT) -> Bus:
    return Bus(kind, 0, 0, PciPath.parse(bridge), name, hotplug=hotplug, mechanism="pciehp" if hotplug else "")


def func(
    bus: Bus,
    slot: int,
    fn: int = 0,
    *,
    qemu_id: str | None = None,
    model: str = "virtio-blk-pci",
    bus_number: int = 0,
    is_bridge: bool = False,
    hotpluggable: bool | None = True,
    targets: tuple[str, ...] = (),
    alias: str | None = None,
) -> Function:
    return Function(
        path=bus.path_of(slot, fn),
        model=model,
        qemu_id=qemu_id,
        alias=alias,
        targets=targets,
        qom_path=f"/machine/peripheral/{qemu_id}" if qemu_id else None,
        is_bridge=is_bridge,
        hotpluggable=hotpluggable,
        guest_address=PciAddress(0, bus_number, slot, fn),
    )


def topology(*slots: tuple[Bus, int, Sequence[Function]], machine: str = "pc-q35-7.2", source: str = "qmp") -> Topology:
    return Topology(
        source=source,
        vm="vm",
        machine=machine,
        slots=tuple(Slot(bus, n, tuple(fs), machine) for bus, n, fs in slots),
    )


STATES = {
    "READY": report_pb2.FUNCTION_STATE_READY,
    "BUSY": report_pb2.FUNCTION_STATE_BUSY,
    "UNKNOWN": report_pb2.FUNCTION_STATE_UNKNOWN,
}


def gfunc(
    address: str,
    path: str,
    state: str = "READY",
    *,
    reasons: Sequence[tuple[str, str, bool]] = (),
    blocks: Sequence[str] = (),
    ifaces: Sequence[str] = (),
) -> report_pb2.PciFunction:
    f = report_pb2.PciFunction(address=address, pci_path=path, state=STATES[state])
    pp = PciPath.parse(path) if path and "/" in path else None
    if pp is not None:
        f.slot_path = pp.slot_path
    for code, detail, blocking in reasons:
        f.reasons.add(code=report_pb2.ReasonCode.Value(f"REASON_CODE_{code}"), detail=detail, blocking=blocking)
    for b in blocks:
        f.block_devices.add(name=b)
    for i in ifaces:
        f.net_interfaces.add(name=i)
    return f


def report(*functions: report_pb2.PciFunction) -> report_pb2.Report:
    r = report_pb2.Report(hostname="guest")
    r.functions.extend(functions)
    return r


# ---------------------------------------------------------------- fake backend and agent


class FakeBackend:
    """A hypervisor whose unplug behaviour the test chooses.

    on_unplug(fn) returns the Removals to emit (the whole slot, say), or raises.
    After a removal the function also disappears from topology(). With
    `lose_connection`, the listener breaks right after the unplug request (as
    when QEMU exits or libvirtd restarts); reconnect() then raises
    `reconnect_error`, or succeeds.
    """

    source = "qmp"

    def __init__(self, topo: Topology, on_unplug: Callable[[Function], list[Removal]] | None = None) -> None:
        self.topo = topo
        self.on_unplug = on_unplug or (lambda fn: [])
        self.calls: list[str] = []
        self.gone: set[str] = set()
        self._queues: list[asyncio.Queue[Removal | None]] = []
        self.lose_connection = False
        self.reconnect_error: Exception | None = None

    async def topology(self) -> Topology:
        self.calls.append("topology")
        slots = []
        for s in self.topo.slots:
            fs = tuple(f for f in s.functions if f.qemu_id not in self.gone)
            if fs:
                slots.append(Slot(s.bus, s.number, fs, s.machine))
        return Topology(self.topo.source, self.topo.vm, self.topo.machine, tuple(slots))

    async def request_unplug(self, fn: Function, *, via_monitor: bool = False) -> None:
        self.calls.append(f"unplug {fn.name}{' via monitor' if via_monitor else ''}")
        removals = self.on_unplug(fn)
        if self.lose_connection:
            self.lose_connection = False
            for q in self._queues:
                q.put_nowait(None)
            for removal in removals:  # they happen while nobody listens
                self.gone.add(removal.device or "")
            return
        for removal in removals:
            self.gone.add(removal.device or "")
            for q in self._queues:
                q.put_nowait(removal)

    async def reconnect(self) -> None:
        self.calls.append("reconnect")
        if self.reconnect_error is not None:
            raise self.reconnect_error

    @contextlib.asynccontextmanager
    async def removals(self) -> AsyncIterator[AsyncIterator[Removal]]:
        q: asyncio.Queue[Removal | None] = asyncio.Queue()
        self._queues.append(q)

        async def events() -> AsyncIterator[Removal]:
            while True:
                removal = await q.get()
                if removal is None:
                    raise BackendError("connection lost")
                yield removal

        try:
            yield events()
        finally:
            self._queues.remove(q)


class FakeAgent:
    """Serves `reports` in turn (the last one repeats); `dead` makes every call unreachable.

    Like the real agent, a report served while a lease is held carries a
    LEASED warning on the leased functions (by guest address).
    """

    def __init__(self, *reports: report_pb2.Report) -> None:
        self.reports = list(reports)
        self.calls: list[str] = []
        self.dead = False
        self.die_after_prepare = False
        self.prepare_error: Exception | None = None
        self.watch_reports: list[report_pb2.Report] = []
        self.leased: set[str] = set()
        self.lease_seconds = 0
        self.max_lease_seconds = 900  # what the agent grants at most, as its config says

    def _check(self, call: str) -> None:
        self.calls.append(call)
        if self.dead:
            raise AgentUnreachable("unix:/fake", "connection refused")

    async def get_report(self, devices: Sequence[str] = (), *, timeout: float | None = None) -> report_pb2.Report:
        self._check("get_report")
        return self._next_report()

    async def get_functions(self, *, timeout: float | None = None) -> report_pb2.Report:
        """The next report whole, as an agent older than functions_only answers: the functions are there."""
        self._check("get_functions")
        return self._next_report()

    def _next_report(self) -> report_pb2.Report:
        served = report_pb2.Report()
        served.CopyFrom(self.reports.pop(0) if len(self.reports) > 1 else self.reports[0])
        for f in served.functions:
            if f.address in self.leased:
                f.reasons.add(
                    code=report_pb2.REASON_CODE_LEASED, detail="held for unplug by lease 0123abcd", blocking=False
                )
        return served

    async def prepare_unplug(
        self,
        devices: Sequence[str],
        lease_seconds: int,
        take_interfaces_down: bool = False,
        *,
        lease_id: str = "",
        timeout: float | None = None,
    ) -> pb.PrepareUnplugResponse:
        self._check(f"prepare {','.join(devices)}")
        if self.prepare_error is not None:
            raise self.prepare_error
        if self.die_after_prepare:
            self.dead = True
        self.leased |= set(devices)
        self.lease_seconds = lease_seconds
        resp = pb.PrepareUnplugResponse(lease_id="lease-1", functions=list(devices))
        granted = min(lease_seconds, self.max_lease_seconds)
        resp.expires_at.FromNanoseconds(int((time.time() + granted) * 1e9))
        return resp

    async def release_unplug(self, lease_id: str, *, timeout: float | None = None) -> pb.ReleaseUnplugResponse:
        self._check(f"release {lease_id}")
        self.leased.clear()
        return pb.ReleaseUnplugResponse(released=True)

    async def watch_report(
        self, devices: Sequence[str] = (), *, timeout: float | None = None
    ) -> AsyncIterator[pb.WatchReportResponse]:
        self._check("watch")
        for r in self.watch_reports:
            await asyncio.sleep(0)
            yield pb.WatchReportResponse(report=r)
        await asyncio.sleep(3600)  # a stream that stays open, like the real one


def claim_conflict() -> AgentCallFailed:
    return AgentCallFailed("unix:/fake", "PrepareUnplug", grpc.StatusCode.FAILED_PRECONDITION, "vdb1 is mounted")
