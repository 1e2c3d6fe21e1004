"""The device graph of one inventory: what a name means and what sits on what.

Pure: no I/O, built from one Inventory and only compared with it. The one home of:

* kernel names: a /dev path (/dev/vdb1, /dev/dm-3, /dev/mapper/NAME, /dev/VG/LV, a udev link of
  /dev/disk such as /dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_x) or a name a person types (also vdb1, a
  device-mapper name) -> the kernel name of a block device in the inventory; names are never turned
  into paths, so "/dev/../x" matches nothing.
* which disks a PCI function carries: those below it in sysfs (the collector's walk), and the NVMe
  multipath heads the kernel files under /sys/devices/virtual/nvme-subsystem, which belong to every
  function one of their paths runs through (the head's multipath/ links, the kernel's own map).
* block stacks: partitions, holders (dm, LVM, dm-crypt, md, bcache) and loop devices whose backing
  file is one of these devices or lies on a filesystem of one, and the mounts on each device.
* interface stacks: the devices stacked on an interface (master, vlan, macvlan, ...).
* socket activity: which sockets carry a connection now.

The readiness policy, DEVICE selection (`unplugd check`, RPC device names) and leases (through the
policy) all read it, so what the report stacks on a function is what a name selects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from unplugd.agent.model import BlockDevice, DevNo, Inventory, Mount, PciFunction, Socket, mount_holding
from unplugd.pci import PciAddress

__all__ = ["DeviceGraph", "function_disks", "is_active", "owner_of"]

# What the kernel appends to the path of an open file that was unlinked (d_path).
_DELETED = " (deleted)"


def is_active(sock: Socket) -> bool:
    """Whether a socket carries a connection now (and so pins the address it is bound to)."""
    if sock.proto.startswith("tcp"):
        return sock.state == "ESTABLISHED"
    # UDP has no connections; a connect()ed socket shows state 01 and a peer.
    return sock.proto.startswith("udp") and (sock.state == "ESTABLISHED" or sock.remote_port != 0)


def owner_of(sysfs_dir: str, functions: Iterable[PciFunction]) -> PciFunction | None:
    """The function a sysfs directory ("/sys/devices/...") lies below: the deepest one, so a device
    behind a bridge belongs to the function behind it, not to the bridge. None outside every function."""
    best: PciFunction | None = None
    for f in functions:
        below = bool(f.sysfs_path) and sysfs_dir.startswith(f.sysfs_path.rstrip("/") + "/")
        if below and (best is None or len(f.sysfs_path) > len(best.sysfs_path)):
            best = f
    return best


def function_disks(
    functions: Sequence[PciFunction], block: Mapping[str, BlockDevice]
) -> dict[PciAddress, tuple[str, ...]]:
    """The whole disks each function carries: its own (found below it), then the multipath heads it
    has a path of. A head with paths through two functions is a disk of both."""
    out: dict[PciAddress, list[str]] = {f.address: list(f.block_devices) for f in functions}
    for name in sorted(block):
        for path in block[name].multipath:
            owner = owner_of(path, functions)
            if owner is not None and name not in out[owner.address]:
                out[owner.address].append(name)
    return {address: tuple(disks) for address, disks in out.items()}


class DeviceGraph:
    """Indexes over one inventory; build once per scan and ask it as often as needed."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        devs = inventory.block_devices
        self._partitions: dict[str, list[str]] = {}
        self._loops_on: dict[str, list[str]] = {}
        self._by_dm_name: dict[str, str] = {}
        self._by_devno: dict[DevNo, str] = {}
        self._by_link: dict[str, str] = {}
        self._disks = function_disks(inventory.functions, devs)
        self._mounts_by_devno: dict[DevNo, list[Mount]] = {}
        self._mounts_by_source: dict[str, list[Mount]] = {}
        for bd in devs.values():
            if bd.parent:
                self._partitions.setdefault(bd.parent, []).append(bd.name)
            if bd.dm_name:
                self._by_dm_name[bd.dm_name] = bd.name
            for link in bd.links:
                self._by_link.setdefault(link, bd.name)
            self._by_devno.setdefault(bd.devno, bd.name)
        seen: set[tuple[int, int]] = set()
        for m in inventory.mounts:
            # The same mount may be reported twice (two pids in one namespace).
            key = (m.namespace, m.mount_id)
            if key in seen:
                continue
            seen.add(key)
            if m.devno[0] != 0:
                self._mounts_by_devno.setdefault(m.devno, []).append(m)
            else:
                # btrfs and friends report an anonymous device number: only the
                # source names the device.
                name = self.kernel_name(m.source)
                if name is not None:
                    self._mounts_by_source.setdefault(name, []).append(m)
        for bd in devs.values():
            if bd.backing_file:
                backing = self.kernel_name(bd.backing_file) or self.device_of_file(bd.backing_file)
                if backing is not None:
                    self._loops_on.setdefault(backing, []).append(bd.name)

    # ----------------------------------------------------------------------- names

    def kernel_name(self, path: str) -> str | None:
        """Kernel name of the block device a /dev path names (as the kernel writes it), or None.

        Compared with the inventory only: /dev/vdb1, /dev/dm-3, /dev/mapper/NAME, /dev/VG/LV, and the
        udev links of /dev/disk the collector found naming a device (/dev/disk/by-id/...).
        """
        if not path.startswith("/dev/"):
            return None
        if path in self._by_link:
            return self._by_link[path]
        rest = path[len("/dev/") :]
        if "/" not in rest:
            return rest if rest in self.inventory.block_devices else None
        head, _, tail = rest.partition("/")
        if "/" in tail or tail in ("", ".", ".."):
            return None
        if head == "mapper":
            return self._by_dm_name.get(tail)
        # /dev/VG/LV: device-mapper names it VG-LV with '-' doubled inside names.
        return self._by_dm_name.get(head.replace("-", "--") + "-" + tail.replace("-", "--"))

    def block_named(self, name: str) -> str | None:
        """Kernel name of the block device a person means: a /dev path, a kernel name or a dm name."""
        if name.startswith("/dev/"):
            return self.kernel_name(name)
        if name in self.inventory.block_devices:
            return name
        return self._by_dm_name.get(name)

    def block_of_devno(self, devno: DevNo) -> str | None:
        """Kernel name of the block device with this number, or None."""
        return self._by_devno.get(devno)

    def device_of_file(self, path: str) -> str | None:
        """Kernel name of the block device whose filesystem holds `path` (a loop's backing file), or None.

        A path the kernel marks deleted still lives on that filesystem.
        """
        inv = self.inventory
        best = mount_holding(path.removesuffix(_DELETED), inv.mounts, inv.mount_namespace)
        if best is None:
            return None
        if best.devno[0] == 0:
            return self.kernel_name(best.source)
        return self._by_devno.get(best.devno)

    # ----------------------------------------------------------------------- block stacks

    def disks_of(self, f: PciFunction) -> tuple[str, ...]:
        """The whole disks a function carries: below it in sysfs, and multipath heads with a path through it."""
        return self._disks.get(f.address, f.block_devices)

    def paths_of(self, name: str) -> list[tuple[str, PciAddress | None]]:
        """An NVMe multipath head's paths: (path device name, the function it runs through or None)."""
        bd = self.inventory.block_devices.get(name)
        if bd is None:
            return []
        out: list[tuple[str, PciAddress | None]] = []
        for path in bd.multipath:
            owner = owner_of(path, self.inventory.functions)
            out.append((path.rsplit("/", 1)[-1], owner.address if owner is not None else None))
        return out

    def upward(self, name: str) -> list[str]:
        """What sits directly on a block device: partitions, holders, loops."""
        bd = self.inventory.block_devices.get(name)
        out = list(self._partitions.get(name, ()))
        if bd is not None:
            out.extend(h for h in bd.holders if h not in out)
        out.extend(lo for lo in self._loops_on.get(name, ()) if lo not in out)
        return out

    def block_closure(self, disks: Iterable[str]) -> list[str]:
        """The disks and everything stacked on them, in discovery order (breadth first); only known devices."""
        devs = self.inventory.block_devices
        found: list[str] = []
        seen: set[str] = set()
        queue = [d for d in disks if d in devs]
        while queue:
            name = queue.pop(0)
            if name in seen or name not in devs:
                continue
            seen.add(name)
            found.append(name)
            queue.extend(n for n in self.upward(name) if n not in seen)
        return found

    def mounts_on(self, name: str) -> Sequence[Mount]:
        """The mounts of the filesystem on a block device, each (namespace, mount id) once."""
        bd = self.inventory.block_devices.get(name)
        by_devno = self._mounts_by_devno.get(bd.devno, []) if bd is not None else []
        return [*by_devno, *self._mounts_by_source.get(name, ())]

    # ----------------------------------------------------------------------- interfaces

    def interface_stack(self, name: str) -> frozenset[str]:
        """The interface and every device stacked on it (master, vlan, macvlan, ...)."""
        interfaces = self.inventory.interfaces
        seen = {name}
        queue = [name]
        while queue:
            iface = interfaces.get(queue.pop())
            if iface is None:
                continue
            for up in (*iface.uppers, *((iface.master,) if iface.master else ())):
                if up not in seen:
                    seen.add(up)
                    queue.append(up)
        return frozenset(seen)
