"""The readiness policy: Inventory -> one FunctionVerdict per PCI function.

Pure: no I/O and no protobuf. The rules (DESIGN.md: reasons taxonomy):

* a block function owns its disks, their partitions and everything stacked on
  them (holders/ chains: dm, LVM, dm-crypt, md, bcache; loop devices backed by
  one of their nodes or by a file on one of their filesystems: the device
  graph, agent/graph.py, says what sits on what). A mount, swap area, holder
  chain, open fd or the root filesystem anywhere in that set makes the
  function BUSY.
* a network function is BUSY while its interface is up, has global
  addresses, carries a default route, has upper devices or live connections.
* a bridge is BUSY while anything behind it is busy.
* what the agent could not read (ScanProblem) leaves the functions it may
  touch UNKNOWN, unless they are BUSY anyway. Doubt is never READY.

State precedence: BUSY > UNKNOWN > READY.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import defaultdict
from collections.abc import Collection, Container, Iterable, Mapping, Sequence

from unplugd.agent.graph import DeviceGraph, is_active
from unplugd.agent.model import (
    BlockDevice,
    DevNo,
    Inventory,
    Mount,
    NetInterface,
    OpenRef,
    PciFunction,
    Route,
    Socket,
    Swap,
    format_devno,
)
from unplugd.agent.readiness.reasons import Code, FunctionVerdict, ProcessRef, Reason, State
from unplugd.pci import PciAddress

__all__ = ["evaluate", "in_use", "state_of"]

# Drivers that only provide a transport: the class driver sits on a child bus
# (virtio-pci binds every virtio function; virtio_blk/virtio_net are on virtioN).
_TRANSPORT_DRIVERS = frozenset({"virtio-pci"})

# A bridge cares whether its children are *in use*, not whether they could be
# unplugged on their own: removing the bridge removes them regardless.
_NOT_USAGE = frozenset({Code.NO_HOTPLUG_DRIVER, Code.LEASED, Code.BRIDGE_WITH_CHILDREN})

# Reasons that explain why the kernel refuses an exclusive open.
_EXPLAINS_EXCL = frozenset({Code.MOUNTED, Code.SWAP, Code.HOLDER, Code.ROOT_FILESYSTEM, Code.OPEN_BY_PROCESS})

_MAX_CHAINS = 32
_NETWORK_CLASS = 0x02  # PCI base class "network controller"
# Drivers that bind a NIC without registering an interface (passthrough, userspace I/O).
_NO_NETDEV_DRIVERS = frozenset({"vfio-pci", "pci-stub", "uio_pci_generic", "igb_uio"})
_MAX_LISTED = 5
_STORAGE_CLASS = 0x01  # PCI base class "mass storage controller": SCSI, IDE, SATA, SAS, NVMe, virtio-blk/scsi
_USB_CONTROLLER = 0x0C03  # PCI class "serial bus controller", subclass USB: UHCI, OHCI, EHCI, xHCI
# Drivers of a controller's own ports and buses, which hold disks once one is attached: with nothing
# below them the controller is empty, not unknown. The kernel's names: the USB hub driver (every root
# hub has one), virtio-scsi's driver on its virtio device.
_EMPTY_PORT_DRIVERS = frozenset({"hub", "virtio_scsi"})


def state_of(reasons: Iterable[Reason]) -> State:
    """BUSY if anything blocks for sure, UNKNOWN if anything is undecided, else READY."""
    undecided = False
    for r in reasons:
        if r.undecided:
            undecided = True
        elif r.blocking:
            return State.BUSY
    return State.UNKNOWN if undecided else State.READY


def in_use(verdict: FunctionVerdict) -> list[Reason]:
    """The reasons that say something in the guest uses the function now.

    Blocking and decided, and about use: not the missing hotplug driver (the
    function is idle, the slot is the problem) nor a lease (the agent's own
    hold). What a PrepareUnplug lease must not be granted over.
    """
    return [
        r
        for r in verdict.reasons
        if r.blocking and not r.undecided and r.code not in (Code.NO_HOTPLUG_DRIVER, Code.LEASED)
    ]


def evaluate(
    inventory: Inventory, leased: Mapping[PciAddress, str] = {}, *, only: Collection[PciAddress] | None = None
) -> list[FunctionVerdict]:
    """One verdict per function of the inventory, in its order.

    leased: functions held by an unplug lease (its label, never the id: ids are
    credentials and reports are read by every client): a LEASED warning.
    only: verdicts for these functions and the others of their slots (a slot's state is its
    functions' worst) rather than for every function; each the verdict a full evaluate gives.
    """
    idx = _Index.build(inventory)
    judged, needed = _judged(inventory, only)
    stacks = {
        f.address: idx.graph.block_closure(idx.graph.disks_of(f)) for f in inventory.functions if f.address in needed
    }
    usage = {f.address: _usage_reasons(idx, f, stacks[f.address]) for f in inventory.functions if f.address in needed}
    states: dict[PciAddress, State] = {}  # usage states, filled as bridges ask (nested bridges ask again)
    verdicts: list[FunctionVerdict] = []
    for f in inventory.functions:
        if f.address not in judged:
            continue
        reasons = list(usage[f.address])
        if f.is_bridge:
            reasons.extend(_bridge_reasons(inventory, f, usage, states))
        if f.hotplug_slot is None:
            # Blocking, not a warning: without acpiphp/pciehp driving the slot the
            # guest never acts on the eject request, so the host's device_del
            # stays pending forever and the device is never released.
            reasons.append(
                Reason(
                    Code.NO_HOTPLUG_DRIVER,
                    f"no hotplug slot drives {f.address.slot_key} in the guest (acpiphp/pciehp/shpchp): "
                    "an unplug request would never complete",
                    object=str(f.address),
                )
            )
        lease = leased.get(f.address)
        if lease is not None:
            reasons.append(Reason(Code.LEASED, f"held for unplug by lease {lease}", blocking=False, object=lease))
        verdicts.append(FunctionVerdict(f.address, f.path, state_of(reasons), tuple(reasons), tuple(stacks[f.address])))
    return verdicts


def _judged(inventory: Inventory, only: Collection[PciAddress] | None) -> tuple[Container[PciAddress], set[PciAddress]]:
    """(the functions to give a verdict, the functions whose usage those verdicts read).

    A verdict reads the function's own usage and, for a bridge, the usage of every function
    behind it (_bridge_reasons); nothing else of another function.
    """
    everything = {f.address for f in inventory.functions}
    if only is None:
        return everything, everything
    slots = {a.slot_key for a in only}
    judged = {f.address for f in inventory.functions if f.address.slot_key in slots}
    needed = set(judged)
    for bridge in inventory.functions:
        if bridge.is_bridge and bridge.address in judged:
            needed.update(f.address for f in _behind(inventory, bridge))
    return judged, needed


# --------------------------------------------------------------------------- indexes


class _Index:
    """The inventory, its device graph, and open references by what they hold."""

    __slots__ = ("active_sockets", "default_routes", "graph", "inv", "refs")

    def __init__(self, inv: Inventory, graph: DeviceGraph) -> None:
        self.inv = inv
        self.graph = graph
        self.refs: dict[tuple[str, DevNo], list[OpenRef]] = defaultdict(list)
        # Looked at once per interface: found once, in the inventory's order (hundreds of interfaces
        # each going over every route and socket, parsing each socket's address, was most of evaluate).
        self.default_routes: list[Route] = []
        self.active_sockets: list[tuple[Socket, str]] = []  # (socket, _norm_ip(local))

    @classmethod
    def build(cls, inv: Inventory) -> _Index:
        idx = cls(inv, DeviceGraph(inv))
        for ref in inv.open_refs:
            idx.refs[(ref.kind, ref.devno)].append(ref)
        idx.default_routes = [r for r in inv.routes if r.is_default]
        idx.active_sockets = [(s, _norm_ip(s.local)) for s in inv.sockets if is_active(s)]
        return idx


# --------------------------------------------------------------------------- per function


def _usage_reasons(idx: _Index, f: PciFunction, closure: Sequence[str]) -> list[Reason]:
    """Everything that uses the function itself (no bridge, hotplug or lease reasons)."""
    reasons: list[Reason] = []
    disks = idx.graph.disks_of(f)
    for name in (d for d in disks if d not in idx.inv.block_devices):
        reasons.append(
            Reason(
                Code.UNREADABLE,
                f"block device {name} is listed under {f.address} but was not found (vanished mid-scan?)",
                object=name,
                undecided=True,
            )
        )
    block = [idx.inv.block_devices[n] for n in closure]
    reasons.extend(_root_reasons(idx, block))
    reasons.extend(_mount_reasons(idx, block))
    reasons.extend(_swap_reasons(idx, block))
    reasons.extend(_holder_reasons(idx, disks))
    reasons.extend(_open_reasons(idx, f, block))
    if any(n in idx.inv.exclusive_busy for n in closure) and not any(r.code in _EXPLAINS_EXCL for r in reasons):
        held = [n for n in closure if n in idx.inv.exclusive_busy]
        pins = _pinned_mount_namespaces(idx.inv)
        if pins:
            # The agent reads mount tables through processes; a namespace kept alive only by a bind
            # mount of its nsfs file has none, and entering it takes CAP_SYS_ADMIN the agent lacks.
            why = (
                "no mount table the agent can read shows it, and mount namespaces no process lives in "
                f"are pinned at {', '.join(pins)}: it is likely mounted there"
            )
        else:
            why = "something in the kernel holds it that the agent cannot name"
        reasons.append(
            Reason(
                Code.EXCLUSIVE_CLAIM,
                f"the kernel refuses an exclusive open of {', '.join(held)} (EBUSY): {why}",
                object=held[0],
                mount_point=pins[0] if pins else "",
            )
        )
    net_names: set[str] = set()
    for ifname in f.net_interfaces:
        iface = idx.inv.interfaces.get(ifname)
        if iface is None:
            reasons.append(
                Reason(
                    Code.UNREADABLE,
                    f"interface {ifname} is listed under {f.address} but was not found (vanished mid-scan?)",
                    object=ifname,
                    undecided=True,
                )
            )
            continue
        net_names |= idx.graph.interface_stack(ifname)
        reasons.extend(_net_reasons(idx, iface))
    reasons.extend(_class_reasons(idx.inv, f, disks))
    if state_of(reasons) is not State.BUSY:
        reasons.extend(_problem_reasons(idx.inv, f, block, net_names))
    return reasons


def _devnos(block: Sequence[BlockDevice]) -> dict[DevNo, str]:
    return {bd.devno: bd.name for bd in block}


def _label(idx: _Index, name: str) -> str:
    bd = idx.inv.block_devices.get(name)
    return bd.label if bd is not None else name


def _root_reasons(idx: _Index, block: Sequence[BlockDevice]) -> list[Reason]:
    root = idx.inv.root_devno
    if root is None:
        return []
    names = {bd.name for bd in block}
    hit = _devnos(block).get(root)
    if hit is None and root[0] == 0:
        # Anonymous device number (btrfs): the mount of / names the device.
        for m in idx.inv.mounts:
            if m.mount_point == "/" and m.devno == root and m.namespace == idx.inv.mount_namespace:
                src = idx.graph.kernel_name(m.source)
                if src in names:
                    hit = src
                    break
    if hit is None:
        return []
    return [
        Reason(
            Code.ROOT_FILESYSTEM,
            f"the root filesystem (/) is on {_label(idx, hit)}",
            object=hit,
            mount_point="/",
        )
    ]


def _mount_reasons(idx: _Index, block: Sequence[BlockDevice]) -> list[Reason]:
    inv = idx.inv
    # One reason per (device, mount point, subtree, fstype); the namespaces
    # where it is seen are listed in the detail.
    groups: dict[tuple[str, str, str, str], list[Mount]] = {}
    for bd in block:
        for m in idx.graph.mounts_on(bd.name):
            groups.setdefault((bd.name, m.mount_point, m.root, m.fstype), []).append(m)
    reasons: list[Reason] = []
    for (name, mount_point, root, fstype), mounts in groups.items():
        detail = f"{_label(idx, name)} is mounted on {mount_point} ({fstype}"
        if root not in ("/", ""):
            detail += f", bind mount of {root}"
        detail += ")"
        own = any(m.namespace == inv.mount_namespace for m in mounts)
        others = sorted({m.namespace_pid for m in mounts if m.namespace != inv.mount_namespace})
        if others and not own:
            detail += " in the mount namespace of " + _pids(others)
        elif others:
            detail += f" (also in {len(others)} other mount namespace{'s' if len(others) > 1 else ''}: {_pids(others)})"
        reasons.append(Reason(Code.MOUNTED, detail, object=name, mount_point=mount_point))
    return reasons


def _pids(pids: Sequence[int]) -> str:
    shown = ", ".join(str(p) for p in pids[:_MAX_LISTED])
    more = f" and {len(pids) - _MAX_LISTED} more" if len(pids) > _MAX_LISTED else ""
    return ("pid " if len(pids) == 1 else "pids ") + shown + more


def _swap_device(idx: _Index, swap: Swap) -> str | None:
    """Kernel name of the device holding a swap area, or None if it cannot be told."""
    if swap.devno is not None and swap.devno[0] != 0:
        return idx.graph.block_of_devno(swap.devno)
    if swap.devno is not None:
        # A swap file on a filesystem with an anonymous device number.
        for m in idx.inv.mounts:
            if m.devno == swap.devno:
                name = idx.graph.kernel_name(m.source)
                if name is not None:
                    return name
        return None
    return idx.graph.kernel_name(swap.path)


def _swap_reasons(idx: _Index, block: Sequence[BlockDevice]) -> list[Reason]:
    names = {bd.name for bd in block}
    reasons: list[Reason] = []
    for swap in idx.inv.swaps:
        dev = _swap_device(idx, swap)
        if dev is None:
            reported = any(p.object == swap.path for p in idx.inv.problems)
            if block and not reported and not (swap.devno is not None and swap.devno[0] != 0):
                # Fail closed: the swap area may live on any of our devices.
                reasons.append(
                    Reason(
                        Code.UNREADABLE,
                        f"cannot tell which device holds swap area {swap.path}",
                        object=swap.path,
                        undecided=True,
                    )
                )
            continue
        if dev not in names:
            continue
        if swap.kind == "file":
            detail = f"swap file {swap.path} is active on {_label(idx, dev)}"
        else:
            detail = f"{_label(idx, dev)} is in use as swap ({swap.path})"
        reasons.append(Reason(Code.SWAP, detail, object=dev))
    return reasons


def _holder_kind(bd: BlockDevice) -> str:
    if bd.kind == "dm":
        uuid = bd.dm_uuid or ""
        if uuid.startswith("CRYPT-"):
            return "dm-crypt"
        if uuid.startswith("LVM-"):
            return "LVM"
        return "device-mapper"
    if bd.kind == "md":
        return f"md {bd.md_level}" if bd.md_level else "md"
    if bd.kind == "loop":
        return "loop"
    if bd.name.startswith("bcache"):
        return "bcache"
    return bd.kind


def _holder_reasons(idx: _Index, disks: Sequence[str]) -> list[Reason]:
    """One HOLDER reason per chain from a disk to the top of its stack."""
    devs = idx.inv.block_devices
    chains: list[tuple[str, ...]] = []

    def walk(chain: tuple[str, ...], stacked: bool) -> None:
        if len(chains) >= _MAX_CHAINS:
            return
        ups = [n for n in idx.graph.upward(chain[-1]) if n not in chain and n in devs]
        if not ups:
            if stacked:
                chains.append(chain)
            return
        for up in ups:
            is_part = devs[up].parent == chain[-1] and devs[up].kind == "part"
            walk((*chain, up), stacked or not is_part)

    for disk in disks:
        if disk in devs:
            walk((disk,), False)
    reasons: list[Reason] = []
    for chain in chains:
        top = devs[chain[-1]]
        shown = " -> ".join(_label(idx, n) for n in chain)
        backed = f" (backed by {top.backing_file})" if top.backing_file else ""
        reasons.append(
            Reason(
                Code.HOLDER,
                f"held by {_holder_kind(top)} {top.label}: {shown}{backed}",
                object=top.name,
                chain=chain,
            )
        )
    return reasons


def _open_reasons(idx: _Index, f: PciFunction, block: Sequence[BlockDevice]) -> list[Reason]:
    wanted: set[tuple[str, DevNo]] = {("block", bd.devno) for bd in block}
    # Files open on a filesystem of ours that no mount table shows (the engine looks for them only then).
    wanted |= {("file", bd.devno) for bd in block}
    wanted |= {(node.kind, node.devno) for node in f.device_nodes}
    by_pid: dict[int, list[OpenRef]] = {}
    for key in sorted(wanted):
        for ref in idx.refs.get(key, ()):
            by_pid.setdefault(ref.pid, []).append(ref)
    names = {bd.devno: _label(idx, bd.name) for bd in block}
    reasons: list[Reason] = []
    for pid in sorted(by_pid):
        refs = by_pid[pid]
        uses = tuple(dict.fromkeys(f"{r.target} ({_how(r)})" for r in refs))
        command = refs[0].command
        detached = sorted({names[r.devno] for r in refs if r.kind == "file" and r.devno in names})
        on = ""
        if detached:
            on = f" on {', '.join(detached)}, whose filesystem is mounted nowhere (detached by umount -l)"
        reasons.append(
            Reason(
                Code.OPEN_BY_PROCESS,
                f"pid {pid} ({command}) holds {', '.join(uses)}{on}",
                object=refs[0].target,
                processes=(ProcessRef(pid, command, uses),),
            )
        )
    return reasons


def _how(ref: OpenRef) -> str:
    if ref.fd is not None:
        return f"fd {ref.fd}"
    return "cwd" if ref.kind == "file" else "mapped"


# --------------------------------------------------------------------------- network


def _family(family: int) -> str:
    return "IPv6" if family == socket.AF_INET6 else "IPv4"


def _norm_ip(text: str) -> str:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _net_reasons(idx: _Index, iface: NetInterface) -> list[Reason]:
    inv = idx.inv
    name = iface.name
    reasons: list[Reason] = []
    if iface.admin_up:
        detail = f"{name} is administratively up (operstate {iface.operstate})"
        reasons.append(Reason(Code.LINK_UP, detail, object=name))
    global_addrs = [a for a in iface.addresses if a.scope not in ("link", "host")]
    link_local = [a for a in iface.addresses if a.scope == "link"]
    if global_addrs:
        shown = tuple(str(a) for a in global_addrs)
        reasons.append(Reason(Code.HAS_ADDRESS, f"{name} has {', '.join(shown)}", object=name, addresses=shown))
    elif link_local:
        shown = tuple(str(a) for a in link_local)
        reasons.append(
            Reason(
                Code.HAS_ADDRESS,
                f"{name} has only link-local {', '.join(shown)}",
                blocking=False,
                object=name,
                addresses=shown,
            )
        )
    stack = idx.graph.interface_stack(name)
    for route in idx.default_routes:
        if route.ifname in stack:
            via = f" via {route.gateway}" if route.gateway else ""
            over = f" (on top of {name})" if route.ifname != name else ""
            reasons.append(
                Reason(
                    Code.DEFAULT_ROUTE,
                    f"{_family(route.family)} default route{via} dev {route.ifname}{over}",
                    object=route.ifname,
                )
            )
    uppers = list(dict.fromkeys([*((iface.master,) if iface.master else ()), *iface.uppers]))
    for up in uppers:
        upper = inv.interfaces.get(up)
        kind = upper.kind if upper is not None and upper.kind else "upper device"
        if up == iface.master:
            detail = f"{name} is enslaved to {up} ({kind})"
        else:
            detail = f"{up} ({kind}) sits on top of {name}"
        reasons.append(Reason(Code.UPPER_DEVICE, detail, object=up, chain=(name, up)))
    local = {_norm_ip(a.address) for n in stack if (i := inv.interfaces.get(n)) for a in i.addresses}
    # A connection pins the address it is bound to: on this interface or one stacked on it.
    active = [s for s, ip in idx.active_sockets if ip in local]
    if active:
        pids = sorted({p for s in active for p in s.pids})
        conns = [f"{s.proto} {s.local}:{s.local_port} <-> {s.remote}:{s.remote_port}" for s in active[:3]]
        more = f" and {len(active) - 3} more" if len(active) > 3 else ""
        owners = f" ({_pids(pids)})" if pids else ""
        reasons.append(
            Reason(
                Code.ACTIVE_CONNECTIONS,
                f"{len(active)} active connection{'s' if len(active) > 1 else ''} on {name}{owners}: "
                + "; ".join(conns)
                + more,
                object=name,
                processes=tuple(ProcessRef(p, "") for p in pids),
                addresses=tuple(dict.fromkeys(s.local for s in active)),
            )
        )
    return reasons


# --------------------------------------------------------------------------- class, problems, bridges


def _class_reasons(inv: Inventory, f: PciFunction, disks: Sequence[str]) -> list[Reason]:
    """What the function's kind says, beyond its disks and interfaces (DESIGN.md: "Disks behind every
    controller").

    A controller of many devices (a storage controller, a USB host controller) is understood through
    what sits below it: disks, interfaces, and devices with a driver bound. Below any function, a
    driver bound to a leaf device that holds neither a disk nor an interface (a tape, a USB keyboard,
    an entropy source, a console port) is something the agent cannot judge: undecided, named. A
    controller with nothing attached at all is READY, with a warning that says so.
    """
    if f.is_bridge:
        return []
    understood = bool(disks or f.net_interfaces)
    container = f.base_class == _STORAGE_CLASS or (f.class_code >> 8) == _USB_CONTROLLER
    if understood and not container:
        return []
    drivers: tuple[str, ...]
    if f.subdrivers:
        drivers = f.subdrivers
    elif f.driver and f.driver not in _TRANSPORT_DRIVERS:
        drivers = (f.driver,)
    else:
        return []  # nothing bound, nothing below: nothing in the guest uses it
    what = f.class_name or f"class {f.class_code:06x}"
    if f.driver in _NO_NETDEV_DRIVERS:
        return [
            Reason(
                Code.DRIVER_BOUND_UNKNOWN_CLASS,
                f"driver {f.driver} is bound to this {what}: the device is handed to userspace or a nested "
                "guest, whose use the agent cannot see",
                object=f.driver,
                undecided=True,
            )
        ]
    if not understood and f.base_class == _NETWORK_CLASS:
        # A bound network driver always registers its interface; sysfs shows the agent only the
        # interfaces of its own network namespace, so this one was moved into another (a container).
        named = _named_network_namespaces(inv)
        where = f"; named network namespaces: {', '.join(named)}" if named else ""
        return [
            Reason(
                Code.NETWORK_NAMESPACE,
                f"driver {', '.join(drivers)} is bound to this {what} but its interface is not in the agent's "
                f"network namespace: it was moved into another one, which uses it{where}",
                object=named[0] if named else drivers[0],
            )
        ]
    # A driver whose device elsewhere below holds a disk or an interface explains its siblings (the
    # data interface of a USB network adapter is bound to the same driver as its control interface).
    explained = {b.driver for b in f.bound if b.holds}
    unexplained = [
        b for b in f.bound
        if b.leaf and not b.holds and b.driver not in _EMPTY_PORT_DRIVERS and b.driver not in explained
    ]  # fmt: skip
    missing = "" if understood else "; no disk or network interface is below it"
    if unexplained:
        shown = [f"{b.name} (driver {b.driver}{_nodes(b.nodes)})" for b in unexplained[:_MAX_LISTED]]
        more = f" and {len(unexplained) - _MAX_LISTED} more" if len(unexplained) > _MAX_LISTED else ""
        return [
            Reason(
                Code.DRIVER_BOUND_UNKNOWN_CLASS,
                f"below this {what} function the agent found devices of a kind it does not inspect: "
                f"{', '.join(shown)}{more}{missing}",
                object=unexplained[0].driver,
                undecided=True,
            )
        ]
    if understood:
        return []
    if container or any(b.driver in _EMPTY_PORT_DRIVERS for b in f.bound):
        ports = [b.name for b in f.bound if b.driver in _EMPTY_PORT_DRIVERS]
        on = f" ({', '.join(ports[:_MAX_LISTED])} without devices)" if ports else ""
        return [
            Reason(
                Code.EMPTY_CONTROLLER,
                f"nothing is attached to this {what} controller (driver {f.driver or drivers[0]}){on}: no disk, "
                "network interface or other device is below it",
                blocking=False,
                object=str(f.address),
            )
        ]
    nodes = [n.path for n in f.device_nodes]
    found = f"device nodes {_listed(nodes)}" if nodes else "no device nodes"
    return [
        Reason(
            Code.DRIVER_BOUND_UNKNOWN_CLASS,
            f"driver {', '.join(drivers)} is bound to this {what}, a kind of device the agent does not inspect; "
            f"below it the agent found {found}, and no disk or network interface",
            object=drivers[0],
            undecided=True,
        )
    ]


def _listed(items: Sequence[str]) -> str:
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _nodes(nodes: Sequence[str]) -> str:
    return f", nodes {_listed(nodes)}" if nodes else ""


def _nsfs_pins(inv: Inventory, kind: str) -> list[tuple[int, str]]:
    """(namespace inode, path) of each bind mount of a `kind` namespace file (nsfs), e.g. /run/netns/X.

    The mount's root names the namespace: "net:[4026532999]". Seen from every mount namespace, one
    path each (the agent's own namespace first).
    """
    found: dict[int, str] = {}
    for m in sorted(inv.mounts, key=lambda m: m.namespace != inv.mount_namespace):
        if m.fstype != "nsfs" or not m.root.startswith(kind + ":[") or not m.root.endswith("]"):
            continue
        number = m.root[len(kind) + 2 : -1]
        if number.isdigit():
            found.setdefault(int(number), m.mount_point)
    return sorted(found.items(), key=lambda item: item[1])


def _pinned_mount_namespaces(inv: Inventory) -> list[str]:
    """Where mount namespaces that no process lives in are pinned (their mounts are invisible)."""
    lived_in = {m.namespace for m in inv.mounts}
    return [path for ns, path in _nsfs_pins(inv, "mnt") if ns not in lived_in][:_MAX_LISTED]


def _named_network_namespaces(inv: Inventory) -> list[str]:
    """Network namespaces pinned by a bind mount (ip netns: /run/netns/NAME)."""
    return [path for _, path in _nsfs_pins(inv, "net")][:_MAX_LISTED]


def _objects(f: PciFunction, block: Sequence[BlockDevice], net_names: Iterable[str]) -> set[str]:
    keys = {"*", str(f.address), str(f.path), *net_names}
    for bd in block:
        keys.add(bd.name)
        keys.add("devno:" + format_devno(bd.devno))
        # A holder it names that could not be read (vanished mid-scan) is part of its stack.
        keys.update(bd.holders)
    for node in f.device_nodes:
        keys.add(node.path)
        keys.add(node.path.removeprefix("/dev/"))
        keys.add("devno:" + format_devno(node.devno))
    return keys


def _problem_reasons(
    inv: Inventory, f: PciFunction, block: Sequence[BlockDevice], net_names: Iterable[str]
) -> list[Reason]:
    keys = _objects(f, block, net_names)
    if not (block or f.net_interfaces or f.device_nodes or f.driver or f.subdrivers):
        # Nothing bound and nothing below: no fd, mount or route can involve it,
        # so only problems that name it leave it undecided.
        keys.discard("*")
    return [
        Reason(Code.UNREADABLE, f"{p.object}: {p.detail}", object=p.object, undecided=True)
        for p in inv.problems
        if any(a in keys for a in p.affects)
    ]


def _bridge_reasons(
    inv: Inventory,
    bridge: PciFunction,
    usage: Mapping[PciAddress, list[Reason]],
    states: dict[PciAddress, State],
) -> list[Reason]:
    behind = _behind(inv, bridge)
    if not behind:
        return []
    for f in behind:
        if f.address not in states:
            states[f.address] = state_of(r for r in usage[f.address] if r.code not in _NOT_USAGE)
    busy = [f for f in behind if states[f.address] is State.BUSY]
    unknown = [f for f in behind if states[f.address] is State.UNKNOWN]
    if busy:
        names = [f"{f.address} ({_codes(usage[f.address])})" for f in busy]
        return [
            Reason(
                Code.BRIDGE_WITH_CHILDREN,
                f"busy behind this bridge: {', '.join(names)}",
                object=str(busy[0].address),
                chain=tuple(str(f.address) for f in busy),
            )
        ]
    if unknown:
        return [
            Reason(
                Code.BRIDGE_WITH_CHILDREN,
                "cannot tell whether these are in use behind this bridge: "
                + ", ".join(str(f.address) for f in unknown),
                object=str(unknown[0].address),
                chain=tuple(str(f.address) for f in unknown),
                undecided=True,
            )
        ]
    return [
        Reason(
            Code.BRIDGE_WITH_CHILDREN,
            f"unplugging this bridge also removes {', '.join(str(f.address) for f in behind)}",
            blocking=False,
            object=str(behind[0].address),
            chain=tuple(str(f.address) for f in behind),
        )
    ]


def _behind(inv: Inventory, bridge: PciFunction) -> list[PciFunction]:
    """The functions below a bridge (on its secondary bus and further down), in inventory order."""
    hops = bridge.path.hops
    return [
        f
        for f in inv.functions
        if f.path.domain == bridge.path.domain
        and f.path.root_bus == bridge.path.root_bus
        and len(f.path.hops) > len(hops)
        and f.path.hops[: len(hops)] == hops
    ]


def _codes(reasons: Sequence[Reason]) -> str:
    return ", ".join(dict.fromkeys(r.code.value for r in reasons if r.code not in _NOT_USAGE and r.blocking))
