"""`make demo`: boot a real guest and show unplugd and unplugctl at work.

    .venv/bin/python -m tests.vm.demo [--keep] [--skip-libvirt]

Builds (or reuses) the guest image and the agent's .debs, installs them in a
stock guest with dpkg -i and boots it again (q35, TCG) with hotpluggable disks
and NICs, a multifunction slot and a port with hotplug off, then runs the real
commands a user would and prints their real
output: the guest's own `unplugd inspect`, the host's `unplugctl status`,
check, wait-ready and unplug. A second phase boots the same guest as a
libvirt domain and runs unplugctl the way a libvirt user does: with only the
domain's name (the agent is found through the domain's <channel>), including a
multifunction slot through libvirt's monitor passthrough. Every step checks its
exit code; the demo exits non-zero when anything does not behave as shown.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from tests.conftest import REPO
from tests.vm import MUTATIONS_CONFIG, GuestVM
from tests.vm.devices import Device, disk_on_root_port, multifunction_slot, net_on_root_port, pcie_root_port
from tests.vm.libvirt_domain import LibvirtGuest, unplug_layout
from tests.vm.qga import ExecResult

LIBVIRTD_SETUP = REPO / "packaging" / "dev" / "libvirtd-setup.sh"

GUEST_CONFIG = MUTATIONS_CONFIG

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


class DemoFailed(Exception):
    pass


class _Guest(Protocol):
    def exec(self, cmd: str, timeout: float = ...) -> ExecResult: ...


def step(title: str) -> None:
    print(f"\n{BOLD}== {title}{RESET}", flush=True)


def devices() -> list[Device]:
    mf_port = pcie_root_port("rp-mf", chassis=4)
    return [
        disk_on_root_port("data", chassis=1),
        disk_on_root_port("scratch", chassis=2),
        net_on_root_port("nic1", chassis=3),
        mf_port + multifunction_slot("mfdisk", "mfnic", bus="rp-mf", slot=0),
        disk_on_root_port("pinned", chassis=5, hotplug=False),
    ]


class Demo:
    def __init__(self, vm: GuestVM) -> None:
        self.vm = vm

    def guest(self, cmd: str, *, show: bool = True, timeout: float = 120) -> str:
        """Run a command in the guest (through qemu-guest-agent) and show it."""
        return guest_command(self.vm, cmd, show=show, timeout=timeout)

    def unplugctl(self, *args: str, expect: int | Sequence[int] = 0, timeout: float = 180) -> str:
        """Run unplugctl on the host against the VM's QMP socket and agent channel."""
        shown = ["unplugctl", *args, "--qmp", "$QMP", "--agent", "serial:$AGENT"]
        argv = [*args, "--qmp", str(self.vm.qmp_socket), "--agent", f"serial:{self.vm.agent_socket}"]
        return run_unplugctl(shown, argv, expect=expect, timeout=timeout)

    def run(self) -> None:
        vm = self.vm
        step("The guest: mount a filesystem on 'data', hold 'scratch' open, bring nic1 up with an address")
        self.guest(
            "mkfs.ext4 -q -L data /dev/disk/by-id/virtio-data && mkdir -p /data && "
            "mount /dev/disk/by-id/virtio-data /data && findmnt /data"
        )
        self.guest("setsid sh -c 'exec sleep 3600 < /dev/disk/by-id/virtio-scratch' >/dev/null 2>&1 &", show=True)
        ifname = self._ifname_of("nic1")
        self.guest(
            f"ip link set {ifname} up && ip addr add 192.0.2.10/24 dev {ifname} && "
            f"ip route add default via 192.0.2.1 dev {ifname} && ip -br addr show {ifname}"
        )

        step("Inside the guest: `unplugd inspect` (the same report the host will get)")
        self.guest("unplugd inspect")

        step("On the host: every slot, its hardware and the guest's answer for each function")
        self.unplugctl("status")

        step("Is 'data' safe to unplug? No: the guest has it mounted (exit 3 = blocked by the guest)")
        self.unplugctl("check", "data", expect=3)
        self.unplugctl("unplug", "data", expect=3)

        step("'scratch' is held open by a process; 'nic1' carries the default route")
        self.unplugctl("check", "scratch", expect=3)
        self.unplugctl("check", "nic1", expect=3)

        step("The multifunction slot: unplugging the disk would take the NIC with it (exit 6)")
        self.unplugctl("check", "mfdisk", expect=6)

        step("A root port with hotplug=off: the hardware says no (exit 5)")
        self.unplugctl("check", "pinned", expect=5)

        step("wait-ready returns as soon as the guest lets go (watching, not polling)")
        waiter = threading.Thread(target=self.unplugctl, args=("wait-ready", "data", "--timeout", "120"))
        waiter.start()
        time.sleep(3)
        self.guest("umount /data")
        waiter.join()

        step("Unplug 'data' with a prepare lease: the guest claims the disk, QEMU removes it, the agent confirms")
        self.unplugctl("unplug", "data", "--prepare", "--timeout", "60")
        gone = self.guest("ls /dev/disk/by-id/ | grep -c virtio-data || true", show=False).strip()
        if gone != "0":
            raise DemoFailed("the guest still sees the 'data' disk after the unplug")
        print("guest: /dev/disk/by-id/virtio-data is gone")

        step("The whole multifunction slot, with consent: both functions go together")
        self.unplugctl("unplug", "mfdisk", "--with-companions", "--timeout", "60")

        step("What is left")
        self.unplugctl("status")
        vm_seconds = vm.boot_seconds
        print(f"\n{BOLD}demo OK{RESET} (guest booted in {vm_seconds:.0f} s under TCG)")

    def _ifname_of(self, qid: str) -> str:
        """The guest interface name of a NIC the harness created with QEMU id qid (matched by MAC)."""
        info = self.vm.qmp("qom-get", {"path": f"/machine/peripheral/{qid}", "property": "mac"})
        mac = str(info).lower()
        out = self.guest(f"grep -l {mac} /sys/class/net/*/address", show=False).strip()
        if not out:
            raise DemoFailed(f"no guest interface has MAC {mac}")
        return out.splitlines()[0].split("/")[4]


def guest_command(vm: _Guest, cmd: str, *, show: bool = True, timeout: float = 120) -> str:
    """Run a command in the guest (through qemu-guest-agent) and show it."""
    if show:
        print(f"{DIM}guest#{RESET} {cmd}", flush=True)
    r = vm.exec(cmd, timeout=timeout)
    if show and (r.stdout or r.stderr):
        print((r.stdout + r.stderr).rstrip(), flush=True)
    if r.rc != 0:
        raise DemoFailed(f"guest command failed ({r.rc}): {cmd}\n{r.stderr}")
    return r.stdout


def run_unplugctl(shown: Sequence[str], args: Sequence[str], *, expect: int | Sequence[int], timeout: float) -> str:
    """Show `shown`, run unplugctl with args (+ a generous agent timeout for TCG), print its output, check its exit."""
    print(f"{DIM}host#{RESET} {shlex.join(shown)}", flush=True)
    argv = [sys.executable, "-m", "unplugd.host.cli", *args, "--agent-timeout", "30"]
    start = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    seconds = time.monotonic() - start
    out = (p.stdout + p.stderr).rstrip()
    if out:
        print(out, flush=True)
    wanted = (expect,) if isinstance(expect, int) else tuple(expect)
    print(f"{DIM}exit code {p.returncode} ({seconds:.1f} s){RESET}", flush=True)
    if p.returncode not in wanted:
        raise DemoFailed(f"unplugctl {args[0]}: exit {p.returncode}, expected {wanted}")
    return p.stdout


class LibvirtDemo:
    """The second phase: the guest as a libvirt domain; unplugctl gets nothing but the domain's name.

    Devices (libvirt_domain.unplug_layout): vdb (mounted here), vdc (idle), vdd + a NIC sharing a
    multifunction slot, vde behind a root port with hotplug='off'.
    """

    def __init__(self, guest: LibvirtGuest) -> None:
        self.vm = guest
        self.name = guest.name

    def guest(self, cmd: str, *, show: bool = True, timeout: float = 120) -> str:
        return guest_command(self.vm, cmd, show=show, timeout=timeout)

    def unplugctl(self, command: str, *args: str, expect: int | Sequence[int] = 0, timeout: float = 180) -> str:
        argv = [command, self.name, *args, "--connect", self.vm.uri]
        return run_unplugctl(["unplugctl", command, self.name, *args], argv, expect=expect, timeout=timeout)

    def run(self) -> None:
        step(f"libvirt: domain {self.name}; the agent's channel in its live XML is all unplugctl needs")
        for line in self.vm.live_xml().splitlines():
            if "org.unplugd.agent.0" in line or "agent.sock" in line:
                print(f"  {line.strip()}")

        step("The guest: mount a filesystem on vdb (serial 'data')")
        self.guest(
            "mkfs.ext4 -q -L data /dev/disk/by-id/virtio-data && mkdir -p /data && "
            "mount /dev/disk/by-id/virtio-data /data && findmnt /data"
        )

        step("On the host, by domain name only: every slot, its hardware and the guest's answer")
        print(
            "(DEVICE names below are libvirt's targets; the guest numbers its disks itself, after its "
            "SATA root disk sda: libvirt's vdb is the guest's vda, as the table's guest column shows)"
        )
        self.unplugctl("status")

        step("vdb is mounted (3), vdd shares its slot with a NIC (6), vde's root port has hotplug='off' (5)")
        self.unplugctl("check", "vdb", expect=3)
        self.unplugctl("unplug", "vdb", expect=3)
        self.unplugctl("check", "vdd", expect=6)
        self.unplugctl("check", "vde", expect=5)

        step("vdc is idle: libvirt detaches it, its device-removed event arrives, the agent confirms")
        self.unplugctl("unplug", "vdc", "--timeout", "60")
        if self.guest("ls /dev/disk/by-id/ | grep -c virtio-idle || true", show=False).strip() != "0":
            raise DemoFailed("the guest still sees vdc after the unplug")
        print("guest: /dev/disk/by-id/virtio-idle is gone")

        step(
            "The multifunction slot, with consent: libvirt refuses to detach it, so device_del goes "
            "through its QEMU monitor passthrough (and libvirt marks the domain tainted)"
        )
        self.unplugctl("unplug", "vdd", "--with-companions", "--timeout", "60")
        left = self.vm.live_pci_functions(3)
        if left:
            raise DemoFailed(f"still in the live XML on the multifunction slot's bus: {left}")
        print("live XML: nothing left on the slot's bus (disk and NIC both gone)")

        step("What is left")
        self.unplugctl("status")
        seconds = self.vm.boot_seconds or 0.0
        print(f"\n{BOLD}libvirt demo OK{RESET} (domain booted in {seconds:.0f} s under TCG)")


def libvirt_phase(keep: bool) -> None:
    step("Phase 2: the same guest as a transient libvirt domain (libvirtd started if needed)")
    subprocess.run(["sh", str(LIBVIRTD_SETUP)], check=True, timeout=60)
    with LibvirtGuest(unplug_layout(), config=GUEST_CONFIG, name=f"unplugd-demo-{os.getpid()}") as guest:
        guest.wait_booted(timeout=600)
        LibvirtDemo(guest).run()
        if keep:
            print(f"domain: {guest.name} (virsh -c {guest.uri} ...)")
            input("Enter stops the domain. ")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--keep", action="store_true", help="leave the VM running until Enter is pressed")
    p.add_argument("--skip-libvirt", action="store_true", help="skip the second phase (the libvirt domain)")
    args = p.parse_args(argv)
    step(
        "Building the guest image (cached by a hash of its recipe) and the .debs; dpkg -i in a stock guest, "
        "then booting it (q35, TCG)"
    )
    try:
        with GuestVM("q35", devices=devices(), config=GUEST_CONFIG, name="unplugd-demo") as vm:
            vm.wait_booted(timeout=600)
            Demo(vm).run()
            if args.keep:
                print(f"QMP: {vm.qmp_socket}\nagent: serial:{vm.agent_socket}")
                input("Enter stops the VM. ")
        if not args.skip_libvirt:
            libvirt_phase(args.keep)
    except DemoFailed as e:
        print(f"\ndemo FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
