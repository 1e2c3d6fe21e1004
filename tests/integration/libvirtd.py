"""A running libvirtd for the libvirt backend's tests, and transient domains that always go away.

libvirtd is configured and started by packaging/dev/libvirtd-setup.sh (idempotent;
QEMU as root under TCG, no security driver, no cgroups). Domains are created
transient (virDomainCreateXML): destroying them removes every trace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "packaging" / "dev" / "libvirtd-setup.sh"
SETUP_LOCK = "/run/lock/unplugd-libvirtd-setup.lock"  # the one SETUP takes
URI = "qemu:///system"


def ensure_libvirtd() -> None:
    """Skip unless root with libvirtd installed; start it if it is not running."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if shutil.which("libvirtd") is None or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("libvirtd or QEMU not installed (packaging/dev/system-deps.sh)")
    subprocess.run(["sh", str(SETUP)], check=True, timeout=60)


def _disk(dirpath: Path, target: str, address: str, extra: str = "") -> str:
    img = dirpath / f"{target}.img"
    img.write_bytes(b"")
    os.truncate(img, 1 << 20)
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{img}'/>"
        f"<target dev='{target}' bus='virtio'/><address type='pci' domain='0x0000' {address}{extra}/></disk>"
    )


def _nic(address: str) -> str:
    # user networking with no uplink: the only kind of NIC this machine allows
    return f"<interface type='user'><model type='virtio'/><address type='pci' domain='0x0000' {address}/></interface>"


def _ctl(index: int, model: str, address: str, inner: str = "") -> str:
    return (
        f"<controller type='pci' index='{index}' model='{model}'>{inner}"
        f"<address type='pci' domain='0x0000' {address}/></controller>"
    )


def q35_xml(name: str, d: Path) -> str:
    """Root ports in one multifunction slot (one with hotplug='off'), a switch, a
    dmi-to-pci + pci-bridge, an expander bus with two root ports (the second,
    index 11, stays empty for hot-add: no USB, virtio-serial pinned to 00:1d),
    a multifunction disk+NIC slot, the agent channel."""
    return f"""<domain type='qemu'>
  <name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os><features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' index='0' model='pcie-root'/>
    {_ctl(1, "pcie-root-port", "bus='0x00' slot='0x02' function='0x0' multifunction='on'")}
    {_ctl(2, "pcie-root-port", "bus='0x00' slot='0x02' function='0x1'")}
    {_ctl(3, "pcie-root-port", "bus='0x00' slot='0x02' function='0x2'", "<target hotplug='off'/>")}
    {_ctl(4, "pcie-root-port", "bus='0x00' slot='0x02' function='0x3'")}
    {_ctl(5, "pcie-switch-upstream-port", "bus='0x04' slot='0x00' function='0x0'")}
    {_ctl(6, "pcie-switch-downstream-port", "bus='0x05' slot='0x00' function='0x0'")}
    {_ctl(7, "dmi-to-pci-bridge", "bus='0x00' slot='0x1e' function='0x0'")}
    {_ctl(8, "pci-bridge", "bus='0x07' slot='0x01' function='0x0'")}
    {_ctl(9, "pcie-expander-bus", "bus='0x00' slot='0x09' function='0x0'", "<target busNr='128'/>")}
    {_ctl(10, "pcie-root-port", "bus='0x09' slot='0x00' function='0x0'")}
    {_ctl(11, "pcie-root-port", "bus='0x09' slot='0x01' function='0x0'")}
    {_disk(d, "vdb", "bus='0x01' slot='0x00' function='0x0'")}
    {_disk(d, "vdc", "bus='0x02' slot='0x00' function='0x0'", " multifunction='on'")}
    {_nic("bus='0x02' slot='0x00' function='0x1'")}
    {_nic("bus='0x03' slot='0x00' function='0x0'")}
    {_disk(d, "vdd", "bus='0x06' slot='0x00' function='0x0'")}
    {_disk(d, "vde", "bus='0x08' slot='0x03' function='0x0'")}
    {_nic("bus='0x0a' slot='0x00' function='0x0'")}
    <controller type='usb' index='0' model='none'/>
    <controller type='virtio-serial' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x1d' function='0x0'/></controller>
    <channel type='unix'><source mode='bind'/><target type='virtio' name='org.unplugd.agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>"""


def pc_xml(name: str, d: Path) -> str:
    """i440fx: a pci-bridge with a disk behind it, a multifunction slot, a pci-expander-bus."""
    return f"""<domain type='qemu'>
  <name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' index='0' model='pci-root'/>
    {_ctl(1, "pci-bridge", "bus='0x00' slot='0x03' function='0x0'")}
    {_ctl(2, "pci-expander-bus", "bus='0x00' slot='0x08' function='0x0'", "<target busNr='64'/>")}
    {_disk(d, "vdb", "bus='0x01' slot='0x05' function='0x0'")}
    {_disk(d, "vdc", "bus='0x00' slot='0x06' function='0x0'", " multifunction='on'")}
    {_nic("bus='0x00' slot='0x06' function='0x1'")}
    {_disk(d, "vdd", "bus='0x00' slot='0x07' function='0x0'")}
    {_disk(d, "vde", "bus='0x02' slot='0x00' function='0x0'")}
    <channel type='unix'><source mode='bind'/><target type='virtio' name='org.unplugd.agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>"""


LAYOUTS = {"q35": q35_xml, "pc": pc_xml}


@contextlib.contextmanager
def transient_domain(layout: str) -> Iterator[tuple[str, Path]]:
    """Create a transient domain of LAYOUTS[layout]; destroyed (and so gone) on exit, even on failure."""
    import libvirt

    name = f"unplugd-test-{layout}-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    conn = libvirt.open(URI)
    dom = None
    try:
        dom = conn.createXML(LAYOUTS[layout](name, workdir), 0)
        yield name, workdir
    finally:
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
        conn.close()
        shutil.rmtree(workdir, ignore_errors=True)
