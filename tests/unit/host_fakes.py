"""Hand-built topologies and guest reports for the host side's unit tests."""

from __future__ import annotations

from collections.abc import Sequence

from unplugd.agent.model import PciAddress, PciPath
from unplugd.host.topology import Bus, BusKind, Function, Slot, Topology
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
