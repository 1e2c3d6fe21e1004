"""A transient libvirt domain (TCG, no guest OS) with a generated tree's PCI layout.

Bridges become pci-bridge controllers (index = the tree's bus number), disks
virtio disks on small sparse files, NICs restricted user-mode virtio NICs,
driverless functions virtio-rng devices; every <address> is the tree's.
The domain is destroyed (and so forgotten) on the way out.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

from tests.bench.gen_tree import GeneratedTree, PciFn

__all__ = ["URI", "domain_xml", "libvirt_available", "running_domain"]

URI = "qemu:///system"


def libvirt_available() -> str:
    """'' when libvirtd answers, else why not."""
    try:
        proc = subprocess.run(
            ["virsh", "-c", URI, "version"], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"virsh: {exc}"
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"libvirtd does not answer ({tail}); packaging/dev/libvirtd-setup.sh starts it"
    return ""


def _address(f: PciFn, multifunction: bool) -> str:
    mf = " multifunction='on'" if multifunction else ""
    return (
        f"<address type='pci' domain='0x0000' bus='0x{f.bus:02x}' slot='0x{f.slot:02x}' function='0x{f.function}'{mf}/>"
    )


def _disk_name(i: int) -> str:
    letters, n = "", i
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return "vd" + letters


def domain_xml(tree: GeneratedTree, name: str, workdir: Path) -> str:
    slot_sizes: dict[tuple[int, int], int] = {}
    for f in tree.pci:
        slot_sizes[(f.bus, f.slot)] = slot_sizes.get((f.bus, f.slot), 0) + 1
    devices: list[str] = [
        "<controller type='pci' index='0' model='pci-root'/>",
        "<controller type='usb' model='none'/>",
        "<memballoon model='none'/>",
    ]
    disks = 0
    for f in tree.pci:
        if f.kind == "host":
            continue
        addr = _address(f, f.function == 0 and slot_sizes[(f.bus, f.slot)] > 1)
        if f.kind == "bridge":
            devices.append(
                f"<controller type='pci' index='{f.secondary_bus}' model='pci-bridge'>"
                f"<target chassisNr='{f.secondary_bus}'/>{addr}</controller>"
            )
        elif f.kind == "blk":
            image = workdir / f"disk{disks}.img"
            with open(image, "wb") as img:
                img.truncate(1024 * 1024)
            devices.append(
                "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                f"<source file='{escape(str(image))}'/><target dev='{_disk_name(disks)}' bus='virtio'/>{addr}</disk>"
            )
            disks += 1
        elif f.kind == "net":
            devices.append(f"<interface type='user'><model type='virtio'/>{addr}</interface>")
        else:
            devices.append(f"<rng model='virtio'><backend model='random'>/dev/urandom</backend>{addr}</rng>")
    return (
        f"<domain type='qemu'><name>{escape(name)}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>"
        f"<devices>{''.join(devices)}</devices></domain>"
    )


@contextlib.contextmanager
def running_domain(tree: GeneratedTree) -> Iterator[str]:
    name = f"unplugd-bench-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="unplugd-bench-libvirt-") as tmp:
        xml = Path(tmp) / "domain.xml"
        xml.write_text(domain_xml(tree, name, Path(tmp)))
        proc = subprocess.run(
            ["virsh", "-c", URI, "create", str(xml)], capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"virsh create: {proc.stderr.strip().splitlines()[-1:]}")
        try:
            yield name
        finally:
            subprocess.run(["virsh", "-c", URI, "destroy", name], capture_output=True, timeout=60, check=False)
