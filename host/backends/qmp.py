"""QEMU through QMP (qemu.qmp): topology from query-pci + QOM, device_del, DEVICE_DELETED.

query-pci says what the guest sees: root buses, and behind every bridge its
`pci_bridge.devices`. PCI paths come from that nesting (slot.function hops),
never from bus numbers, which are 0 until firmware enumerates the buses.

QOM says what query-pci does not: the device type, whether the device type
allows hot-unplug (`hotpluggable`), whether a bus has a hotplug handler (the
`hotplug-handler` link of the bus: empty means no hotplug, e.g. pcie.0 or a
pcie-root-port with hotplug=off) and of which kind (ACPI, pciehp, SHPC).
The QOM tree is walked from the root buses through `child[N]` links of each
bus and the `child<PCI*>` buses of each bridge, and joined to query-pci by
(bus, devfn).

Reading is separated from talking: build_topology() takes an `execute`
coroutine, so tests replay captured QEMU answers (tests/fixtures/qmp/).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from unplugd.host.backends.qtree import multifunction_by_slot
from unplugd.host.errors import (
    AddRejected,
    BackendError,
    DeviceGone,
    DomainNotFound,
    GuestBusy,
    HotplugUnsupported,
    TopologyError,
    UnplugInProgress,
    UnplugRefused,
)
from unplugd.host.topology import Bus, BusKind, Function, Removal, Topology, group_slots
from unplugd.pci import PciAddress, PciPath

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

__all__ = [
    "QMP_MISSING",
    "Execute",
    "PciNode",
    "QmpBackend",
    "QmpCommandError",
    "build_topology",
    "classify_unplug_error",
    "parse_query_pci",
    "removal_from_event",
]

log = logging.getLogger(__name__)

Execute = Callable[[str, Mapping[str, Any] | None], Awaitable[Any]]
_V = TypeVar("_V")

# What --qmp says when qemu.qmp cannot be imported (README.Debian of the unplugctl package says the same).
QMP_MISSING = "--qmp needs the Python package qemu.qmp, not installed (Debian 12 lacks it): pip install qemu.qmp"

_PCI_BRIDGE_CLASS = 0x0604
_HOST_BRIDGE_CLASS = 0x0600


class QmpCommandError(BackendError):
    """A QMP command answered with an error (the `desc` QEMU sent)."""

    def __init__(self, command: str, desc: str, klass: str = "GenericError") -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.desc = desc
        self.klass = klass


# ---------------------------------------------------------------- query-pci


@dataclass(frozen=True)
class PciNode:
    """One function in query-pci, with where it sits in the bridge chain."""

    chain: tuple[tuple[int, int], ...]  # (slot, function) hops of the bridges above it
    root_bus: int
    bus_number: int  # as firmware assigned it (0 before enumeration)
    slot: int
    function: int
    qdev_id: str
    class_code: int
    description: str
    vendor_id: int
    device_id: int
    is_bridge: bool
    secondary: int | None = None  # a bridge's secondary bus number
    children: tuple[PciNode, ...] = field(default=(), repr=False)

    @property
    def devfn(self) -> int:
        return (self.slot << 3) | self.function

    @property
    def hops(self) -> tuple[tuple[int, int], ...]:
        return (*self.chain, (self.slot, self.function))


def _int(obj: Mapping[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TopologyError(f"query-pci: {where} has no integer {key!r}")
    return value


def _parse_device(dev: Any, chain: tuple[tuple[int, int], ...], root: int) -> PciNode:
    if not isinstance(dev, Mapping):
        raise TopologyError(f"query-pci: device entry is {type(dev).__name__}, not an object")
    slot, function = _int(dev, "slot", "a device"), _int(dev, "function", "a device")
    if not (0 <= slot <= 0x1F and 0 <= function <= 7):
        raise TopologyError(f"query-pci: impossible address slot {slot} function {function}")
    where = f"device {slot:02x}.{function}"
    cls = dev.get("class_info") or {}
    ids = dev.get("id") or {}
    if not isinstance(cls, Mapping) or not isinstance(ids, Mapping):
        raise TopologyError(f"query-pci: {where} has malformed class_info or id")
    class_code = _int(cls, "class", where)
    bridge = dev.get("pci_bridge")
    children: tuple[PciNode, ...] = ()
    secondary: int | None = None
    if bridge is not None:
        if not isinstance(bridge, Mapping):
            raise TopologyError(f"query-pci: {where} has a malformed pci_bridge")
        below = (*chain, (slot, function))
        sub = bridge.get("devices") or []
        if not isinstance(sub, list):
            raise TopologyError(f"query-pci: {where}: pci_bridge.devices is not a list")
        children = tuple(_parse_device(d, below, root) for d in sub)
        bus = bridge.get("bus")
        if isinstance(bus, Mapping) and isinstance(bus.get("secondary"), int):
            secondary = bus["secondary"]
    qdev_id = dev.get("qdev_id") or ""
    return PciNode(
        chain=chain,
        root_bus=root,
        bus_number=_int(dev, "bus", where),
        slot=slot,
        function=function,
        qdev_id=qdev_id if isinstance(qdev_id, str) else "",
        class_code=class_code,
        description=str(cls.get("desc") or ""),
        vendor_id=_int(ids, "vendor", where),
        device_id=_int(ids, "device", where),
        is_bridge=bridge is not None,
        secondary=secondary,
        children=children,
    )


def parse_query_pci(data: Any) -> list[tuple[int, list[PciNode]]]:
    """query-pci's answer -> [(root bus number, its devices as trees)]. Pure.

    Each top-level entry is a root bus (pcie.0 / pci.0, and one per pxb
    expander with its bus_nr); bridges nest their buses in pci_bridge.devices.
    """
    if not isinstance(data, list):
        raise TopologyError("query-pci: the answer is not a list of buses")
    out: list[tuple[int, list[PciNode]]] = []
    for entry in data:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("devices"), list):
            raise TopologyError("query-pci: a bus entry has no device list")
        root = _int(entry, "bus", "a root bus")
        out.append((root, [_parse_device(d, (), root) for d in entry["devices"]]))
    return out


# ---------------------------------------------------------------- QOM


@dataclass
class _QomDevice:
    path: str
    type: str
    devfn: int | None
    hotpluggable: bool | None
    multifunction: bool | None  # None: not read (a function > 0 beside siblings)
    buses: list[_QomBus]


@dataclass
class _QomBus:
    path: str
    type: str
    handler: str | None  # hotplug handler's QOM path, "" if none, None if unreadable
    handler_type: str
    devices: list[_QomDevice]


@dataclass(frozen=True)
class _Placed:
    """A device found on a bus: its QOM path, type, and devfn when query-pci already said it."""

    path: str
    type: str
    devfn: int | None


_PCI_BUS_TYPES = ("PCI", "PCIE", "pxb-bus", "pxb-pcie-bus", "pxb-cxl-bus")
_PERIPHERAL = "/machine/peripheral"
# QMP requests in flight at once. QEMU runs them one after another, but a
# full pipe spares a round trip per command; more than this gains nothing.
_IN_FLIGHT = 8
# `multifunction` of functions alone in their slots comes from one HMP `info qtree` rather than a
# qom-get each when at least this many are to be read and they are at least this share of the VM's
# functions. Measured on the 256-function bench VM (259 functions, 192 alone; 2 cores, load 5):
# 192 qom-gets 150-440 ms of QEMU's time and 31-43 ms of ours, `info qtree` (538 KiB) 55-97 ms and
# ~3 ms plus ~6 ms to parse. A qom-get costs about the same whatever the VM; the qtree grows with
# every device in it (~0.2 ms a PCI function with its children, against ~0.8 ms a qom-get).
_QTREE_MIN_READS = 32
_QTREE_MIN_SHARE = 0.25


def _is_bus_type(t: str) -> bool:
    # Only PCI buses: a virtio-blk-pci also has a child virtio-pci-bus.
    return t in _PCI_BUS_TYPES


def _child_type(typ: str) -> str | None:
    """`child<virtio-net-pci>` -> `virtio-net-pci`; None for other properties."""
    return typ[6:-1] if typ.startswith("child<") and typ.endswith(">") else None


class _Qom:
    """Reads the QOM tree below the PCI root buses; tolerant: a failed read is None.

    QEMU answers one command at a time and each costs about half a millisecond,
    so the reader asks only what query-pci does not say, once per fact:
    - a named device's QOM path and type come from one qom-list of
      /machine/peripheral and its devfn from query-pci (joined by qdev_id);
      only links on a bus that these cannot account for are resolved one by one
      (anonymous devices, chipset functions, buses firmware has not numbered);
    - `hotpluggable` is the device class's flag AND "the parent bus has a hotplug
      handler" (QEMU's device_get_hotpluggable), so it is read at most once per type
      and bus, and not at all where a true answer elsewhere proved both (hotpluggable);
    - `multifunction` is read only for a function alone in its slot: beside
      siblings the slot is multifunction by its count (QEMU refuses siblings next
      to a function 0 without the flag, and on other functions it changes nothing);
      when many are alone, all come from one `info qtree` (`use_qtree`).
    """

    def __init__(self, execute: Execute) -> None:
        self.execute = execute
        self.peripheral: dict[str, str] = {}  # device id -> type
        self._slots = asyncio.Semaphore(_IN_FLIGHT)
        self._qtree: asyncio.Future[dict[tuple[str, int], bool]] | None = None
        # handler path -> the read of its type: buses read side by side share one handler (ACPI's)
        self._types: dict[str, asyncio.Future[Any]] = {}
        # `hotpluggable` reads that prove a type's half (the first of the type) and a bus's (see hotpluggable)
        self._type_read: dict[str, asyncio.Future[Any]] = {}
        self._bus_reads: dict[str, list[asyncio.Future[Any]]] = {}

    async def _run(self, command: str, arguments: Mapping[str, Any]) -> Any:
        async with self._slots:
            return await self.execute(command, arguments)

    async def get(self, path: str, prop: str) -> Any:
        try:
            return await self._run("qom-get", {"path": path, "property": prop})
        except QmpCommandError as e:
            log.debug("qom-get %s %s: %s", path, prop, e.desc)
            return None

    async def hotpluggable(self, bus: str, dtype: str, path: str) -> Any:
        """A device's `hotpluggable`. QEMU's is its type's flag AND its bus's (device_get_hotpluggable),
        so a true answer proves both halves: a device whose type and bus were each seen true somewhere
        is not asked (on the bench VM the first bus's reads tell every type, and one read each bus the
        rest: 33 reads -> 16). Otherwise, and whenever a half is not proven, it is read."""
        of_type, on_bus = self._type_read.get(dtype), self._bus_reads.setdefault(bus, [])
        if of_type is not None and on_bus:
            if await of_type is True and True in await asyncio.gather(*on_bus):
                return True
            return await self.get(path, "hotpluggable")
        read = asyncio.ensure_future(self.get(path, "hotpluggable"))
        self._type_read.setdefault(dtype, read)
        on_bus.append(read)
        return await read

    def use_qtree(self) -> None:
        """Ask `info qtree` once, now, for every function's `multifunction` (see _QTREE_MIN_READS)."""
        if self._qtree is None:
            self._qtree = asyncio.ensure_future(self._read_qtree())

    async def _read_qtree(self) -> dict[tuple[str, int], bool]:
        try:
            text = await self._run("human-monitor-command", {"command-line": "info qtree"})
        except QmpCommandError as e:
            log.debug("info qtree: %s", e.desc)
            return {}
        return multifunction_by_slot(text) if isinstance(text, str) else {}

    async def multifunction(self, path: str, bus: str, devfn: int | None) -> Any:
        """A device's `multifunction`: from the qtree when it was asked for and names the device, else QOM."""
        if self._qtree is not None and devfn is not None:
            known = (await self._qtree).get((bus.rsplit("/", 1)[-1], devfn))
            if known is not None:
                return known
        return await self.get(path, "multifunction")

    async def children(self, path: str) -> list[tuple[str, str]]:
        """(name, type) of a QOM object's properties; [] when it cannot be listed."""
        try:
            props = await self._run("qom-list", {"path": path})
        except QmpCommandError as e:
            log.debug("qom-list %s: %s", path, e.desc)
            return []
        if not isinstance(props, list):
            return []
        return [(str(p.get("name", "")), str(p.get("type", ""))) for p in props if isinstance(p, Mapping)]

    async def load_peripheral(self) -> None:
        """Every device created with an id: /machine/peripheral/<id> is child<its type>."""
        for name, typ in await self.children(_PERIPHERAL):
            dtype = _child_type(typ)
            if dtype:
                self.peripheral[name] = dtype

    async def handler_type(self, handler: str) -> Any:
        named = _qdev_id(handler)  # a root port handles its own bus: its type is known already
        if named is not None and named in self.peripheral:
            return self.peripheral[named]
        if handler not in self._types:
            self._types[handler] = asyncio.ensure_future(self.get(handler, "type"))
        return await self._types[handler]

    async def root_bus(self) -> tuple[str, str] | None:
        """QOM path and type of the machine's root bus (/machine/q35/pcie.0 PCIE, /machine/i440fx/pci.0 PCI)."""
        for name, typ in await self.children("/machine"):
            if not (typ.startswith("child<") and "host" in typ.lower()):
                continue
            host = f"/machine/{name}"
            for sub, subtype in await self.children(host):
                if subtype in ("child<PCI>", "child<PCIE>"):
                    return f"{host}/{sub}", subtype[6:-1]
        return None

    async def bus(self, path: str, nodes: Sequence[PciNode] = (), btype: str | None = None) -> _QomBus:
        """One PCI bus and everything below it; `nodes`: what query-pci lists on it; `btype`: its type
        when the listing that found it said it (child<PCI>: QOM names a child link by the child's type),
        else it is read."""
        known: Awaitable[Any] = _value(btype) if btype is not None else self.get(path, "type")
        props, read_type, handler = await asyncio.gather(self.children(path), known, self.get(path, "hotplug-handler"))
        handler = handler if isinstance(handler, str) else None
        handler_type = await self.handler_type(handler) if handler else ""
        if handler and _mechanism(str(handler_type or "")) == "pciehp" and await self.get(handler, "hotplug") is False:
            # Native hotplug: QEMU (7.2) keeps a PCIe port as its bus's handler even with hotplug=off,
            # and the port itself then refuses every unplug ("unsupported by the port").
            handler = ""
        # child[N] links name each device on the bus; the link type is the device's type.
        links = [(name, typ[5:-1]) for name, typ in props if name.startswith("child[") and typ.startswith("link<")]
        placed = await self._place(path, links, nodes)
        devices = await self._devices(path, placed, {n.devfn: n for n in nodes})
        return _QomBus(path, str(read_type or ""), handler, str(handler_type or ""), devices)

    async def _place(self, path: str, links: Sequence[tuple[str, str]], nodes: Sequence[PciNode]) -> list[_Placed]:
        """The bus's devices, resolving only the links the named devices leave unexplained.

        Per type: when the bus has as many links of a type as query-pci lists named
        devices of that type on it, those links are those devices. Otherwise every
        link of that type is read.
        """
        named = {n.qdev_id: n for n in nodes if n.qdev_id in self.peripheral}
        have = Counter(t for _, t in links)
        want = Counter(self.peripheral[i] for i in named)
        placed = [
            _Placed(f"{_PERIPHERAL}/{i}", self.peripheral[i], n.devfn)
            for i, n in named.items()
            if have[self.peripheral[i]] == want[self.peripheral[i]]
        ]
        unexplained = [(name, t) for name, t in links if have[t] != want[t]]
        targets = await asyncio.gather(*(self.get(path, name) for name, _ in unexplained))
        for target, (_, t) in zip(targets, unexplained, strict=True):
            if not isinstance(target, str) or not target:
                continue
            node = named.get(_qdev_id(target) or "")
            placed.append(_Placed(target, t, node.devfn if node else None))
        return placed

    async def _devices(self, bus: str, placed: Sequence[_Placed], nodes: Mapping[int, PciNode]) -> list[_QomDevice]:
        types, addrs = await asyncio.gather(
            asyncio.gather(*(self.get(p.path, "type") if not p.type else _value(p.type) for p in placed)),
            asyncio.gather(*(self.get(p.path, "addr") if p.devfn is None else _value(p.devfn) for p in placed)),
        )
        devfns = [a if isinstance(a, int) and a >= 0 else None for a in addrs]
        dtypes = [str(t or "") for t in types]
        # One device of each type tells the rest (a failed read leaves each to ask for itself).
        first = {t: i for i, t in reversed(list(enumerate(dtypes))) if t}
        answers = await asyncio.gather(*(self.hotpluggable(bus, t, placed[i].path) for t, i in first.items()))
        told = dict(zip(first, answers, strict=True))
        # A function that shares its slot needs no `multifunction` read: the slot is multifunction by
        # its count (Slot.multifunction), and QEMU refuses siblings next to a function 0 without it.
        per_slot = Counter(d >> 3 for d in devfns if d is not None)
        return list(
            await asyncio.gather(
                *(
                    self._device(
                        bus,
                        p.path,
                        t,
                        devfn,
                        told.get(t),
                        has_siblings=devfn is not None and per_slot[devfn >> 3] > 1,
                        node=nodes.get(devfn) if devfn is not None else None,
                    )
                    for p, t, devfn in zip(placed, dtypes, devfns, strict=True)
                )
            )
        )

    async def _device(
        self,
        bus: str,
        path: str,
        dtype: str,
        devfn: int | None,
        hot: Any,
        *,
        has_siblings: bool,
        node: PciNode | None,
    ) -> _QomDevice:
        hot, multi = await asyncio.gather(
            _value(hot) if isinstance(hot, bool) else self.get(path, "hotpluggable"),
            # function 0 beside siblings has it on (QEMU insists); on the others it is not read
            _value(True if devfn is not None and devfn & 7 == 0 else None)
            if has_siblings
            else self.multifunction(path, bus, devfn),
        )
        buses: list[_QomBus] = []
        if _may_bridge(dtype):  # only bridges have buses below them: spare the others a qom-list
            props = await self.children(path)
            sub = [(name, t) for name, t in ((n, _child_type(typ) or "") for n, typ in props) if _is_bus_type(t)]
            below = node.children if node else ()
            buses = list(await asyncio.gather(*(self.bus(f"{path}/{name}", below, t) for name, t in sub)))
        return _QomDevice(
            path=path,
            type=dtype,
            devfn=devfn,
            hotpluggable=hot if isinstance(hot, bool) else None,
            multifunction=None if multi is None and has_siblings else multi is True,
            buses=buses,
        )


async def _value(v: _V) -> _V:
    return v


def _may_bridge(dtype: str) -> bool:
    """Could a device of this type have a PCI bus below it? Unknown types: assume so."""
    if not dtype:
        return True
    t = dtype.lower()
    return dtype in _BRIDGE_KINDS or any(w in t for w in ("bridge", "port", "pxb", "upstream", "downstream"))


_BRIDGE_KINDS = {
    "pcie-root-port": BusKind.PCIE_ROOT_PORT,
    "ioh3420": BusKind.PCIE_ROOT_PORT,
    "x3130-upstream": BusKind.PCIE_SWITCH_UPSTREAM_PORT,
    "xio3130-downstream": BusKind.PCIE_SWITCH_DOWNSTREAM_PORT,
    "pci-bridge": BusKind.PCI_BRIDGE,
    "pci-bridge-seat": BusKind.PCI_BRIDGE,
    "pcie-pci-bridge": BusKind.PCI_BRIDGE,
    "i82801b11-bridge": BusKind.DMI_TO_PCI_BRIDGE,
}


def _mechanism(handler_type: str) -> str:
    t = handler_type.lower()
    if not t:
        return ""
    if "lpc" in t or "piix4" in t or "acpi" in t or "ich9" in t:
        return "acpi"
    if "root-port" in t or "downstream" in t or "ioh3420" in t:
        return "pciehp"
    if "bridge" in t:
        return "shpc"
    return t


def _has_handler(bus: _QomBus | None) -> bool | None:
    """A bus supports hotplug iff QEMU gave it a hotplug handler; None when we could not tell."""
    if bus is None or bus.handler is None:
        return None
    return bool(bus.handler)


def _root_kind(bus: _QomBus | None) -> BusKind:
    if bus is None:
        return BusKind.UNKNOWN
    return {
        "PCIE": BusKind.PCIE_ROOT,
        "PCI": BusKind.PCI_ROOT,
        "pxb-bus": BusKind.PCI_EXPANDER,
        "pxb-pcie-bus": BusKind.PCIE_EXPANDER,
        "pxb-cxl-bus": BusKind.PCIE_EXPANDER,
    }.get(bus.type, BusKind.UNKNOWN)


def _qdev_id(qom_path: str) -> str | None:
    prefix = f"{_PERIPHERAL}/"
    if qom_path.startswith(prefix) and "/" not in qom_path[len(prefix) :]:
        return qom_path[len(prefix) :]
    return None


class _Builder:
    def __init__(self) -> None:
        self.placed: list[tuple[Bus, Function]] = []  # what group_slots() makes slots of
        self.buses: list[Bus] = []

    def add_bus(self, nodes: Sequence[PciNode], qbus: _QomBus | None, bus: Bus) -> None:
        """Slots on one bus: query-pci's functions joined with QOM's by devfn.

        Before firmware numbered the buses, query-pci lists nothing behind a
        bridge; QOM still has those devices, so they come from QOM alone.
        """
        self.buses.append(bus)
        by_devfn = {d.devfn: d for d in qbus.devices if d.devfn is not None} if qbus else {}
        seen: set[int] = set()
        for node in nodes:
            seen.add(node.devfn)
            qdev = by_devfn.get(node.devfn)
            if qbus is not None and qdev is None:
                log.warning("query-pci lists %s but QOM has no device there on %s", node.hops, qbus.path)
            self.placed.append((bus, self.function(node, qdev, bus)))
            if node.is_bridge:
                self.add_bridge(
                    node.slot, node.function, children=node.children, secondary=node.secondary, qdev=qdev, parent=bus
                )
        for devfn, qdev in sorted(by_devfn.items()):
            if devfn in seen:
                continue
            slot, function = devfn >> 3, devfn & 7
            self.placed.append((bus, self.qom_function(slot, function, qdev, bus)))
            if qdev.buses:
                self.add_bridge(slot, function, children=(), secondary=None, qdev=qdev, parent=bus)

    def qom_function(self, slot: int, function: int, qdev: _QomDevice, bus: Bus) -> Function:
        return Function(
            path=bus.path_of(slot, function),
            model=qdev.type,
            qemu_id=_qdev_id(qdev.path),
            qom_path=qdev.path,
            is_bridge=bool(qdev.buses),
            hotpluggable=qdev.hotpluggable,
            multifunction=qdev.multifunction,
            guest_address=PciAddress(0, bus.number, slot, function) if bus.number else None,
        )

    def function(self, node: PciNode, qdev: _QomDevice | None, bus: Bus) -> Function:
        qom_path = qdev.path if qdev else None
        qemu_id = node.qdev_id or (_qdev_id(qom_path) if qom_path else None) or None
        return Function(
            path=bus.path_of(node.slot, node.function),
            model=qdev.type if qdev and qdev.type else node.description,
            qemu_id=qemu_id,
            qom_path=qom_path,
            vendor_id=node.vendor_id,
            device_id=node.device_id,
            class_code=node.class_code,
            description=node.description,
            is_bridge=node.is_bridge,
            hotpluggable=qdev.hotpluggable if qdev else None,
            multifunction=qdev.multifunction if qdev else False,
            guest_address=PciAddress(0, node.bus_number, node.slot, node.function),
        )

    def add_bridge(
        self,
        slot: int,
        function: int,
        *,
        children: Sequence[PciNode],
        secondary: int | None,
        qdev: _QomDevice | None,
        parent: Bus,
    ) -> None:
        qbus = qdev.buses[0] if qdev and qdev.buses else None
        bridge = parent.path_of(slot, function)
        kind = _BRIDGE_KINDS.get(qdev.type, BusKind.UNKNOWN) if qdev else BusKind.UNKNOWN
        bus = _bus(
            qbus,
            f"bus behind {bridge}",
            kind=kind,
            domain=parent.domain,
            root_bus=parent.root_bus,
            bridge=bridge,
            number=secondary or None,
        )
        self.add_bus(children, qbus, bus)


def _bus(
    qbus: _QomBus | None,
    unnamed: str,
    *,
    kind: BusKind,
    domain: int,
    root_bus: int,
    bridge: PciPath | None,
    number: int | None,
) -> Bus:
    """A Bus with what QOM says of it (name, hotplug handler and its kind); `unnamed` when QOM had no bus."""
    return Bus(
        kind=kind,
        domain=domain,
        root_bus=root_bus,
        bridge=bridge,
        name=qbus.path.rsplit("/", 1)[-1] if qbus else unnamed,
        hotplug=_has_handler(qbus),
        mechanism=_mechanism(qbus.handler_type) if qbus else "",
        number=number,
    )


def _lone_functions(nodes: Iterable[PciNode]) -> tuple[int, int]:
    """(functions alone in their slot, all functions) in query-pci's trees. Pure."""
    per_slot: Counter[tuple[tuple[tuple[int, int], ...], int, int]] = Counter()
    pending = list(nodes)
    while pending:
        node = pending.pop()
        per_slot[node.chain, node.root_bus, node.slot] += 1
        pending.extend(node.children)
    return sum(1 for n in per_slot.values() if n == 1), sum(per_slot.values())


async def build_topology(execute: Execute, vm: str) -> Topology:
    """Read query-pci and the QOM tree through `execute` and join them."""
    roots = parse_query_pci(await execute("query-pci", None))
    qom = _Qom(execute)
    lone, total = _lone_functions(node for _, nodes in roots for node in nodes)
    if lone >= _QTREE_MIN_READS and lone >= _QTREE_MIN_SHARE * total:
        qom.use_qtree()
    machine, root, _ = await asyncio.gather(qom.get("/machine", "type"), qom.root_bus(), qom.load_peripheral())
    machine = str(machine or "").removesuffix("-machine")
    nodes_of = dict(roots)

    # The machine's host bridge owns root bus 0. A pxb expander's root bus hangs
    # off an anonymous host object; reach it through a named device on it.
    async def expander(number: int, nodes: Sequence[PciNode]) -> tuple[int, _QomBus | None]:
        named = next((n.qdev_id for n in nodes if n.qdev_id), None)
        if number == 0 or named is None:
            return number, None
        parent = await qom.get(f"{_PERIPHERAL}/{named}", "parent_bus")
        return number, await qom.bus(parent, nodes) if isinstance(parent, str) and parent else None

    async def machine_root() -> tuple[int, _QomBus | None]:
        return 0, await qom.bus(root[0], nodes_of.get(0, ()), root[1]) if root else None

    found = await asyncio.gather(machine_root(), *(expander(number, nodes) for number, nodes in roots))
    by_number = {number: qbus for number, qbus in found if qbus is not None}
    builder = _Builder()
    for number, nodes in roots:
        qbus = by_number.get(number)
        bus = _bus(
            qbus, f"root bus {number:02x}", kind=_root_kind(qbus), domain=0, root_bus=number, bridge=None, number=number
        )
        builder.add_bus(nodes, qbus, bus)
    slots = group_slots(builder.placed, machine)
    return Topology(source="qmp", vm=vm, machine=machine, slots=slots, buses=tuple(builder.buses))


# ---------------------------------------------------------------- unplug


def classify_unplug_error(device: str, desc: str) -> UnplugRefused:
    """QEMU's device_del error text -> a typed refusal. Pure."""
    d = desc.lower()
    if "already in the process of unplug" in d or "already in progress" in d:
        return UnplugInProgress(device, desc)
    if "power indicator blinking" in d or "guest is busy" in d:
        return GuestBusy(device, desc)
    if "does not support hotplugging" in d or "unsupported by the port" in d or "not hotpluggable" in d:
        return HotplugUnsupported(device, desc)
    if "not found" in d:
        return DeviceGone(device, desc)
    return UnplugRefused(device, desc)


def removal_from_event(data: Mapping[str, Any]) -> Removal:
    """DEVICE_DELETED's data -> Removal. `device` is absent for devices without an id."""
    device, path = data.get("device"), data.get("path")
    return Removal(device if isinstance(device, str) and device else None, path if isinstance(path, str) else None)


@functools.cache
def _client_class() -> type[QMPClient]:
    """QMPClient that formats messages for its debug log only when someone reads that log.

    qemu.qmp pretty-prints every message it sends or receives (json.dumps with
    indent) before logging.debug drops it: about 80 ms per topology read of a
    256-function VM, most of it query-pci's answer. Its message hooks are
    there for subclasses to override.

    qemu.qmp is an optional dependency (Debian 12 does not package it): without
    it, BackendError says how to get it, in one line.
    """
    try:
        from qemu.qmp import Message, QMPClient
    except ImportError as e:
        raise BackendError(QMP_MISSING) from e

    class QuietQMPClient(QMPClient):
        def _cb_outbound(self, msg: Message) -> Message:
            return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

        def _cb_inbound(self, msg: Message) -> Message:
            return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    return QuietQMPClient


class QmpBackend:
    """One QEMU process through its QMP socket. Use as `async with QmpBackend(path) as be:`."""

    source = "qmp"

    def __init__(self, socket_path: str, *, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._client = _client_class()("unplugctl")
        self._connected = False

    async def __aenter__(self) -> QmpBackend:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        try:
            await asyncio.wait_for(self._client.connect(self.socket_path), self.timeout)
        except TimeoutError as e:  # its text is empty: say what did not come
            raise DomainNotFound(
                f"cannot connect to QMP socket {self.socket_path}: no QMP greeting within {self.timeout:g}s "
                "(is it QEMU's QMP socket?)"
            ) from e
        except OSError as e:
            raise DomainNotFound(f"cannot connect to QMP socket {self.socket_path}: {e}") from e
        except Exception as e:  # qemu.qmp wraps socket errors in ConnectError
            raise DomainNotFound(f"cannot connect to QMP socket {self.socket_path}: {e}") from e
        self._connected = True

    async def reconnect(self) -> None:
        """Connect again after the connection broke. A QEMU that is gone refuses: DomainNotFound at once
        (a new QEMU would not be the same VM: its unplug state died with the old one)."""
        await self.close()
        self._client = _client_class()("unplugctl")
        await self.connect()

    async def close(self) -> None:
        if self._connected:
            self._connected = False
            with contextlib.suppress(Exception):
                await self._client.disconnect()

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        from qemu.qmp import ExecuteError, QMPError

        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), self.timeout)
        except ExecuteError as e:
            raise QmpCommandError(command, str(e.error.error.desc), str(e.error.error.class_)) from e
        except TimeoutError as e:
            raise BackendError(f"QMP {command} got no answer within {self.timeout:g}s") from e
        except (OSError, EOFError, QMPError) as e:
            # QMPError: qemu.qmp's StateError once the socket closed (QEMU exited), among others.
            raise BackendError(f"QMP connection lost during {command}: {e or type(e).__name__}") from e

    async def _lost(self) -> None:
        """Returns once the QMP connection is no longer running (QEMU exited or closed it)."""
        from qemu.qmp.protocol import Runstate

        while self._client.runstate is Runstate.RUNNING:
            await self._client.runstate_changed()

    async def topology(self) -> Topology:
        return await build_topology(self.execute, self.socket_path)

    async def request_unplug(self, fn: Function, *, via_monitor: bool = False) -> None:
        """device_del; returns once QEMU accepted the request (the guest acts later)."""
        target = fn.qemu_id or fn.qom_path
        if not target:
            raise HotplugUnsupported(str(fn.path), "QEMU knows no id or QOM path for this function")
        await self.device_del(target)

    @contextlib.asynccontextmanager
    async def removals(self) -> AsyncIterator[AsyncIterator[Removal]]:
        """Listen for DEVICE_DELETED; enter before device_del so no event is missed."""
        from qemu.qmp import EventListener

        listener = EventListener("DEVICE_DELETED")

        async def events() -> AsyncIterator[Removal]:
            # Ends with BackendError when the connection drops: an event listener
            # alone would wait forever for a QEMU that is gone.
            while True:
                got = asyncio.ensure_future(listener.get())
                lost = asyncio.ensure_future(self._lost())
                try:
                    await asyncio.wait((got, lost), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    got.cancel()
                    lost.cancel()
                if not got.cancelled() and got.done():
                    data = got.result().get("data")
                    if isinstance(data, Mapping):
                        yield removal_from_event(data)
                elif listener.empty():  # events that arrived before the end are still delivered
                    raise BackendError("QMP connection lost while waiting for DEVICE_DELETED (did QEMU exit?)")

        with self._client.listen(listener):
            yield events()

    # ------------------------------------------------------------ hot-add (host/plugging.py)

    async def _adding(self, what: str, command: str, arguments: Mapping[str, Any]) -> None:
        try:
            await self.execute(command, arguments)
        except QmpCommandError as e:
            raise AddRejected(what, e.desc) from e

    async def device_add(self, arguments: Mapping[str, str]) -> None:
        """device_add; properties as strings, which QEMU parses as it parses `-device`."""
        await self._adding(f"device_add {arguments.get('id', '?')}", "device_add", arguments)

    async def device_del(self, qemu_id: str) -> None:
        """device_del of a QEMU id or QOM path; returns once QEMU accepted it (the guest acts later)."""
        try:
            await self.execute("device_del", {"id": qemu_id})
        except QmpCommandError as e:
            raise classify_unplug_error(qemu_id, e.desc) from e

    async def netdev_add(self, spec: str) -> None:
        """A `-netdev` spec through QEMU's own parser (HMP netdev_add): QMP's netdev_add is strictly
        typed (`restrict` must be a JSON boolean) and a keyval string does not say which values are."""
        answer = await self.execute("human-monitor-command", {"command-line": f"netdev_add {spec}"})
        if isinstance(answer, str) and answer.strip():
            raise AddRejected(f"netdev_add {spec}", answer.strip())

    async def netdev_del(self, qemu_id: str) -> None:
        await self._adding(f"netdev_del {qemu_id}", "netdev_del", {"id": qemu_id})

    async def blockdev_add(self, arguments: Mapping[str, Any]) -> None:
        await self._adding(f"blockdev-add {arguments.get('node-name', '?')}", "blockdev-add", arguments)

    async def blockdev_del(self, node_name: str) -> None:
        await self._adding(f"blockdev-del {node_name}", "blockdev-del", {"node-name": node_name})
