"""Which PCI functions a user's device names mean.

A name may be a guest BDF (0000:00:06.1, or 00:06.1 in domain 0), a PCI path
(0000:00/03.0/05.0), a network interface (eth1, or an upper device such as
bond0 -> the NICs below it), or a block device (vdb, vdb1, dm-0, md0, loop0, a
device-mapper name, /dev/vdb1, /dev/mapper/NAME, /dev/VG/LV, a /dev/disk link
such as /dev/disk/by-id/X -> the function(s) below it; an NVMe multipath head
selects every function it has a path through). Block and interface stacks are the device graph's (agent/graph.py),
the same the report shows: a device in a function's stack selects it.

Names are only ever compared with the inventory, never turned into paths:
"../../etc/shadow" or "/dev/../x" match nothing and raise UnknownDevice.
"""

from __future__ import annotations

from collections.abc import Sequence

from unplugd.agent.errors import UnknownDevice
from unplugd.agent.graph import DeviceGraph
from unplugd.agent.model import Inventory, PciFunction
from unplugd.pci import PciAddress, PciPath

__all__ = ["select"]


def select(inventory: Inventory, names: Sequence[str]) -> list[PciFunction]:
    """The functions the names mean, in inventory order, each once; all of them for no names.

    UnknownDevice for the first name that matches nothing.
    """
    if not names:
        return list(inventory.functions)
    graph = DeviceGraph(inventory)
    below_block = _functions_below_block(graph)
    below_iface = _functions_below_interfaces(graph)
    wanted: set[PciAddress] = set()
    for name in names:
        hits = _match(graph, name.strip(), below_block, below_iface)
        if not hits:
            raise UnknownDevice(name)
        wanted |= hits
    return [f for f in inventory.functions if f.address in wanted]


def _match(
    graph: DeviceGraph,
    name: str,
    below_block: dict[str, set[PciAddress]],
    below_iface: dict[str, set[PciAddress]],
) -> set[PciAddress]:
    inventory = graph.inventory
    addr = _as_address(name)
    if addr is not None:
        return {f.address for f in inventory.functions if f.address == addr}
    path = _as_path(name)
    if path is not None:
        return {f.address for f in inventory.functions if f.path == path}
    if name in below_iface:
        return below_iface[name]
    block = graph.block_named(name)
    if block is not None:
        return below_block.get(block, set())
    return set()


def _as_address(name: str) -> PciAddress | None:
    for text in (name, "0000:" + name):
        try:
            return PciAddress.parse(text)
        except ValueError:
            continue
    return None


def _as_path(name: str) -> PciPath | None:
    try:
        return PciPath.parse(name)
    except ValueError:
        return None


def _functions_below_block(graph: DeviceGraph) -> dict[str, set[PciAddress]]:
    """Block device name -> functions whose disks it is, sits on or is stacked on."""
    out: dict[str, set[PciAddress]] = {}
    for f in graph.inventory.functions:
        for name in graph.block_closure(graph.disks_of(f)):
            out.setdefault(name, set()).add(f.address)
    return out


def _functions_below_interfaces(graph: DeviceGraph) -> dict[str, set[PciAddress]]:
    """Interface name -> functions of the NICs it is, or is stacked on (bond0 -> its slaves)."""
    out: dict[str, set[PciAddress]] = {}
    for f in graph.inventory.functions:
        for ifname in f.net_interfaces:
            for name in graph.interface_stack(ifname):
                out.setdefault(name, set()).add(f.address)
    return out
