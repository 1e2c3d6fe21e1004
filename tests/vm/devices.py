"""QEMU command-line fragments for the devices VM tests put under test.

Each helper returns a `Device`: the QEMU arguments, the backing files to create in the VM's work
directory, and the QEMU ids it adds (what `device_del` takes). Devices combine with `+`. Arguments
may contain `{workdir}`, replaced by the VM's work directory when it starts.

On q35 a device plugged straight into `pcie.0` is a root-complex integrated endpoint, which PCIe
cannot hot-unplug: put what a test wants to unplug behind a `pcie_root_port`. On `pc` every slot of
`pci.0` is hotpluggable (ACPI, acpiphp in the guest).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "PCIE_NATIVE_HOTPLUG",
    "DataDisk",
    "Device",
    "disk_on_root_port",
    "multifunction_slot",
    "net_on_root_port",
    "pci_bridge",
    "pcie_pci_bridge",
    "pcie_root_port",
    "root_ports",
    "virtio_disk",
    "virtio_net",
]

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")

# q35 hot-unplugs behind root ports through ACPI (acpiphp) by default since QEMU 6.1. These extra_args
# switch it to native PCIe hotplug (pciehp): unplug then takes ~5 s (the attention button's blink), and
# a second device_del meanwhile fails with "already in the process of unplug".
PCIE_NATIVE_HOTPLUG = ("-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off")


@dataclass(frozen=True)
class DataDisk:
    """A qcow2 backing file created empty in the VM's work directory before QEMU starts."""

    name: str
    size: str = "64M"


@dataclass(frozen=True)
class Device:
    args: tuple[str, ...]
    disks: tuple[DataDisk, ...] = ()
    ids: tuple[str, ...] = ()

    def __add__(self, other: Device) -> Device:
        return Device(self.args + other.args, self.disks + other.disks, self.ids + other.ids)

    @staticmethod
    def join(devices: Iterable[Device]) -> Device:
        total = Device(())
        for dev in devices:
            total = total + dev
        return total


def _check_id(qid: str) -> str:
    if not _ID.match(qid):
        raise ValueError(f"not a valid QEMU id: {qid!r}")
    return qid


def _placement(bus: str | None, addr: str | None, multifunction: bool) -> str:
    parts = []
    if bus is not None:
        parts.append(f"bus={bus}")
    if addr is not None:
        parts.append(f"addr={addr}")
    if multifunction:
        parts.append("multifunction=on")
    return "".join("," + p for p in parts)


def virtio_disk(
    qid: str,
    *,
    bus: str | None = None,
    addr: str | None = None,
    size: str = "64M",
    serial: str | None = None,
    multifunction: bool = False,
) -> Device:
    """A virtio-blk disk on an empty qcow2 file; in the guest it is /dev/disk/by-id/virtio-<serial>.

    serial defaults to the id (virtio-blk serials are at most 20 bytes).
    """
    _check_id(qid)
    serial = serial if serial is not None else qid
    if len(serial) > 20:
        raise ValueError(f"virtio-blk serial longer than 20 bytes: {serial!r}")
    disk = DataDisk(f"{qid}.qcow2", size)
    return Device(
        (
            "-drive",
            f"file={{workdir}}/{disk.name},if=none,id=drv-{qid},format=qcow2,cache=unsafe",
            "-device",
            f"virtio-blk-pci,drive=drv-{qid},id={qid},serial={serial}" + _placement(bus, addr, multifunction),
        ),
        (disk,),
        (qid,),
    )


def virtio_net(
    qid: str,
    *,
    bus: str | None = None,
    addr: str | None = None,
    mac: str | None = None,
    multifunction: bool = False,
) -> Device:
    """A virtio-net NIC on QEMU's user network with restrict=on: it never reaches outside."""
    _check_id(qid)
    mac_opt = f",mac={mac}" if mac else ""
    return Device(
        (
            "-netdev",
            f"user,id=net-{qid},restrict=on",
            "-device",
            f"virtio-net-pci,netdev=net-{qid},id={qid}{mac_opt}" + _placement(bus, addr, multifunction),
        ),
        (),
        (qid,),
    )


def pcie_root_port(
    qid: str,
    *,
    chassis: int,
    slot: int | None = None,
    bus: str = "pcie.0",
    addr: str | None = None,
    hotplug: bool = True,
    multifunction: bool = False,
) -> Device:
    """A q35 pcie-root-port; hotplug=False is libvirt's <target hotplug='off'/>."""
    _check_id(qid)
    slot_opt = f",slot={slot}" if slot is not None else ""
    hp = "" if hotplug else ",hotplug=off"
    return Device(
        ("-device", f"pcie-root-port,id={qid},chassis={chassis}{slot_opt}{hp}" + _placement(bus, addr, multifunction)),
        (),
        (qid,),
    )


def root_ports(
    count: int,
    *,
    prefix: str = "rp",
    first_chassis: int = 1,
    slot_addr: int = 0x10,
    hotplug: bool | Iterable[bool] = True,
) -> Device:
    """count root ports as functions of one pcie.0 slot, the way libvirt lays them out.

    Ids are <prefix>0, <prefix>1, ...; hotplug may be one flag for all or one per port.
    """
    if not 1 <= count <= 8:
        raise ValueError("a slot has 1 to 8 functions")
    flags = [hotplug] * count if isinstance(hotplug, bool) else list(hotplug)
    if len(flags) != count:
        raise ValueError("need one hotplug flag per port")
    return Device.join(
        pcie_root_port(
            f"{prefix}{i}",
            chassis=first_chassis + i,
            addr=f"{slot_addr:#x}.{i}",
            hotplug=flags[i],
            multifunction=(i == 0 and count > 1),
        )
        for i in range(count)
    )


def pci_bridge(
    qid: str, *, chassis_nr: int, bus: str | None = None, addr: str | None = None, shpc: bool | None = None
) -> Device:
    """A conventional pci-bridge (on `pc`: under pci.0; on q35 put it under a pcie_pci_bridge)."""
    _check_id(qid)
    shpc_opt = "" if shpc is None else f",shpc={'on' if shpc else 'off'}"
    return Device(
        ("-device", f"pci-bridge,id={qid},chassis_nr={chassis_nr}{shpc_opt}" + _placement(bus, addr, False)),
        (),
        (qid,),
    )


def pcie_pci_bridge(qid: str, *, bus: str, addr: str | None = None) -> Device:
    """A PCIe-to-PCI bridge (q35), itself plugged into a root port."""
    _check_id(qid)
    return Device(("-device", f"pcie-pci-bridge,id={qid}" + _placement(bus, addr, False)), (), (qid,))


def multifunction_slot(
    disk_id: str, net_id: str, *, bus: str | None = None, slot: int = 6, disk_size: str = "64M"
) -> Device:
    """A virtio-blk disk at slot.0 (multifunction=on) and a virtio-net NIC at slot.1 of one slot."""
    return virtio_disk(disk_id, bus=bus, addr=f"{slot:#x}.0", size=disk_size, multifunction=True) + virtio_net(
        net_id, bus=bus, addr=f"{slot:#x}.1"
    )


def disk_on_root_port(qid: str, *, chassis: int, hotplug: bool = True, size: str = "64M") -> Device:
    """A virtio-blk disk alone behind its own root port `rp-<qid>` (q35): the usual hotpluggable disk."""
    port = f"rp-{qid}"
    return pcie_root_port(port, chassis=chassis, hotplug=hotplug) + virtio_disk(qid, bus=port, size=size)


def net_on_root_port(qid: str, *, chassis: int, hotplug: bool = True, mac: str | None = None) -> Device:
    """A virtio-net NIC alone behind its own root port `rp-<qid>` (q35)."""
    port = f"rp-{qid}"
    return pcie_root_port(port, chassis=chassis, hotplug=hotplug) + virtio_net(qid, bus=port, mac=mac)
