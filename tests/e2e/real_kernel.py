"""The real-kernel guests of test_real_kernel_q35.py and test_real_kernel_pc.py: their devices, and the
guest script that builds every scenario (real_kernel_scenarios.sh).

q35: four multifunction slots of pcie-root-ports (libvirt's layout), one device behind each port, so every
scenario is its own hotpluggable slot; one port has hotplug=off; one stays empty for a hot-add. Devices
are named by their QEMU id, which is also the virtio-blk serial; NICs are told apart by MAC.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

from tests.vm import MUTATIONS_CONFIG, DataDisk, Device, GuestVM, root_ports, virtio_disk

__all__ = [
    "CONFIG",
    "FIGURES",
    "HOT_ADD",
    "MACS",
    "NO_HOTPLUG_PORT",
    "Q35_DEVICES",
    "SCENARIOS_SH",
    "port_of",
    "unplugctl",
    "unplugctl_process",
]

# Timings of the VM runs, printed at the end of the session (tests/conftest.py): never asserted.
FIGURES: list[str] = []

SCENARIOS_SH = Path(__file__).with_name("real_kernel_scenarios.sh")

# PrepareUnplug needs mutations (the virtio-serial bridge, the host's channel, is on by default). The
# other e2e tests' text: one install boot serves them all.
CONFIG = MUTATIONS_CONFIG

# qid -> root port, in the order of the ports (rpa0..rpd7).
_LAYOUT = (
    # rpa: storage
    "dpart", "dns", "dswap", "dswapf", "dlvm1", "dlvm2", "dlvmidle", "dluks",
    # rpb: storage
    "dplain", "dlinear", "dmd1", "dmd2", "dloop", "draw", "dlazy", "dexcl",
    # rpc: a char device, NICs
    "vport", "nup", "nv4", "nv6", "nbond", "nbr", "nvlan", "nmv",
    # rpd: NICs, the host half's disks, the empty port for the hot-add, the port without hotplug
    "nconn", "npeer", "ndown", "didle", "", "dnohp", "dwait", "dprep",
)  # fmt: skip
NO_HOTPLUG_PORT = "dnohp"
HOT_ADD = "dhot"  # device_add'ed by the test on the empty port

MACS = {
    "nup": "52:54:00:5a:00:01",
    "nv4": "52:54:00:5a:00:02",
    "nv6": "52:54:00:5a:00:03",
    "nbond": "52:54:00:5a:00:04",
    "nbr": "52:54:00:5a:00:05",
    "nvlan": "52:54:00:5a:00:06",
    "nmv": "52:54:00:5a:00:07",
    "nconn": "52:54:00:5a:00:0a",
    "npeer": "52:54:00:5a:00:0b",
    "ndown": "52:54:00:5a:00:0c",
}
# The two NICs of the TCP connection share a QEMU hub (no host network at all).
_HUB = ("nconn", "npeer")


def port_of(qid: str) -> str:
    i = _LAYOUT.index(qid if qid != HOT_ADD else "")
    return f"rp{'abcd'[i // 8]}{i % 8}"


def _device(qid: str) -> Device:
    bus = port_of(qid)
    if qid == "vport":
        return Device(
            (
                "-device", f"virtio-serial-pci,id={qid},bus={bus}",
                "-chardev", "null,id=chr-rk",
                "-device", "virtserialport,bus=vport.0,nr=1,chardev=chr-rk,name=org.unplugd.rk.0",
            ),
            (),
            (qid,),
        )  # fmt: skip
    if qid in _HUB:
        return Device(
            (
                "-netdev", f"hubport,id=net-{qid},hubid=7",
                "-device", f"virtio-net-pci,netdev=net-{qid},id={qid},mac={MACS[qid]},bus={bus}",
            ),
            (),
            (qid,),
        )  # fmt: skip
    if qid in MACS:
        # QEMU's user network sends IPv6 router advertisements: each NIC would get an address and a
        # default route of its own. ipv6=off keeps every scenario to what the script sets up.
        return Device(
            (
                "-netdev", f"user,id=net-{qid},restrict=on,ipv6=off",
                "-device", f"virtio-net-pci,netdev=net-{qid},id={qid},mac={MACS[qid]},bus={bus}",
            ),
            (),
            (qid,),
        )  # fmt: skip
    return virtio_disk(qid, bus=bus)


def _q35_devices() -> list[Device]:
    devices = []
    for n, prefix in enumerate("abcd"):
        ids = _LAYOUT[n * 8 : n * 8 + 8]
        devices.append(
            root_ports(
                8, prefix=f"rp{prefix}", first_chassis=1 + n * 8, slot_addr=0x10 + n,
                hotplug=[qid != NO_HOTPLUG_PORT for qid in ids],
            )
        )  # fmt: skip
    devices += [_device(qid) for qid in _LAYOUT if qid]
    hot = DataDisk(f"{HOT_ADD}.qcow2")
    devices.append(
        Device(("-drive", f"file={{workdir}}/{hot.name},if=none,id=drv-{HOT_ADD},format=qcow2,cache=unsafe"), (hot,))
    )
    return devices


Q35_DEVICES = _q35_devices()


def unplugctl(vm: GuestVM, *args: str) -> tuple[int, str, str]:
    """unplugctl in this process (no interpreter start per call), with the VM's QMP and agent channel."""
    from unplugd.host import cli as host_cli

    argv = [args[0], "--qmp", str(vm.qmp_socket), "--agent", f"serial:{vm.agent_socket}",
            "--agent-timeout", "90", *args[1:]]  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = host_cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def unplugctl_process(vm: GuestVM, *args: str, timeout: float) -> tuple[int, str, str]:
    """unplugctl as a user runs it (its own interpreter), with the VM's QMP and agent channel."""
    from tests.conftest import REPO

    cmd = [sys.executable, "-m", "unplugd.host.cli", args[0], "--qmp", str(vm.qmp_socket),
           "--agent", f"serial:{vm.agent_socket}", "--agent-timeout", "20", *args[1:]]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return p.returncode, p.stdout, p.stderr
