"""A VM's PCI topology as the hypervisor sees it, independent of QEMU or libvirt.

Everything is keyed by PciPath (unplugd.pci, the contract): the chain of slot.function hops
from a root bus. Bus numbers are firmware's business (and 0 before firmware ran);
the guest agent derives the same path from sysfs, so the planner joins on it.

Slot-level hotpluggability is decided here, from facts the backends collect
(bus kind, whether the bus has a hotplug handler, the device types' own
`hotpluggable`, the machine type), by one pure function: assess_hotplug().
Both backends place each function on its bus and leave the grouping into
slots to group_slots().
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

from unplugd.pci import PciAddress, PciPath

__all__ = [
    "Bus",
    "BusKind",
    "Function",
    "Hotplug",
    "Removal",
    "Slot",
    "Topology",
    "assess_hotplug",
    "group_slots",
]


class BusKind(Enum):
    """What kind of bus a slot sits on (the controller that provides the slot)."""

    PCI_ROOT = "pci-root"  # i440fx pci.0: conventional, ACPI hotplug
    PCIE_ROOT = "pcie-root"  # q35 pcie.0: root complex integrated endpoints
    PCIE_ROOT_PORT = "pcie-root-port"
    PCIE_SWITCH_UPSTREAM_PORT = "pcie-switch-upstream-port"  # its bus holds downstream ports
    PCIE_SWITCH_DOWNSTREAM_PORT = "pcie-switch-downstream-port"
    PCI_BRIDGE = "pci-bridge"
    DMI_TO_PCI_BRIDGE = "dmi-to-pci-bridge"
    PCI_EXPANDER = "pci-expander-bus"  # pxb: a further conventional root bus
    PCIE_EXPANDER = "pcie-expander-bus"  # pxb-pcie: a further root complex
    UNKNOWN = "unknown"

    @property
    def is_root(self) -> bool:
        return self in (BusKind.PCI_ROOT, BusKind.PCIE_ROOT, BusKind.PCI_EXPANDER, BusKind.PCIE_EXPANDER)


@dataclass(frozen=True)
class Hotplug:
    """Whether a slot can be hot-unplugged, and why (not)."""

    supported: bool
    reason: str

    def __bool__(self) -> bool:
        return self.supported


@dataclass(frozen=True)
class Bus:
    kind: BusKind
    domain: int
    root_bus: int  # number of the root bus this bus descends from
    # The function whose secondary bus this is; None for a root bus.
    bridge: PciPath | None
    name: str  # QEMU bus id (pcie.0, rp1) or libvirt controller alias (pci.3)
    # Does the hypervisor have a hotplug handler on this bus? None: it did not say.
    hotplug: bool | None
    mechanism: str = ""  # "acpi", "pciehp", "shpc" or "" when none/unknown
    # Bus number the firmware assigned (query-pci); None or 0 before it ran.
    number: int | None = None

    def path_of(self, slot: int, function: int) -> PciPath:
        hops = (self.bridge.hops if self.bridge else ()) + ((slot, function),)
        return PciPath(self.domain, self.root_bus, hops)

    @property
    def key(self) -> str:
        """`0000:00` for a root bus, the bridge's PCI path otherwise."""
        return str(self.bridge) if self.bridge else f"{self.domain:04x}:{self.root_bus:02x}"


@dataclass(frozen=True)
class Function:
    path: PciPath
    model: str  # QEMU type (virtio-blk-pci) or libvirt element/model (disk virtio)
    qemu_id: str | None = None  # QEMU device id; under libvirt it equals the alias
    alias: str | None = None  # libvirt <alias name=...>
    targets: tuple[str, ...] = ()  # vdb, vnet3 ...: what people call the device
    qom_path: str | None = None
    vendor_id: int | None = None
    device_id: int | None = None
    class_code: int | None = None  # 16-bit class/subclass as query-pci reports it
    description: str = ""
    is_bridge: bool = False
    # Does the device type allow hot-unplug at all (QOM `hotpluggable`)? None: unknown.
    hotpluggable: bool | None = None
    # multifunction=on set on this function; None: not read (QMP: a function > 0 beside siblings,
    # where the slot is multifunction by its count and the flag changes nothing)
    multifunction: bool | None = False
    # The address with the bus number firmware assigned; for people and for
    # matching a guest BDF when no guest report is at hand.
    guest_address: PciAddress | None = None

    @property
    def slot_path(self) -> str:
        return self.path.slot_path

    @property
    def name(self) -> str:
        """The best handle for people: id/alias, else QOM path, else PCI path."""
        return self.alias or self.qemu_id or self.qom_path or str(self.path)

    @property
    def names(self) -> tuple[str, ...]:
        """Every identifier a DEVICE argument may use for this function."""
        out = [n for n in (self.alias, self.qemu_id, self.qom_path) if n]
        out.extend(self.targets)
        return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Slot:
    bus: Bus
    number: int
    functions: tuple[Function, ...]  # sorted by function number
    machine: str = ""

    @cached_property  # asked for once per slot per look-up: the planner looks up every slot
    def path(self) -> str:
        """`0000:00/03.0/05`: the bridge chain plus the slot number."""
        return self.bus.path_of(self.number, 0).slot_path

    @property
    def multifunction(self) -> bool:
        return len(self.functions) > 1 or any(f.multifunction for f in self.functions)

    @property
    def function0(self) -> Function | None:
        return next((f for f in self.functions if f.path.function == 0), None)

    @property
    def hotplug(self) -> Hotplug:
        return assess_hotplug(self.bus, self.number, self.functions, self.machine)


def group_slots(placed: Iterable[tuple[Bus, Function]], machine: str = "") -> tuple[Slot, ...]:
    """Functions on their buses -> the slots they form, as both backends read them. Pure.

    One slot per bus and slot number, its functions in function order; slots in
    PCI path order (a bridge's slot before the slots behind it).
    """
    buses: dict[tuple[str, int], Bus] = {}
    grouped: dict[tuple[str, int], list[Function]] = {}
    for bus, f in placed:
        where = (bus.key, f.path.hops[-1][0])
        buses.setdefault(where, bus)
        grouped.setdefault(where, []).append(f)
    slots = [
        Slot(buses[where], where[1], tuple(sorted(fs, key=lambda f: f.path.function)), machine)
        for where, fs in grouped.items()
    ]
    slots.sort(key=lambda s: s.bus.path_of(s.number, 0))
    return tuple(slots)


def _is_i440fx(machine: str) -> bool:
    m = machine.lower()
    return "i440fx" in m or m == "pc" or (m.startswith("pc-") and "q35" not in m)


def assess_hotplug(bus: Bus, slot: int, functions: Iterable[Function], machine: str = "") -> Hotplug:
    """Can this slot be hot-unplugged as far as the virtual hardware goes? Pure; fails closed."""
    funcs = tuple(functions)
    if bus.kind in (BusKind.PCIE_ROOT, BusKind.PCIE_EXPANDER):
        return Hotplug(
            False,
            f"integrated endpoint on the PCIe root complex ({bus.name}): root buses of a PCIe machine have "
            "no hotplug; place the device behind a pcie-root-port",
        )
    if bus.kind is BusKind.PCIE_SWITCH_UPSTREAM_PORT:
        return Hotplug(False, f"switch downstream ports on {bus.name} are fixed parts of the switch")
    if bus.kind is BusKind.PCI_ROOT and _is_i440fx(machine):
        if slot == 0:
            return Hotplug(False, "i440fx slot 0 is the host bridge")
        if slot == 1:
            return Hotplug(False, "i440fx slot 1 holds the PIIX chipset functions (ISA, IDE, USB, ACPI)")
    if bus.hotplug is False:
        why = {
            BusKind.PCIE_ROOT_PORT: f"pcie-root-port {bus.name} has hotplug='off'",
            BusKind.PCIE_SWITCH_DOWNSTREAM_PORT: f"switch downstream port {bus.name} has hotplug disabled",
            BusKind.PCI_BRIDGE: f"pci-bridge {bus.name} has no hotplug support (no SHPC, no ACPI bridge hotplug)",
            BusKind.DMI_TO_PCI_BRIDGE: f"dmi-to-pci-bridge {bus.name}: slots directly on it are not hotpluggable",
            BusKind.PCI_ROOT: f"ACPI PCI hotplug is disabled on root bus {bus.name}",
            BusKind.PCI_EXPANDER: f"expander bus {bus.name} has no hotplug support",
        }.get(bus.kind, f"bus {bus.name} has no hotplug support")
        return Hotplug(False, why)
    if bus.hotplug is None:
        return Hotplug(False, f"the hypervisor did not say whether bus {bus.name} supports hotplug")
    fixed = [f for f in funcs if f.hotpluggable is False]
    if fixed:
        names = ", ".join(f"{f.name} ({f.model})" for f in fixed)
        return Hotplug(False, f"device type does not support hot-unplug: {names}")
    how = f" via {bus.mechanism}" if bus.mechanism else ""
    return Hotplug(True, f"{bus.kind.value} {bus.name} supports hotplug{how}")


@dataclass(frozen=True)
class Removal:
    """A device the hypervisor reports gone (QMP DEVICE_DELETED, libvirt device-removed)."""

    device: str | None  # QEMU id / libvirt alias
    path: str | None = None  # QOM path

    def matches(self, f: Function) -> bool:
        if self.path and f.qom_path:
            return self.path == f.qom_path
        return bool(self.device) and self.device in (f.qemu_id, f.alias)


@dataclass(frozen=True)
class Topology:
    """The PCI slots of one VM, read at one moment."""

    source: str  # "qmp" | "libvirt"
    vm: str  # domain name or QMP socket path
    machine: str
    slots: tuple[Slot, ...]
    buses: tuple[Bus, ...] = ()
    # Host-side path of the agent's virtio-serial channel (libvirt <channel>), if any.
    agent_channel: str | None = None
    _by_path: dict[PciPath, Function] = field(default_factory=dict, init=False, repr=False, compare=False)
    _by_slot: dict[str, Slot] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for slot in self.slots:
            self._by_slot.setdefault(slot.path, slot)
            for f in slot.functions:
                self._by_path[f.path] = f

    def functions(self) -> Iterator[Function]:
        for slot in self.slots:
            yield from slot.functions

    def function(self, path: PciPath) -> Function | None:
        return self._by_path.get(path)

    def slot(self, slot_path: str) -> Slot | None:
        return self._by_slot.get(slot_path)

    def slot_of(self, path: PciPath) -> Slot | None:
        return self.slot(path.slot_path)

    def behind(self, bridge: PciPath) -> tuple[Slot, ...]:
        """Every slot below a bridge, at any depth: they leave with it."""
        n = len(bridge.hops)
        return tuple(
            s
            for s in self.slots
            if s.bus.bridge is not None
            and s.bus.domain == bridge.domain
            and s.bus.root_bus == bridge.root_bus
            and s.bus.bridge.hops[:n] == bridge.hops
        )

    def by_name(self, name: str) -> tuple[Function, ...]:
        return tuple(f for f in self.functions() if name in f.names)
