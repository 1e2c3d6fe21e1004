"""The guest of test_real_kernel_controllers.py: disks behind every kind of controller (issue 15).

One q35 slot of eight pcie-root-ports (hotpluggable, like libvirt's layout), one controller behind each:
a plain NVMe controller, two NVMe controllers of one NVMe subsystem sharing a namespace (native NVMe
multipath: the kernel files the head under /sys/devices/virtual/nvme-subsystem), a virtio-scsi HBA with
three LUNs, an AHCI controller with one SATA disk, an empty AHCI controller, an xHCI controller with a
USB disk and a USB NIC, and an e1000e NIC. Disks are told apart by serial.
"""

from __future__ import annotations

from tests.vm import DataDisk, Device, root_ports

__all__ = ["CONTROLLERS", "DEVICES", "LUNS", "PORTS"]

# qid of each controller -> its root port
PORTS = {
    "nvplain": "rpz0", "nvmpa": "rpz1", "nvmpb": "rpz2", "vscsi": "rpz3",
    "ahci1": "rpz4", "ahci0": "rpz5", "xhci": "rpz6", "nic": "rpz7",
}  # fmt: skip
CONTROLLERS = tuple(PORTS)
LUNS = ("lun0", "lun1", "lun2")


def _drive(name: str) -> tuple[tuple[str, ...], DataDisk]:
    disk = DataDisk(f"{name}.qcow2", "64M")
    return ("-drive", f"file={{workdir}}/{disk.name},if=none,id=drv-{name},format=qcow2,cache=unsafe"), disk


def _devices() -> Device:
    args: list[str] = []
    disks: list[DataDisk] = []

    def drive(name: str) -> None:
        a, d = _drive(name)
        args.extend(a)
        disks.append(d)

    drive("nvplain")
    args += ["-device", f"nvme,id=nvplain,serial=nvplain,drive=drv-nvplain,bus={PORTS['nvplain']}"]
    # An NVMe subsystem with two controllers; the namespace is shared (nvme-ns shared=on, QEMU 7.2's
    # default), so it is attached to both controllers and the guest sees one head with two paths.
    drive("nvmp")
    args += [
        "-device", "nvme-subsys,id=nvsubsys,nqn=unplugd-mp",
        "-device", f"nvme,id=nvmpa,serial=nvmp,subsys=nvsubsys,bus={PORTS['nvmpa']}",
        "-device", f"nvme,id=nvmpb,serial=nvmp,subsys=nvsubsys,bus={PORTS['nvmpb']}",
        "-device", "nvme-ns,drive=drv-nvmp,bus=nvmpa,nsid=1",
    ]  # fmt: skip
    args += ["-device", f"virtio-scsi-pci,id=vscsi,bus={PORTS['vscsi']}"]
    for n, lun in enumerate(LUNS):
        drive(lun)
        args += ["-device", f"scsi-hd,bus=vscsi.0,channel=0,scsi-id=0,lun={n},drive=drv-{lun},serial={lun}"]
    drive("sata0")
    args += ["-device", f"ich9-ahci,id=ahci1,bus={PORTS['ahci1']}",
             "-device", "ide-hd,bus=ahci1.0,drive=drv-sata0,serial=sata0"]  # fmt: skip
    args += ["-device", f"ich9-ahci,id=ahci0,bus={PORTS['ahci0']}"]
    drive("usb0")
    args += [
        "-device", f"qemu-xhci,id=xhci,bus={PORTS['xhci']}",
        "-device", "usb-storage,bus=xhci.0,drive=drv-usb0,serial=usb0",
        "-netdev", "user,id=net-usbnic,restrict=on,ipv6=off",
        "-device", "usb-net,bus=xhci.0,netdev=net-usbnic,mac=52:54:00:5b:00:02",
        "-netdev", "user,id=net-nic,restrict=on,ipv6=off",
        "-device", f"e1000e,id=nic,netdev=net-nic,mac=52:54:00:5b:00:01,bus={PORTS['nic']}",
    ]  # fmt: skip
    return Device(tuple(args), tuple(disks), CONTROLLERS)


DEVICES = [root_ports(8, prefix="rpz", first_chassis=60, slot_addr=0x10), _devices()]
