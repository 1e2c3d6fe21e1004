"""Generate a large synthetic guest as a real directory tree, in the layout the collectors read.

DIR/sys, DIR/proc, DIR/dev and DIR/netlink.json, shaped like a tree written
by `unplugd capture` (symlinks kept as symlinks, /proc/PID/fd entries as
symlinks whose text is the opened path, device nodes as empty files):

  PCI    256 functions: host bridge, 8-function multifunction slots, single
         slots, PCI bridges with devices (incl. a multifunction slot) behind
         them, acpiphp hotplug slots; virtio-blk disks with two partitions,
         virtio-net interfaces, and functions with no driver.
  mounts 1,000 lines across several mount namespaces (the agent's own plus
         "containers"): /, pseudo filesystems, data partitions, bind mounts,
         tmpfs, a mount point with an octal escape.
  procs  2,000 processes with 20 fds each: /dev/null, ttys, pipes, sockets,
         files, and a few holding a data partition open.
  swap   one swap partition; netlink.json with addresses and default routes.

Deterministic for a given spec (seeded), so two runs measure the same tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["GeneratedTree", "PciFn", "TreeSpec", "generate", "generated_tree"]

HOST_NS = 4026531840
VIRTIO_VENDOR = 0x1AF4
BLK_MAJOR = 254


@dataclass(frozen=True)
class TreeSpec:
    functions: int = 256
    mounts: int = 1000
    processes: int = 2000
    fds_per_process: int = 20
    namespaces: int = 5  # the agent's own + containers
    seed: int = 2
    # PCI layout. Root bus: 8-function slots, single slots (as many as fit),
    # then bridges at the top slots; behind each bridge a 4-function slot and
    # single slots round-robin until `functions`.
    first_root_slot: int = 1  # 2 to leave slot 1 to QEMU pc's PIIX3
    root_multifunction_slots: int = 4
    root_single_slots: int = 20
    bridges: int = 7
    nested_bridge: bool = True  # one bridge behind the first bridge
    # The 4-function slot behind the last bridge holds only driverless
    # functions, so it is READY as a whole (an unplug needs no --force).
    idle_multifunction_slot: bool = True


@dataclass
class PciFn:
    bdf: str  # 0000:01:05.3
    sysdir: str  # devices/pci0000:00/0000:00:19.0/0000:01:05.3 (relative to sys/)
    kind: str  # "host" | "bridge" | "blk" | "net" | "none"
    class_code: int
    device_id: int
    secondary_bus: int | None = None

    @property
    def parent_bdf(self) -> str | None:
        """The bridge it sits behind (tree numbering), None on the root bus."""
        parent = self.sysdir.rsplit("/", 2)[-2]
        return None if parent.startswith("pci") else parent

    @property
    def bus(self) -> int:
        return int(self.bdf[5:7], 16)

    @property
    def slot(self) -> int:
        return int(self.bdf[8:10], 16)

    @property
    def function(self) -> int:
        return int(self.bdf[11])


@dataclass
class GeneratedTree:
    root: Path
    spec: TreeSpec
    functions: int = 0
    bridges: int = 0
    multifunction_slots: int = 0
    disks: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    mounts: int = 0
    processes: int = 0
    fds: int = 0
    holders: int = 0  # processes holding a data partition
    mounted_partitions: list[str] = field(default_factory=list)
    swap: str = ""
    block_nodes: list[tuple[str, int, int]] = field(default_factory=list)  # (/dev/vda1, major, minor)
    pci: list[PciFn] = field(default_factory=list)


def _disk_name(i: int) -> str:
    # vda..vdz, vdaa..vdaz, ...: the kernel's sd/vd naming
    letters = ""
    n = i
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return "vd" + letters


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def _rel_link(root: Path, link: str, target: str) -> None:
    """A relative symlink at root/link pointing to root/target, as sysfs makes them."""
    _link(root / link, os.path.relpath(root / target, (root / link).parent))


def _topology(spec: TreeSpec) -> tuple[list[PciFn], list[tuple[int, int]], int]:
    """Functions, hotplug slots (bus, slot) and the number of multifunction slots."""
    count = spec.functions
    fns: list[PciFn] = [PciFn("0000:00:00.0", "devices/pci0000:00/0000:00:00.0", "host", 0x060000, 0x29C0)]
    hotplug: list[tuple[int, int]] = []
    multi = 0
    kinds = ("blk", "net", "none")
    seq = 0

    def endpoint(bus: int, slot: int, fn: int, parent: str, kind: str = "") -> PciFn:
        nonlocal seq
        if not kind:
            kind = kinds[seq % 3]
            seq += 1
        bdf = f"0000:{bus:02x}:{slot:02x}.{fn}"
        cls = {"blk": 0x010000, "net": 0x020000, "none": 0xFF0000}[kind]
        dev = {"blk": 0x1001, "net": 0x1000, "none": 0x1110}[kind]
        return PciFn(bdf, f"{parent}/{bdf}", kind, cls, dev)

    root = "devices/pci0000:00"
    slot = spec.first_root_slot
    for _ in range(spec.root_multifunction_slots):
        multi += 1
        hotplug.append((0, slot))
        fns.extend(endpoint(0, slot, f, root) for f in range(8))
        slot += 1
    first_bridge_slot = 0x20 - spec.bridges
    singles = min(spec.root_single_slots, first_bridge_slot - slot, count - len(fns) - spec.bridges)
    for _ in range(max(0, singles)):
        hotplug.append((0, slot))
        fns.append(endpoint(0, slot, 0, root))
        slot += 1
    bridges: list[PciFn] = []
    for i, bslot in enumerate(range(first_bridge_slot, 0x20)):
        bdf = f"0000:00:{bslot:02x}.0"
        bridges.append(PciFn(bdf, f"{root}/{bdf}", "bridge", 0x060400, 0x0001, secondary_bus=i + 1))
        hotplug.append((0, bslot))
    if spec.nested_bridge and bridges:
        # A bridge behind a bridge: paths three hops deep (0000:00/19.0/1f.0/SS.F).
        first = bridges[0]
        nested_bdf = f"0000:{first.secondary_bus or 0:02x}:1f.0"
        bridges.append(
            PciFn(
                nested_bdf, f"{first.sysdir}/{nested_bdf}", "bridge", 0x060400, 0x0001, secondary_bus=len(bridges) + 1
            )
        )
        hotplug.append((first.secondary_bus or 0, 0x1F))
    fns.extend(bridges)
    for i, b in enumerate(bridges):
        bus = b.secondary_bus or 0
        multi += 1
        hotplug.append((bus, 1))
        idle = spec.idle_multifunction_slot and i == len(bridges) - 1
        fns.extend(endpoint(bus, 1, f, b.sysdir, "none" if idle else "") for f in range(4))
    slot = 2
    while len(fns) < count and bridges:
        for b in bridges:
            if len(fns) >= count:
                break
            bus = b.secondary_bus or 0
            hotplug.append((bus, slot))
            fns.append(endpoint(bus, slot, 0, b.sysdir))
        slot += 1
        if slot >= 0x1F:
            raise ValueError(f"{count} functions do not fit this topology")
    if len(fns) != count:
        raise ValueError(f"this layout holds {len(fns)} functions, not {count}")
    return fns, hotplug, multi


class _Writer:
    def __init__(self, root: Path, spec: TreeSpec) -> None:
        self.root = root
        self.sys = root / "sys"
        self.proc = root / "proc"
        self.dev = root / "dev"
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.out = GeneratedTree(root=root, spec=spec)
        self.partitions: list[tuple[str, int]] = []  # (name, minor)
        self.virtio_index = 0
        self.ifindex = 2  # 1 is lo
        self.addresses: list[dict[str, object]] = []
        self.routes: list[dict[str, object]] = []

    # --- sysfs ---------------------------------------------------------------------------

    def pci(self) -> None:
        fns, hotplug, multi = _topology(self.spec)
        self.out.functions = len(fns)
        self.out.pci = fns
        self.out.multifunction_slots = multi
        self.out.bridges = sum(1 for f in fns if f.kind == "bridge")
        for d in ("bus/pci/drivers/virtio-pci", "bus/virtio/drivers/virtio_blk", "bus/virtio/drivers/virtio_net"):
            (self.sys / d).mkdir(parents=True, exist_ok=True)
        (self.sys / "devices/pci0000:00").mkdir(parents=True, exist_ok=True)
        for fn in fns:
            self._function(fn)
        for n, (bus, slot) in enumerate(hotplug):
            sdir = self.sys / "bus/pci/slots" / str(n + 1)
            _write(sdir / "address", f"0000:{bus:02x}:{slot:02x}\n")
            # acpiphp's controls: what tells a hotplug slot from pci_slot.ko's informational one
            _write(sdir / "power", "1\n")
            _write(sdir / "adapter", "1\n")

    def _function(self, fn: PciFn) -> None:
        d = self.sys / fn.sysdir
        d.mkdir(parents=True, exist_ok=True)
        vendor = 0x8086 if fn.kind in ("host",) else (0x1B36 if fn.kind == "bridge" else VIRTIO_VENDOR)
        _write(d / "vendor", f"0x{vendor:04x}\n")
        _write(d / "device", f"0x{fn.device_id:04x}\n")
        _write(d / "class", f"0x{fn.class_code:06x}\n")
        _write(d / "subsystem_vendor", f"0x{vendor:04x}\n")
        _write(d / "subsystem_device", "0x0001\n")
        # virtio-pci binds virtio functions; QEMU's pci-bridge and the host bridge have no driver.
        driver = "virtio-pci" if fn.kind in ("blk", "net") else None
        uevent = [f"PCI_CLASS={fn.class_code:X}", f"PCI_ID={vendor:04X}:{fn.device_id:04X}", f"PCI_SLOT_NAME={fn.bdf}"]
        if driver:
            uevent.insert(0, f"DRIVER={driver}")
            _rel_link(self.sys, f"{fn.sysdir}/driver", f"bus/pci/drivers/{driver}")
        _write(d / "uevent", "\n".join(uevent) + "\n")
        _rel_link(self.sys, f"{fn.sysdir}/subsystem", "bus/pci")
        _rel_link(self.sys, f"bus/pci/devices/{fn.bdf}", fn.sysdir)
        if fn.kind == "blk":
            self._virtio_disk(fn)
        elif fn.kind == "net":
            self._virtio_net(fn)

    def _virtio_child(self, fn: PciFn, driver: str) -> str:
        name = f"virtio{self.virtio_index}"
        self.virtio_index += 1
        vdir = f"{fn.sysdir}/{name}"
        _rel_link(self.sys, f"{vdir}/driver", f"bus/virtio/drivers/{driver}")
        _write(self.sys / vdir / "uevent", f"DRIVER={driver}\n")
        return vdir

    def _virtio_disk(self, fn: PciFn) -> None:
        vdir = self._virtio_child(fn, "virtio_blk")
        idx = len(self.out.disks)
        name = _disk_name(idx)
        self.out.disks.append(name)
        minor = idx * 16
        ddir = f"{vdir}/block/{name}"
        self._block_node(ddir, name, minor, sectors=2 * 1024 * 1024 * 8, devtype="disk")
        _rel_link(self.sys, f"block/{name}", ddir)
        for p in (1, 2):
            pname = f"{name}{p}"
            pdir = f"{ddir}/{pname}"
            self._block_node(pdir, pname, minor + p, sectors=1024 * 1024 * 8, devtype="partition")
            _write(self.sys / pdir / "partition", f"{p}\n")
            _write(self.sys / pdir / "start", f"{2048 + (p - 1) * 1024 * 1024 * 8}\n")
            self.partitions.append((pname, minor + p))

    def _block_node(self, rel: str, name: str, minor: int, sectors: int, devtype: str) -> None:
        d = self.sys / rel
        _write(d / "dev", f"{BLK_MAJOR}:{minor}\n")
        _write(d / "size", f"{sectors}\n")
        _write(d / "ro", "0\n")
        _write(d / "uevent", f"MAJOR={BLK_MAJOR}\nMINOR={minor}\nDEVNAME={name}\nDEVTYPE={devtype}\n")
        (d / "holders").mkdir(exist_ok=True)
        (d / "slaves").mkdir(exist_ok=True)
        _rel_link(self.sys, f"{rel}/subsystem", "class/block")
        _rel_link(self.sys, f"class/block/{name}", rel)
        _rel_link(self.sys, f"dev/block/{BLK_MAJOR}:{minor}", rel)
        (self.dev / name).touch()
        self.out.block_nodes.append((f"/dev/{name}", BLK_MAJOR, minor))

    def _virtio_net(self, fn: PciFn) -> None:
        vdir = self._virtio_child(fn, "virtio_net")
        n = len(self.out.interfaces)
        name = f"eth{n}"
        self.out.interfaces.append(name)
        ndir = f"{vdir}/net/{name}"
        d = self.sys / ndir
        ifindex = self.ifindex
        self.ifindex += 1
        # Most interfaces up with addresses; every fourth one down (no carrier file: EINVAL when down).
        up = n % 4 != 3
        _write(d / "ifindex", f"{ifindex}\n")
        _write(d / "flags", "0x1003\n" if up else "0x1002\n")
        _write(d / "operstate", "up\n" if up else "down\n")
        if up:
            _write(d / "carrier", "1\n")
        _write(d / "address", f"52:54:00:{n >> 16 & 0xFF:02x}:{n >> 8 & 0xFF:02x}:{n & 0xFF:02x}\n")
        _write(d / "type", "1\n")
        _write(d / "mtu", "1500\n")
        _write(d / "uevent", f"INTERFACE={name}\nIFINDEX={ifindex}\n")
        _rel_link(self.sys, f"class/net/{name}", ndir)
        if up:
            self.addresses.append(
                {
                    "ifname": name,
                    "family": 4,
                    "address": f"10.{n >> 8}.{n & 0xFF}.2",
                    "prefixlen": 24,
                    "scope": "global",
                }
            )
            self.addresses.append(
                {"ifname": name, "family": 6, "address": f"fe80::5054:ff:fe00:{n:x}", "prefixlen": 64, "scope": "link"}
            )
            self.routes.append(
                {
                    "family": 4,
                    "destination": f"10.{n >> 8}.{n & 0xFF}.0/24",
                    "gateway": None,
                    "ifname": name,
                    "table": 254,
                }
            )

    def loopback(self) -> None:
        ndir = "devices/virtual/net/lo"
        d = self.sys / ndir
        _write(d / "ifindex", "1\n")
        _write(d / "flags", "0x9\n")
        _write(d / "operstate", "unknown\n")
        _write(d / "carrier", "1\n")
        _write(d / "address", "00:00:00:00:00:00\n")
        _write(d / "type", "772\n")
        _write(d / "uevent", "INTERFACE=lo\nIFINDEX=1\n")
        _rel_link(self.sys, "class/net/lo", ndir)
        self.addresses.append({"ifname": "lo", "family": 4, "address": "127.0.0.1", "prefixlen": 8, "scope": "host"})
        self.addresses.append({"ifname": "lo", "family": 6, "address": "::1", "prefixlen": 128, "scope": "host"})
        if self.out.interfaces:
            first = self.out.interfaces[0]
            self.routes.append(
                {"family": 4, "destination": "0.0.0.0/0", "gateway": "10.0.0.1", "ifname": first, "table": 254}
            )
        if len(self.out.interfaces) > 1:
            second = self.out.interfaces[1]
            self.addresses.append(
                {"ifname": second, "family": 6, "address": "2001:db8::2", "prefixlen": 64, "scope": "global"}
            )
            self.routes.append(
                {"family": 6, "destination": "::/0", "gateway": "2001:db8::1", "ifname": second, "table": 254}
            )
        netlink = {"version": 1, "links": [], "addresses": self.addresses, "routes": self.routes}
        (self.root / "netlink.json").write_text(json.dumps(netlink, indent=1) + "\n")

    # --- procfs --------------------------------------------------------------------------

    def _mountinfo(self, ns_index: int, count: int) -> str:
        """`count` mountinfo lines; namespace 0 is the agent's (root on the first disk's p1)."""
        lines: list[str] = []
        next_id = 20

        def add(parent: int, devno: str, root: str, point: str, opts: str, fstype: str, source: str) -> int:
            nonlocal next_id
            mid = next_id
            next_id += 1
            tag = "shared:1" if ns_index == 0 else "master:1"
            lines.append(f"{mid} {parent} {devno} {root} {point} {opts} {tag} - {fstype} {source} rw")
            return mid

        root_part, root_minor = self.partitions[0]
        root_id = add(1, f"{BLK_MAJOR}:{root_minor}", "/", "/", "rw,relatime", "ext4", f"/dev/{root_part}")
        for point, fstype, minor in (("/proc", "proc", 21), ("/sys", "sysfs", 22), ("/dev", "devtmpfs", 5)):
            add(root_id, f"0:{minor}", "/", point, "rw,nosuid", fstype, fstype)
        add(root_id, "0:24", "/", "/run", "rw,nosuid,nodev", "tmpfs", "tmpfs")
        if ns_index == 0:
            # Data partitions: every third disk's p1 mounted; one bind mount of a subtree; an escaped name.
            for i, (pname, minor) in enumerate(self.partitions[2::6]):
                if len(lines) >= count - 3:
                    break
                mid = add(root_id, f"{BLK_MAJOR}:{minor}", "/", f"/srv/data{i}", "rw,relatime", "ext4", f"/dev/{pname}")
                self.out.mounted_partitions.append(pname)
                if i == 0:
                    add(
                        root_id,
                        f"{BLK_MAJOR}:{minor}",
                        "/exports",
                        "/srv/bind0",
                        "rw,relatime",
                        "ext4",
                        f"/dev/{pname}",
                    )
                    add(mid, f"{BLK_MAJOR}:{minor}", "/", "/mnt/with\\040space", "rw", "ext4", f"/dev/{pname}")
        else:
            # A container: overlay root seen as a mount of a data partition, plus its own tmpfs.
            pname, minor = self.partitions[(2 + 6 * ns_index) % len(self.partitions)]
            add(
                root_id,
                f"{BLK_MAJOR}:{minor}",
                f"/containers/c{ns_index}",
                "/var/lib/app",
                "rw",
                "ext4",
                f"/dev/{pname}",
            )
            if pname not in self.out.mounted_partitions:
                self.out.mounted_partitions.append(pname)
        k = 0
        while len(lines) < count:
            add(root_id, f"0:{100 + k}", "/", f"/run/user/{1000 + k}/tmp", "rw,nosuid,nodev", "tmpfs", "tmpfs")
            k += 1
        return "\n".join(lines) + "\n"

    def processes(self) -> None:
        spec = self.spec
        n_ns = max(1, spec.namespaces)
        # The agent's namespace gets most mounts; containers share the rest.
        container_mounts = (spec.mounts * 1 // 10) // max(1, n_ns - 1) if n_ns > 1 else 0
        own_mounts = spec.mounts - container_mounts * (n_ns - 1)
        self.out.mounts = own_mounts + container_mounts * (n_ns - 1)
        mountinfo = [self._mountinfo(i, own_mounts if i == 0 else container_mounts) for i in range(n_ns)]
        _write(self.proc / "swaps", "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")
        if len(self.partitions) > 1:
            swap, _ = self.partitions[1]
            self.out.swap = swap
            _write(
                self.proc / "swaps",
                "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
                f"/dev/{swap}                               partition\t4194300\t\t0\t\t-2\n",
            )
        for name in ("tcp", "tcp6", "udp", "udp6"):
            header = (
                "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
            )
            _write(self.proc / "net" / name, header)
        _write(self.proc / "sys/kernel/hostname", "bench-guest\n")
        _write(self.proc / "sys/kernel/osrelease", "6.1.0-bench\n")
        data_parts = [p for p, _ in self.partitions if p not in self.out.mounted_partitions and p != self.out.swap]
        first_pid = 1
        written_ns: set[int] = set()
        for i in range(spec.processes):
            pid = first_pid + i
            ns_index = 0 if i % 10 else (i // 10) % n_ns  # one in ten processes in a container
            ns = HOST_NS + ns_index * 3
            pdir = self.proc / str(pid)
            (pdir / "fd").mkdir(parents=True)
            (pdir / "ns").mkdir()
            os.symlink(f"mnt:[{ns}]", pdir / "ns" / "mnt")
            (pdir / "comm").write_text(("systemd" if pid == 1 else f"worker{i % 97}") + "\n")
            if ns not in written_ns:
                # A capture keeps the mountinfo of the first pid per namespace only.
                (pdir / "mountinfo").write_text(mountinfo[ns_index])
                written_ns.add(ns)
            holds = data_parts and i % 50 == 7
            for fd in range(spec.fds_per_process):
                os.symlink(self._fd_target(pid, fd, data_parts if holds else []), pdir / "fd" / str(fd))
            self.out.processes += 1
            self.out.fds += spec.fds_per_process
            if holds:
                self.out.holders += 1
        # proc/self: the capturing process; pid 1 shares its namespace and has its mountinfo.
        os.symlink(str(first_pid), self.proc / "self")

    def _fd_target(self, pid: int, fd: int, hold: list[str]) -> str:
        if fd == 0:
            return "/dev/null"
        if fd in (1, 2):
            return f"/dev/pts/{pid % 8}"
        if fd == 3 and hold:
            return f"/dev/{hold[pid % len(hold)]}"
        r = self.rng.random()
        if r < 0.3:
            return f"socket:[{100000 + pid * 32 + fd}]"
        if r < 0.5:
            return f"pipe:[{200000 + pid * 32 + fd}]"
        if r < 0.6:
            return "anon_inode:[eventpoll]"
        if r < 0.7:
            return "/dev/urandom"
        return f"/var/lib/app{pid % 13}/file{fd}.db"

    def dev_basics(self) -> None:
        for name in ("null", "zero", "urandom", "tty"):
            (self.dev / name).touch()
        (self.dev / "pts").mkdir(exist_ok=True)
        for n in range(8):
            (self.dev / "pts" / str(n)).touch()


def generate(root: Path, spec: TreeSpec | None = None) -> GeneratedTree:
    """Write the tree under root (which must be empty or absent) and describe what is in it."""
    spec = spec or TreeSpec()
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")
    w = _Writer(root, spec)
    w.dev.mkdir()
    w.dev_basics()
    w.pci()
    w.loopback()
    w.processes()
    return w.out


def _scratch_parent() -> str | None:
    # tmpfs: on this machine writing 60,000 entries to ext4 on vda can take 30 s
    # of system time; the collectors read the page cache either way.
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


@contextlib.contextmanager
def generated_tree(spec: TreeSpec | None = None) -> Iterator[tuple[GeneratedTree, float]]:
    """A freshly generated tree in a temporary directory (tmpfs when available) and its build time."""
    tmp = tempfile.mkdtemp(prefix="unplugd-bench-tree-", dir=_scratch_parent())
    try:
        t0 = time.perf_counter()
        tree = generate(Path(tmp) / "guest", spec)
        yield tree, time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
