"""The agent's model: the records (NamedTuples) that collectors produce and the policy reads.

No I/O here and no protobuf: report.py is the one place the model meets the wire.
Device numbers are (major, minor) tuples; names are kernel names (vda1, dm-0, eth0).
"""

# No `from __future__ import annotations`: a NamedTuple compiles each field's annotation given as a
# string (typing.ForwardRef), ~25 us a field, and every `unplugd` start creates these classes.

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Generic, NamedTuple, TypeVar

from unplugd.pci import PciAddress, PciPath

__all__ = [
    "Address",
    "BlockDevice",
    "BoundDevice",
    "Collected",
    "DevNo",
    "DeviceNode",
    "Inventory",
    "Mount",
    "NetInterface",
    "OpenRef",
    "PciFunction",
    "Route",
    "ScanProblem",
    "Socket",
    "Swap",
    "format_devno",
    "mount_holding",
    "parse_devno",
]

DevNo = tuple[int, int]


def format_devno(devno: DevNo) -> str:
    return f"{devno[0]}:{devno[1]}"


def parse_devno(text: str) -> DevNo:
    """'252:16' -> (252, 16); ValueError on anything else."""
    major, sep, minor = text.strip().partition(":")
    if not sep or not major.isdigit() or not minor.isdigit():
        raise ValueError(f"not a device number: {text!r}")
    return int(major), int(minor)


class DeviceNode(NamedTuple):
    """A /dev node that belongs to a PCI function (its disk, partitions, char devices)."""

    path: str  # as the kernel names it: /dev/vda1
    devno: DevNo
    kind: str  # "block" | "char"


class BoundDevice(NamedTuple):
    """A device below a PCI function with a driver bound to it (virtio1: virtio_blk, 2:0:0:0: sd).

    What the function's walk found, so the policy can say what below a function it understands
    (it holds a disk or an interface) and what it does not (a driver bound to a leaf that holds
    neither: a tape, a USB keyboard, an entropy source).
    """

    path: str  # relative to the function's directory: virtio1, usb1/1-1/1-1:1.0
    driver: str
    holds: tuple[str, ...] = ()  # disks and interfaces found below it
    nodes: tuple[str, ...] = ()  # device nodes found below it (/dev/st0)
    leaf: bool = True  # no other device with a driver below it

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


class PciFunction(NamedTuple):
    address: PciAddress
    path: PciPath
    vendor_id: int
    device_id: int
    class_code: int  # 24-bit: class, subclass, prog-if
    driver: str | None
    is_bridge: bool
    # /sys/bus/pci/slots/NAME whose address is this function's slot; None: no
    # hotplug controller in the guest drives the slot.
    hotplug_slot: str | None
    # Kernel objects below the function, by name.
    block_devices: tuple[str, ...] = ()  # whole disks: vda, nvme0n1
    net_interfaces: tuple[str, ...] = ()
    device_nodes: tuple[DeviceNode, ...] = ()
    vendor_name: str | None = None
    device_name: str | None = None
    class_name: str | None = None
    sysfs_path: str = ""  # /sys/devices/pci0000:00/0000:00:03.0/...
    # Drivers bound to child devices on other buses: virtio-pci binds every
    # virtio function, the class driver (virtio_blk, virtio_net) sits on virtioN.
    subdrivers: tuple[str, ...] = ()
    # Every device below the function with a driver bound, in walk order.
    bound: tuple[BoundDevice, ...] = ()

    @property
    def base_class(self) -> int:
        return (self.class_code >> 16) & 0xFF


class BlockDevice(NamedTuple):
    name: str  # vda, vda1, dm-0, md0, loop3
    kind: str  # "disk" | "part" | "dm" | "md" | "loop"
    devno: DevNo
    size_bytes: int
    parent: str | None = None  # the disk of a partition
    holders: tuple[str, ...] = ()  # /sys/block/X/holders
    slaves: tuple[str, ...] = ()  # /sys/block/X/slaves
    dm_name: str | None = None  # /sys/block/dm-N/dm/name (vg-lv, luks-...)
    dm_uuid: str | None = None  # CRYPT-..., LVM-...
    backing_file: str | None = None  # loop devices
    md_level: str | None = None  # raid1, ...
    # An NVMe multipath head (nvme0n1 under /sys/devices/virtual/nvme-subsystem/nvme-subsys0/): the
    # sysfs directories of its hidden per-path devices (nvme0c0n1 below a controller), from the
    # kernel's own map, the head's multipath/ links, as "/sys/devices/..." text.
    multipath: tuple[str, ...] = ()
    # The udev links in /dev/disk that name it (/dev/disk/by-id/nvme-..., by-path, by-uuid, ...).
    links: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """A name for people: dm devices by their mapper name."""
        return f"{self.name} ({self.dm_name})" if self.dm_name else self.name


# A tuple, no per-instance dict: a scan holds one per mount per namespace, tens of thousands when users
# make namespaces.
class Mount(NamedTuple):
    mount_id: int
    parent_id: int
    devno: DevNo
    root: str  # path inside the filesystem; not "/" for bind mounts of a subtree
    mount_point: str
    fstype: str
    source: str
    options: str
    # Mount namespace inode ("mnt:[4026531840]" -> 4026531840); 0 if unknown.
    namespace: int = 0
    # A pid living in that namespace, for people to find it.
    namespace_pid: int = 0


class Swap(NamedTuple):
    path: str  # /dev/vdb2 or /swapfile
    kind: str  # "partition" | "file"
    # The device that holds the swap: the partition itself, or the
    # filesystem's device a swap file lives on (resolved by the collector).
    devno: DevNo | None
    size_kib: int = 0
    used_kib: int = 0


class OpenRef(NamedTuple):
    """A process holding a device node open (fd, or mapped through maps/cwd/root)."""

    pid: int
    command: str
    devno: DevNo
    kind: str  # "block" | "char"; "file": a file on the filesystem of block device `devno`
    target: str  # /dev/vdb1 as the fd link names it
    fd: int | None = None  # None for cwd/root/mmap references


class Address(NamedTuple):
    family: int  # socket.AF_INET | socket.AF_INET6
    address: str
    prefixlen: int
    scope: str = "global"  # "global" | "link" | "host"

    def __str__(self) -> str:
        return f"{self.address}/{self.prefixlen}"


class Route(NamedTuple):
    family: int
    destination: str  # "0.0.0.0/0", "::/0", "10.0.0.0/8"
    gateway: str | None
    ifname: str
    table: int = 254

    @property
    def is_default(self) -> bool:
        return self.destination.endswith("/0")


class Socket(NamedTuple):
    proto: str  # tcp | tcp6 | udp | udp6
    local: str
    local_port: int
    remote: str
    remote_port: int
    state: str  # ESTABLISHED, LISTEN, ...
    inode: int = 0
    pids: tuple[int, ...] = ()


class NetInterface(NamedTuple):
    name: str
    ifindex: int
    admin_up: bool  # IFF_UP
    operstate: str  # up, down, dormant, unknown, lowerlayerdown
    carrier: bool | None  # None when unreadable (interface down)
    mac: str = ""
    kind: str = ""  # bond, bridge, vlan, macvlan, veth, team, "" for plain NICs
    master: str | None = None  # bond0/br0 this interface is enslaved to
    uppers: tuple[str, ...] = ()  # every upper device (vlan, macvlan, master)
    lowers: tuple[str, ...] = ()
    addresses: tuple[Address, ...] = ()


class ScanProblem(NamedTuple):
    """Something the agent could not read; the functions it touches are UNKNOWN."""

    object: str  # /proc/812/fd, mountinfo of mnt:[4026532] ...
    detail: str
    # Which kernel objects this problem leaves undecided: kernel names (vdb1,
    # eth0, 0000:00:03.0), "devno:MAJ:MIN" when only the number is known, or
    # "*" when it may touch any of them (e.g. /proc/PID/fd unreadable: the
    # process could hold any device node).
    affects: tuple[str, ...] = ("*",)


_T_co = TypeVar("_T_co", covariant=True)  # a tuple is read-only: a Collected[list[X]] is a Collected[Iterable[X]]


class Collected(NamedTuple, Generic[_T_co]):
    """What one collector returns: what it saw, and what it could not read.

    Every collector answers in this shape, so engine.scan runs them all the same way (one line a
    step) and never loses a problem. A tuple: `value, problems = collect_block(roots)`.
    """

    value: _T_co
    problems: list[ScanProblem]


class Inventory(NamedTuple):
    """Everything the collectors saw in one scan."""

    functions: tuple[PciFunction, ...]
    block_devices: Mapping[str, BlockDevice] = MappingProxyType({})  # read-only: a default every Inventory shares
    mounts: tuple[Mount, ...] = ()
    swaps: tuple[Swap, ...] = ()
    open_refs: tuple[OpenRef, ...] = ()
    interfaces: Mapping[str, NetInterface] = MappingProxyType({})
    routes: tuple[Route, ...] = ()
    sockets: tuple[Socket, ...] = ()
    # Device number of the filesystem mounted on / in the agent's namespace.
    root_devno: DevNo | None = None
    # The agent's own mount namespace inode (Mount.namespace of its mounts);
    # reasons name the namespace of mounts seen only elsewhere. 0 if unknown.
    mount_namespace: int = 0
    # Block devices (disks) for which an O_EXCL open failed with EBUSY: the
    # kernel says someone holds them. Empty on captured trees.
    exclusive_busy: frozenset[str] = frozenset()
    problems: tuple[ScanProblem, ...] = ()
    hostname: str = ""
    kernel: str = ""
    live: bool = True


def mount_holding(path: str, mounts: Sequence[Mount], own_namespace: int = 0) -> Mount | None:
    """The mount whose filesystem holds `path` (a swap file, a loop's backing file), or None.

    The kernel names such files by their path in the mount tree they hang in, which need not be the
    agent's: the service's own namespace does not see mounts made after it started. So the longest
    component-wise mount point above the path in any namespace wins. On a tie, init's namespace
    (pid 1's) first: it is where swapon and losetup usually ran, while the agent's own namespace is
    rearranged by its sandbox (ProtectHome= and PrivateTmp= mount over /home and /tmp there); then
    the agent's own, then any other; within one namespace the last listed (the visible one of
    mounts stacked on one point).
    """
    best: Mount | None = None
    best_key = (-1, -1)
    for m in mounts:
        mp = m.mount_point
        if not (mp in ("/", path) or path.startswith(mp.rstrip("/") + "/")):
            continue
        rank = 2 if m.namespace_pid == 1 else 1 if m.namespace == own_namespace else 0
        key = (len(mp), rank)
        if key >= best_key:
            best, best_key = m, key
    return best
