"""Which PCI functions a user's device names mean.

A name may be a guest BDF (0000:00:06.1, or 00:06.1 in domain 0), a PCI path
(0000:00/03.0/05.0), a network interface (eth1, or an upper device such as
bond0 -> the NICs below it), or a block device (vdb, vdb1, dm-0, md0, a
device-mapper name, /dev/vdb1, /dev/mapper/NAME -> the function(s) below it).

Names are only ever compared with the inventory, never turned into paths:
"../../etc/shadow" or "/dev/../x" match nothing and raise UnknownDevice.
"""

from __future__ import annotations

from collections.abc import Sequence

from unplugd.agent.errors import UnknownDevice
from unplugd.agent.model import Inventory, PciFunction
from unplugd.pci import PciAddress, PciPath

__all__ = ["select"]


def select(inventory: Inventory, names: Sequence[str]) -> list[PciFunction]:
    """The functions the names mean, in inventory order, each once; all of them for no names.

    UnknownDevice for the first name that matches nothing.
    """
    if not names:
        return list(inventory.functions)
    below_block = _functions_below_block(inventory)
    below_iface = _functions_below_interfaces(inventory)
    wanted: set[PciAddress] = set()
    for name in names:
        hits = _match(inventory, name.strip(), below_block, below_iface)
        if not hits:
            raise UnknownDevice(name)
        wanted |= hits
    return [f for f in inventory.functions if f.address in wanted]


def _match(
    inventory: Inventory,
    name: str,
    below_block: dict[str, set[PciAddress]],
    below_iface: dict[str, set[PciAddress]],
) -> set[PciAddress]:
    addr = _as_address(name)
    if addr is not None:
        return {f.address for f in inventory.functions if f.address == addr}
    path = _as_path(name)
    if path is not None:
        return {f.address for f in inventory.functions if f.path == path}
    if name in below_iface:
        return below_iface[name]
    block = _block_name(inventory, name)
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


def _block_name(inventory: Inventory, name: str) -> str | None:
    """The kernel name for vdb1, /dev/vdb1, a dm name or /dev/mapper/NAME; None otherwise."""
    devs = inventory.block_devices
    by_dm = {bd.dm_name: bd.name for bd in devs.values() if bd.dm_name}
    if name.startswith("/dev/mapper/"):
        return by_dm.get(name[len("/dev/mapper/") :])
    if name.startswith("/dev/"):
        name = name[len("/dev/") :]
        if "/" in name:
            return None
    if name in devs:
        return name
    return by_dm.get(name)


def _functions_below_block(inventory: Inventory) -> dict[str, set[PciAddress]]:
    """Block device name -> functions whose disks it is, sits on or is stacked on."""
    devs = inventory.block_devices
    partitions: dict[str, list[str]] = {}
    loops_on: dict[str, list[str]] = {}
    for bd in devs.values():
        if bd.parent:
            partitions.setdefault(bd.parent, []).append(bd.name)
        if bd.backing_file and bd.backing_file.startswith("/dev/"):
            loops_on.setdefault(bd.backing_file[len("/dev/") :], []).append(bd.name)
    out: dict[str, set[PciAddress]] = {}
    for f in inventory.functions:
        queue = [d for d in f.block_devices if d in devs]
        seen: set[str] = set()
        while queue:
            name = queue.pop()
            if name in seen:
                continue
            seen.add(name)
            out.setdefault(name, set()).add(f.address)
            queue.extend(partitions.get(name, ()))
            queue.extend(devs[name].holders if name in devs else ())
            queue.extend(loops_on.get(name, ()))
    return out


def _functions_below_interfaces(inventory: Inventory) -> dict[str, set[PciAddress]]:
    """Interface name -> functions of the NICs it is, or is stacked on (bond0 -> its slaves)."""
    out: dict[str, set[PciAddress]] = {}
    for f in inventory.functions:
        for ifname in f.net_interfaces:
            queue = [ifname]
            seen: set[str] = set()
            while queue:
                name = queue.pop()
                if name in seen:
                    continue
                seen.add(name)
                out.setdefault(name, set()).add(f.address)
                iface = inventory.interfaces.get(name)
                if iface is not None:
                    queue.extend(iface.uppers)
                    if iface.master:
                        queue.append(iface.master)
    return out
