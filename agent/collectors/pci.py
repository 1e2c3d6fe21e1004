"""PCI functions from /sys/bus/pci/devices, with their PCI path and the kernel objects below them.

Each entry of /sys/bus/pci/devices is a link into /sys/devices, e.g.
  0000:01:05.0 -> ../../../devices/pci0000:00/0000:00:03.0/0000:01:05.0
The PCI path (DESIGN.md) comes from that link's components: the root bus
`pciDDDD:BB`, then one (slot, function) hop per bridge and the function itself.
The link is joined with its directory and normalised as text, never resolved
through the filesystem, so a captured tree gives the same answer as the live one.

Below a function (its own sysfs directory, walked without following symlinks
and without entering child PCI functions) sit the objects that make it busy:
block disks and partitions, net interfaces, char/block device nodes, and the
drivers bound to child devices (virtio_blk on virtio1 for a virtio-pci function).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from unplugd.agent.errors import ReadError, Vanished
from unplugd.agent.lazylog import Logger
from unplugd.agent.model import BoundDevice, Collected, DeviceNode, PciFunction, ScanProblem, parse_devno
from unplugd.agent.roots import Roots
from unplugd.agent.sysio import (
    as_read_error,
    listdir,
    os_lstat,
    os_readlink,
    os_reason,
    os_scandir,
    parse_uevent,
    read_system_file,
    read_text,
    read_text_or,
    readlink_or,
)
from unplugd.pci import PciAddress, PciPath

__all__ = [
    "BDF_NAME",
    "PCI_IDS_LOCATIONS",
    "PciIds",
    "bound_devices",
    "class_name",
    "collect_pci",
    "default_pci_ids",
    "parse_hex_id",
    "parse_pci_ids",
    "parse_pci_path",
    "parse_slot_address",
]

log = Logger(__name__)  # imports logging only to log (lazylog)

PCI_IDS_LOCATIONS = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"))

_ROOT_BUS = re.compile(r"^pci([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2})$")
# A PCI function's directory name in sysfs (0000:00:03.0); capture.py skips the same child functions.
BDF_NAME = re.compile(r"^[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_SLOT_ADDRESS = re.compile(r"^([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})$")

# Deep enough for usb-storage behind a controller (usb1/1-1/1-1:1.0/host2/target2:0:0/2:0:0:0/block/sdb/sdb1).
_MAX_DEPTH = 12
# Attribute directories that never hold devices; skipping them keeps the walk small.
_NOISE = frozenset({"power", "msi_irqs", "queue", "mq", "trace", "statistics", "holders", "slaves", "integrity"})
# A slot a hotplug driver (acpiphp, pciehp, shpchp) registered has controls;
# the informational slots of pci_slot.ko have only address and bus speeds.
_HOTPLUG_FILES = ("power", "adapter", "attention", "latch", "module")

_CLASS_NAMES: dict[int, str] = {
    0x00: "unclassified",
    0x01: "storage",
    0x02: "network",
    0x03: "display",
    0x04: "multimedia",
    0x05: "memory",
    0x06: "bridge",
    0x07: "communication",
    0x08: "system peripheral",
    0x09: "input",
    0x0A: "docking station",
    0x0B: "processor",
    0x0C: "serial bus",
    0x0D: "wireless",
    0x0E: "intelligent controller",
    0x0F: "satellite communication",
    0x10: "encryption",
    0x11: "signal processing",
    0x12: "processing accelerator",
    0x13: "instrumentation",
    0xFF: "unassigned",
}
_SUBCLASS_NAMES: dict[int, str] = {
    0x0100: "SCSI",
    0x0101: "IDE",
    0x0105: "ATA",
    0x0106: "SATA",
    0x0107: "SAS",
    0x0108: "NVMe",
    0x0200: "Ethernet",
    0x0300: "VGA",
    0x0403: "audio",
    0x0600: "host bridge",
    0x0601: "ISA bridge",
    0x0604: "PCI bridge",
    0x0607: "CardBus bridge",
    0x0700: "serial",
    0x0780: "other",
    0x0C03: "USB",
    0x0C05: "SMBus",
    0x00FF: "",
}


def class_name(class_code: int) -> str | None:
    """0x010802 -> "storage (NVMe)"; None for an unknown base class."""
    base = _CLASS_NAMES.get((class_code >> 16) & 0xFF)
    if base is None:
        return None
    sub = _SUBCLASS_NAMES.get((class_code >> 8) & 0xFFFF)
    return f"{base} ({sub})" if sub else base


def is_bridge_class(class_code: int) -> bool:
    return (class_code >> 8) & 0xFFFF in (0x0604, 0x0607)


class PciIds(NamedTuple):
    """Names from pci.ids: vendors by id, devices by (vendor, device)."""

    vendors: Mapping[int, str] = {}
    devices: Mapping[tuple[int, int], str] = {}


def _parse_vendor_block(lines: Iterator[str], vendor: int, devices: dict[tuple[int, int], str]) -> None:
    """Device lines ("\\tdddd  name") after a vendor line, up to the next vendor or class line."""
    for line in lines:
        if not line or line.startswith("#"):
            continue
        if not line.startswith("\t"):
            return
        if line.startswith("\t\t"):
            continue  # subsystem lines
        head, sep, name = line[1:].partition("  ")
        if sep and len(head) == 4:
            try:
                devices[(vendor, int(head, 16))] = name.strip()
            except ValueError:
                continue


def _vendor_line(line: str) -> tuple[int, str] | None:
    head, sep, name = line.partition("  ")
    if not sep or len(head) != 4:
        return None
    try:
        return int(head, 16), name.strip()
    except ValueError:
        return None  # "C 01  Mass storage controller" and other non-vendor lines


def parse_pci_ids(text: str, vendors: Collection[int] | None = None) -> PciIds:
    """Vendor and device names from pci.ids text.

    With `vendors`, only those vendors' blocks are parsed, found with str.find:
    the 1.3 MB file is then scanned in well under a millisecond per vendor.
    """
    found_vendors: dict[int, str] = {}
    devices: dict[tuple[int, int], str] = {}
    if vendors is not None:
        body = "\n" + text
        for vid in set(vendors):
            at = body.find(f"\n{vid:04x}  ")
            if at < 0:
                continue
            end = body.find("\n", at + 1)
            end = len(body) if end < 0 else end
            parsed = _vendor_line(body[at + 1 : end])
            if parsed is None:
                continue
            found_vendors[vid] = parsed[1]
            stop = _next_top_level(body, end)
            _parse_vendor_block(iter(body[end + 1 : stop].split("\n")), vid, devices)
        return PciIds(found_vendors, devices)
    lines = iter(text.split("\n"))
    current: int | None = None
    for line in lines:
        if not line or line.startswith("#"):
            continue
        if line.startswith("\t"):
            if current is not None and not line.startswith("\t\t"):
                _parse_vendor_block(iter([line]), current, devices)
            continue
        parsed = _vendor_line(line)
        current = parsed[0] if parsed else None
        if parsed:
            found_vendors[parsed[0]] = parsed[1]
    return PciIds(found_vendors, devices)


def _next_top_level(body: str, start: int) -> int:
    """Offset of the next line at column 0 (not a tab, not a comment) after start, or len(body)."""
    pos = start
    while True:
        nl = body.find("\n", pos + 1)
        if nl < 0:
            return len(body)
        ch = body[nl + 1 : nl + 2]
        if ch and ch not in "\t#":
            return nl
        pos = nl


def default_pci_ids() -> Path | None:
    """Where the live system keeps pci.ids (Debian: pciutils/pci.ids package), if anywhere."""
    return next((p for p in PCI_IDS_LOCATIONS if p.is_file()), None)


def parse_hex_id(text: str) -> int:
    """sysfs vendor/device/class ("0x1af4\\n") -> int; ValueError otherwise."""
    value = text.strip()
    if not value.lower().startswith("0x") or len(value) < 3:
        raise ValueError(f"not a hex id: {text!r}")
    return int(value, 16)


def parse_pci_path(sysfs_rel: str) -> PciPath:
    """'devices/pci0000:00/0000:00:03.0/0000:01:05.0' -> 0000:00/03.0/05.0; ValueError otherwise.

    The root is the last `pciDDDD:BB` component; every component after it must be a BDF.
    """
    parts = [p for p in sysfs_rel.split("/") if p]
    roots_at = [i for i, p in enumerate(parts) if _ROOT_BUS.match(p)]
    if not roots_at:
        raise ValueError(f"no pciDDDD:BB root bus in {sysfs_rel!r}")
    i = roots_at[-1]
    m = _ROOT_BUS.match(parts[i])
    assert m is not None
    hops: list[tuple[int, int]] = []
    for comp in parts[i + 1 :]:
        if not BDF_NAME.match(comp):
            raise ValueError(f"{comp!r} in {sysfs_rel!r} is not a PCI function")
        addr = PciAddress.parse(comp)
        hops.append((addr.slot, addr.function))
    if not hops:
        raise ValueError(f"{sysfs_rel!r} names a root bus, not a function")
    return PciPath(int(m.group(1), 16), int(m.group(2), 16), tuple(hops))


def parse_slot_address(text: str) -> str | None:
    """A slot's `address` ("0000:00:03") as a PciAddress.slot_key; None for a bus-wide placeholder.

    drivers/pci/slot.c prints DDDD:BB for placeholder slots (number -1) and
    DDDD:BB:SS otherwise. pciehp registers its slot on the bus behind the port
    for all devices (PCI_SLOT_ALL_DEVICES in newer kernels) yet still prints
    device 00, so its one function-0 device matches. Known gap: ARI functions
    at device numbers above 0 on such a bus get no slot (reported as no hotplug
    driver, the cautious side).
    """
    m = _SLOT_ADDRESS.match(text.strip())
    if not m:
        return None
    d, b, s = m.groups()
    return f"{int(d, 16):04x}:{int(b, 16):02x}:{int(s, 16):02x}"


def _hotplug_slots(roots: Roots) -> Collected[dict[str, str]]:
    """slot_key -> slot directory name, for slots a hotplug driver controls."""
    base = f"{roots.sys}/bus/pci/slots"
    slots: dict[str, str] = {}
    problems: list[ScanProblem] = []
    try:
        names = listdir(base)
    except ReadError as exc:
        return Collected({}, [ScanProblem(base, str(exc))])
    for name in names:
        try:
            text = read_text_or(f"{base}/{name}/address")
        except ReadError as exc:
            # Which functions that slot drives is unknown: any of them may lack (or have) a driver.
            problems.append(ScanProblem(f"{base}/{name}", str(exc)))
            continue
        if text is None:
            continue
        key = parse_slot_address(text)
        if key is None:
            log.debug("slot %s: address %r names no single slot", name, text)
            continue
        if not any(_lexists(f"{base}/{name}/{f}") for f in _HOTPLUG_FILES):
            log.debug("slot %s (%s) has no hotplug controls: informational only", name, key)
            continue
        slots.setdefault(key, name)
    return Collected(slots, problems)


class _Below:
    """What the walk finds below one function."""

    __slots__ = ("bound_at", "disks", "found_at", "nets", "nodes", "nodes_at", "problems", "subdrivers", "vanished")

    def __init__(self) -> None:
        self.disks: list[str] = []
        self.nets: list[str] = []
        self.nodes: list[DeviceNode] = []
        self.subdrivers: list[str] = []
        # Where each was found, relative to the function's directory, to tell which bound device holds what.
        self.found_at: list[tuple[str, str]] = []  # (rel path, disk or interface name)
        self.nodes_at: list[tuple[str, str]] = []  # (rel path, node path)
        self.bound_at: list[tuple[str, str]] = []  # (rel path, driver)
        self.problems: list[ScanProblem] = []
        # Something below vanished mid-walk: what was found may be missing a disk or node.
        self.vanished: list[str] = []


def _node(d: str, rel: tuple[str, ...], names: set[str], bdf: str, below: _Below) -> None:
    """A directory with a `dev` file: a device node (and maybe a whole disk)."""
    try:
        devno = parse_devno(read_text(f"{d}/dev"))
        uevent = parse_uevent(read_text(f"{d}/uevent")) if "uevent" in names else {}
    except Vanished:
        log.debug("%s vanished during the scan", d)
        below.vanished.append(d)
        return
    except ReadError as exc:
        below.problems.append(ScanProblem(d, str(exc), (bdf,)))
        return
    except ValueError as exc:
        below.problems.append(ScanProblem(f"{d}/dev", f"malformed: {exc}", (bdf,)))
        return
    subsystem = readlink_or(f"{d}/subsystem", when=ReadError) if "subsystem" in names else None
    devtype = uevent.get("DEVTYPE")
    is_block = (
        (subsystem is not None and os.path.basename(subsystem) == "block")
        or (len(rel) >= 2 and rel[-2] == "block")
        or devtype in ("disk", "partition")
    )
    kind = "block" if is_block else "char"
    node = DeviceNode(path="/dev/" + uevent.get("DEVNAME", rel[-1]), devno=devno, kind=kind)
    below.nodes.append(node)
    below.nodes_at.append(("/".join(rel), node.path))
    if is_block and (devtype == "disk" or (devtype is None and "partition" not in names)):
        below.disks.append(rel[-1])
        below.found_at.append(("/".join(rel), rel[-1]))


def _lexists(path: str) -> bool:
    try:
        os_lstat(path)
    except OSError:
        return False
    return True


def _walk(fdir: str, bdf: str) -> _Below:
    below = _Below()
    stack: list[tuple[str, tuple[str, ...]]] = [(fdir, ())]
    while stack:
        d, rel = stack.pop()
        try:
            entries = os_scandir(d)
        except FileNotFoundError:
            below.vanished.append(d)  # vanished mid-walk
            continue
        except OSError as exc:
            below.problems.append(ScanProblem(d, f"cannot list: {os_reason(exc)}", (bdf,)))
            continue
        names = {e.name for e in entries}
        if rel:
            if "driver" in names:
                drv = readlink_or(f"{d}/driver", when=ReadError)
                if drv is not None:
                    below.subdrivers.append(os.path.basename(drv))
                    below.bound_at.append(("/".join(rel), os.path.basename(drv)))
            if "dev" in names:
                _node(d, rel, names, bdf, below)
            if len(rel) >= 2 and rel[-2] == "net":
                below.nets.append(rel[-1])
                below.found_at.append(("/".join(rel), rel[-1]))
                continue  # queues and statistics of an interface hold no devices
        if len(rel) >= _MAX_DEPTH:
            continue
        subdirs = []
        for e in entries:
            try:
                if not e.is_dir(follow_symlinks=False):  # d_type from getdents: no extra syscall
                    continue
            except OSError:
                continue
            if e.name in _NOISE or BDF_NAME.match(e.name):
                continue  # child PCI functions are functions of their own
            subdirs.append(e.name)
        stack.extend((f"{d}/{sub}", (*rel, sub)) for sub in sorted(subdirs, reverse=True))
    return below


def bound_devices(
    bound_at: list[tuple[str, str]], found_at: list[tuple[str, str]], nodes_at: list[tuple[str, str]]
) -> tuple[BoundDevice, ...]:
    """The devices below a function with a driver bound, each with what was found below it.

    Pure: paths are relative to the function's directory ("virtio1", "usb1/1-1/1-1:1.0").
    """

    def below(path: str, at: str) -> bool:
        return at.startswith(path + "/")

    return tuple(
        BoundDevice(
            path=path,
            driver=driver,
            holds=tuple(dict.fromkeys(name for at, name in found_at if below(path, at))),
            nodes=tuple(dict.fromkeys(node for at, node in nodes_at if below(path, at) or at == path)),
            leaf=not any(below(path, other) for other, _ in bound_at),
        )
        for path, driver in bound_at
    )


def _read_ids(fdir: str) -> tuple[int, int, int]:
    return (
        parse_hex_id(read_text(f"{fdir}/vendor")),
        parse_hex_id(read_text(f"{fdir}/device")),
        parse_hex_id(read_text(f"{fdir}/class")),
    )


def _function_dir(sys_root: str, base: str, name: str) -> tuple[str, str]:
    """(directory inside roots.sys, sysfs-relative path "devices/...") from the link, as text."""
    link = f"{base}/{name}"
    try:
        target = os_readlink(link)
    except OSError as exc:
        raise as_read_error(link, exc) from exc
    if target.startswith("/"):
        # An absolute link in a captured tree still names the live /sys.
        if not target.startswith("/sys/"):
            raise ValueError(f"link {target!r} leaves /sys")
        joined = os.path.normpath(sys_root + target[len("/sys") :])
    else:
        joined = os.path.normpath(f"{base}/{target}")
    if not joined.startswith(sys_root + "/"):
        raise ValueError(f"link {target!r} leaves the sysfs root")
    return joined, joined[len(sys_root) + 1 :]


def collect_pci(roots: Roots, pci_ids: Path | None = None) -> Collected[list[PciFunction]]:
    sys_root = os.path.normpath(str(roots.sys))
    base = f"{sys_root}/bus/pci/devices"
    problems: list[ScanProblem] = []
    try:
        names = listdir(base)
    except ReadError as exc:
        return Collected([], [ScanProblem(base, str(exc))])
    slots, slot_problems = _hotplug_slots(roots)
    problems.extend(slot_problems)

    functions: list[PciFunction] = []
    for name in names:
        try:
            address = PciAddress.parse(name)
        except ValueError as exc:
            problems.append(ScanProblem(f"{base}/{name}", str(exc), (name,)))
            continue
        bdf = str(address)
        try:
            fdir, rel = _function_dir(sys_root, base, name)
            path = parse_pci_path(rel)
        except Vanished:
            problems.append(ScanProblem(f"{base}/{name}", "vanished during the scan", (bdf,)))
            continue
        except (ReadError, ValueError) as exc:
            problems.append(ScanProblem(f"{base}/{name}", str(exc), (bdf,)))
            continue
        if path.hops[-1] != (address.slot, address.function):
            problems.append(ScanProblem(f"{base}/{name}", f"sysfs path {rel} does not end in {name}", (bdf,)))
            continue
        try:
            vendor, device, klass = _read_ids(fdir)
        except Vanished:
            problems.append(ScanProblem(fdir, "vanished during the scan", (bdf,)))
            continue
        except (ReadError, ValueError) as exc:
            # Keep the function so the report shows it, UNKNOWN through the problem.
            problems.append(ScanProblem(fdir, f"vendor/device/class unreadable: {exc}", (bdf,)))
            vendor, device, klass = 0xFFFF, 0xFFFF, 0
        drv = readlink_or(f"{fdir}/driver", when=ReadError)
        below = _walk(fdir, bdf)
        problems.extend(below.problems)
        if below.vanished:
            if not os.path.exists(f"{fdir}/vendor"):
                # The function itself left mid-scan (hot-removed): it is not there to judge.
                problems.append(ScanProblem(fdir, "vanished during the scan", (bdf,)))
                continue
            # Still there, but a disk or node below it went while being read: what it
            # holds is not known, so it must not look idle.
            problems.append(
                ScanProblem(below.vanished[0], "vanished during the scan; what the function holds is not known", (bdf,))
            )
        functions.append(
            PciFunction(
                address=address,
                path=path,
                vendor_id=vendor,
                device_id=device,
                class_code=klass,
                driver=os.path.basename(drv) if drv else None,
                is_bridge=is_bridge_class(klass),
                hotplug_slot=slots.get(address.slot_key),
                block_devices=tuple(below.disks),
                net_interfaces=tuple(below.nets),
                device_nodes=tuple(below.nodes),
                class_name=class_name(klass),
                sysfs_path="/sys/" + rel,
                subdrivers=tuple(dict.fromkeys(below.subdrivers)),
                bound=bound_devices(below.bound_at, below.found_at, below.nodes_at),
            )
        )
    if pci_ids is not None and functions:
        functions = _with_names(functions, pci_ids)
    functions.sort(key=lambda f: f.address)
    return Collected(functions, problems)


def _with_names(functions: list[PciFunction], pci_ids: Path) -> list[PciFunction]:
    try:
        text = read_system_file(pci_ids)
    except ReadError as exc:
        # Names are decoration: log it, leave readiness alone.
        log.warning("no PCI vendor/device names: %s", exc)
        return functions
    ids = parse_pci_ids(text, {f.vendor_id for f in functions})
    return [
        f._replace(vendor_name=ids.vendors.get(f.vendor_id), device_name=ids.devices.get((f.vendor_id, f.device_id)))
        for f in functions
    ]
