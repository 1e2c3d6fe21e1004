"""Hot-add, decided: where devices can go, where they go, in what order, and what the guest made of them. Pure.

Room. A slot can take a hot-added device when its bus can hot-plug (the same judgement
unplug makes: topology.assess_hotplug, asked for an empty slot) and nothing sits in it. Which
slot numbers a bus has depends on its kind: a PCIe port's link has one device number, 0; a
pci-bridge's slot 0 is reserved (SHPC numbers its slots from 1, and libvirt never places a
device there); a conventional root bus has 32. A free slot takes a whole 8-function device.

Order. Several devices for one slot become one multifunction slot. QEMU tells the guest
(ACPI or pciehp) about a slot only when its function 0 arrives, and refuses a function 0
without multifunction=on next to functions already there. So functions 1..7 go first, and
function 0 last with multifunction=on: the guest then enumerates the whole slot at once.

Arrival. A function counts as arrived when the guest agent reports it at its PCI path
with a driver bound and the objects its kind promises (an interface for a NIC, a block
device for a disk; for other kinds the driver alone): PRESENT. Reported but without them:
NO_DRIVER. Not reported: MISSING.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from unplugd.host.devicespec import DeviceSpec, SlotRequest, SpecError
from unplugd.host.errors import HostError
from unplugd.host.planner import GuestView
from unplugd.host.topology import Bus, BusKind, Hotplug, Slot, Topology, assess_hotplug
from unplugd.pci import PciPath

__all__ = [
    "Arrival",
    "BusRoom",
    "FunctionArrival",
    "NoRoom",
    "PlannedFunction",
    "SlotPlug",
    "arrival",
    "expected_objects",
    "find_slot",
    "plan_plug",
    "room",
]

SLOTS_PER_BUS = 32  # PCI: device numbers 0x00-0x1f on a bus


class NoRoom(HostError):
    """The slot asked for cannot take the devices, or no free slot is left."""


# ---------------------------------------------------------------- room


def _slot_numbers(bus: Bus) -> tuple[range, str]:
    """The device numbers a bus offers, and a note on what it leaves out."""
    if bus.kind in (BusKind.PCIE_ROOT_PORT, BusKind.PCIE_SWITCH_DOWNSTREAM_PORT):
        return range(0, 1), "a PCIe link has one device number, 0"
    if bus.kind is BusKind.PCI_BRIDGE:
        return range(1, SLOTS_PER_BUS), "slot 0 of a pci-bridge is reserved (SHPC numbers slots from 1)"
    return range(0, SLOTS_PER_BUS), ""


@dataclass(frozen=True)
class BusRoom:
    """One bus: which slots are free for a hot-add, which are taken, and why others cannot take one."""

    bus: Bus
    hotplug: Hotplug  # what assess_hotplug says of an empty slot on this bus (slot-specific refusals below)
    free: tuple[int, ...]
    occupied: tuple[Slot, ...]
    refused: tuple[tuple[int, str], ...]  # empty slots that still cannot take a device, and why
    note: str = ""

    @property
    def whole_slot(self) -> bool:
        """Does an 8-function device fit here (a free slot on a bus that hot-plugs)?"""
        return bool(self.free)


def _bus_room(bus: Bus, topology: Topology) -> BusRoom:
    numbers, note = _slot_numbers(bus)
    free: list[int] = []
    occupied: list[Slot] = []
    refused: list[tuple[int, str]] = []
    bus_says = assess_hotplug(bus, numbers[-1], (), topology.machine)
    for n in numbers:
        slot = topology.slot(bus.path_of(n, 0).slot_path)
        if slot is not None and slot.functions:
            occupied.append(slot)
            continue
        hp = assess_hotplug(bus, n, (), topology.machine)
        if hp:
            free.append(n)
        elif hp.reason != bus_says.reason:
            refused.append((n, hp.reason))  # this slot only (i440fx 0 and 1); the bus's own reason is said once
    return BusRoom(bus, bus_says, tuple(free) if bus_says else (), tuple(occupied), tuple(refused), note)


def room(topology: Topology) -> tuple[BusRoom, ...]:
    """Every bus of the VM with its free and taken slots, in topology order (for `unplugctl slots`)."""
    return tuple(_bus_room(b, topology) for b in sorted(topology.buses, key=_bus_order))


def _bus_order(bus: Bus) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    return (bus.domain, bus.root_bus, bus.bridge.hops if bus.bridge else ())


def find_slot(text: str, topology: Topology) -> tuple[Bus, int]:
    """--slot -> (bus, slot number). Forms: a slot path (0000:00/05.0/03), BUS:SLOT with the bus's
    QEMU id or libvirt alias and the slot in hex as in QEMU's addr= (br0:0x3, pci.0:7), or a
    port's name alone (rp1: its one slot, 0)."""
    s = text.strip()
    buses = topology.buses
    if "/" in s:
        for b in buses:
            for n in range(SLOTS_PER_BUS):
                if b.path_of(n, 0).slot_path == s:
                    return b, n
        raise SpecError(f"--slot {text!r}: no bus of this VM has that slot path")
    name, colon, number = s.rpartition(":")
    if not colon:
        name, number = s, ""
    found = next((b for b in buses if name in {b.name, b.key}), None)
    if found is None:
        known = ", ".join(sorted(b.name for b in buses))
        raise SpecError(f"--slot {text!r}: no bus named {name!r} (buses: {known})")
    bus = found
    if not number:
        numbers, _ = _slot_numbers(bus)
        if len(numbers) != 1:
            raise SpecError(f"--slot {text!r}: bus {bus.name} has several slots; say which (BUS:SLOT)")
        return bus, numbers[0]
    try:
        slot = int(number, 16)
    except ValueError:
        raise SpecError(f"--slot {text!r}: {number!r} is not a slot number (hex, as in QEMU's addr=)") from None
    if not 0 <= slot < SLOTS_PER_BUS:
        raise SpecError(f"--slot {text!r}: slot numbers are 0x0-0x1f")
    return bus, slot


# ---------------------------------------------------------------- the plan

_NET = frozenset(
    {"virtio-net-pci", "virtio-net-pci-transitional", "virtio-net-pci-non-transitional", "e1000", "e1000e",
     "rtl8139", "vmxnet3", "igb", "pcnet", "ne2k_pci"}
)  # fmt: skip
_BLOCK = frozenset({"virtio-blk-pci", "virtio-blk-pci-transitional", "virtio-blk-pci-non-transitional", "nvme"})


def expected_objects(driver: str) -> str:
    """What the guest shows for a device of this QEMU driver once a driver took it: "interface",
    "block device", or "" when the driver binding alone is the proof (kinds we know no object for)."""
    if driver in _NET:
        return "interface"
    if driver in _BLOCK:
        return "block device"
    return ""


# Made-up ids keep to what both QEMU ids and libvirt user aliases (ua-[A-Za-z0-9_-]+) allow.
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class PlannedFunction:
    spec: DeviceSpec
    function: int
    qemu_id: str
    path: PciPath
    expects: str  # expected_objects()

    @property
    def name(self) -> str:
        return self.qemu_id


@dataclass(frozen=True)
class SlotPlug:
    """One slot to fill: where, the functions by number, and the order to add them."""

    request: SlotRequest
    bus: Bus
    slot: int
    functions: tuple[PlannedFunction, ...]  # by function number
    chosen: bool  # a free slot unplugctl picked (no --slot)

    @property
    def slot_path(self) -> str:
        return self.bus.path_of(self.slot, 0).slot_path

    @property
    def multifunction(self) -> bool:
        return len(self.functions) > 1

    @property
    def order(self) -> tuple[PlannedFunction, ...]:
        """Functions 1..7 first, function 0 last: the guest hears of the slot when function 0 arrives."""
        return tuple(sorted(self.functions, key=lambda f: (f.function == 0, f.function)))

    def device_add(self, pf: PlannedFunction) -> dict[str, str]:
        """device_add's arguments for one function: the spec's own properties plus the place."""
        args = {"driver": pf.spec.driver, **dict(pf.spec.props), "id": pf.qemu_id}
        args["bus"] = self.bus.name
        args["addr"] = f"{self.slot:#x}.{pf.function}"
        if pf.function == 0 and self.multifunction:
            args["multifunction"] = "on"
        return args


def _default_id(bus: Bus, slot: int, function: int) -> str:
    return "up-" + _ID_UNSAFE.sub("-", f"{bus.name}-{slot:02x}-{function}")


def plan_plug(topology: Topology, requests: Sequence[SlotRequest]) -> tuple[SlotPlug, ...]:
    """Where each requested slot goes and its functions' ids and paths; NoRoom or SpecError if it cannot be."""
    taken: set[str] = set()
    rooms = room(topology)
    known = {n for f in topology.functions() for n in f.names}
    ids: set[str] = set()
    out: list[SlotPlug] = []
    for req in requests:
        if req.slot is not None:
            bus, number = find_slot(req.slot, topology)
            _check_place(bus, number, topology, taken)
            chosen = False
        else:
            bus, number = _first_free(rooms, taken, req)
            chosen = True
        taken.add(bus.path_of(number, 0).slot_path)
        funcs: list[PlannedFunction] = []
        for fn, spec in enumerate(req.devices):
            qid = spec.id or _default_id(bus, number, fn)
            if qid in known or qid in ids:
                raise SpecError(f"id {qid!r} is taken: the VM or another spec already has it")
            ids.add(qid)
            funcs.append(PlannedFunction(spec, fn, qid, bus.path_of(number, fn), expected_objects(spec.driver)))
        out.append(SlotPlug(req, bus, number, tuple(funcs), chosen))
    return tuple(out)


def _check_place(bus: Bus, number: int, topology: Topology, taken: Iterable[str]) -> None:
    numbers, note = _slot_numbers(bus)
    where = f"slot {number:#x} of {bus.kind.value} {bus.name}"
    if number not in numbers:
        raise NoRoom(f"{where} does not exist: {note}")
    hp = assess_hotplug(bus, number, (), topology.machine)
    if not hp:
        raise NoRoom(f"{where} cannot take a hot-added device: {hp.reason}")
    slot_path = bus.path_of(number, 0).slot_path
    slot = topology.slot(slot_path)
    if slot is not None and slot.functions:
        names = ", ".join(f"{f.name} ({f.model})" for f in slot.functions)
        raise NoRoom(f"{where} ({slot_path}) is occupied by {names}")
    if slot_path in taken:
        raise NoRoom(f"{where} ({slot_path}) is asked for twice")


# Which free slots are taken first: a PCIe port's (a device behind its own port is what PCIe machines
# expect, and pciehp drives it natively), then a root bus's, then a bridge's (one more bus level).
_PREFERENCE = {BusKind.PCIE_ROOT_PORT: 0, BusKind.PCIE_SWITCH_DOWNSTREAM_PORT: 0, BusKind.PCI_ROOT: 1}


def _first_free(rooms: Sequence[BusRoom], taken: set[str], req: SlotRequest) -> tuple[Bus, int]:
    for r in sorted(rooms, key=lambda r: _PREFERENCE.get(r.bus.kind, 2)):  # stable: topology order within
        for n in r.free:
            if r.bus.path_of(n, 0).slot_path not in taken:
                return r.bus, n
    what = f"{len(req.devices)}-function slot" if len(req.devices) > 1 else "device"
    raise NoRoom(f"no free hotpluggable slot is left for a {what} (see `unplugctl slots`)")


# ---------------------------------------------------------------- arrival


class Arrival(Enum):
    PRESENT = "PRESENT"  # reported at its path, a driver bound, its objects there
    NO_DRIVER = "NO_DRIVER"  # reported, but no driver took it (or its objects did not appear)
    MISSING = "MISSING"  # the guest does not report it


@dataclass(frozen=True)
class FunctionArrival:
    planned: PlannedFunction
    arrival: Arrival
    detail: str
    address: str = ""  # the guest's BDF
    driver: str = ""
    objects: tuple[str, ...] = ()  # interface names, block device names (guest text: print escaped)


def arrival(pf: PlannedFunction, guest: GuestView | None) -> FunctionArrival:
    g = guest.function(pf.path) if guest is not None else None
    if g is None:
        return FunctionArrival(pf, Arrival.MISSING, f"the guest does not report {pf.path}")
    objects = {"interface": g.net_interfaces, "block device": g.block_devices}.get(pf.expects, g.names)
    if not g.driver:
        return FunctionArrival(pf, Arrival.NO_DRIVER, "reported, but no driver is bound", g.address, "", objects)
    if pf.expects and not objects:
        return FunctionArrival(
            pf, Arrival.NO_DRIVER, f"driver {g.driver} bound, but no {pf.expects} appeared", g.address, g.driver, ()
        )
    shown = f" ({', '.join(objects)})" if objects else ""
    return FunctionArrival(pf, Arrival.PRESENT, f"driver {g.driver}{shown}", g.address, g.driver, tuple(objects))
