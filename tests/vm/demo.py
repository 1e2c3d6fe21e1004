"""`make demo`: boot a real guest and show unplugd and unplugctl at work, command by command.

    .venv/bin/python -m tests.vm.demo [--keep] [--skip-libvirt]

Builds (or reuses) the guest image and the agent's .debs, installs them in a stock guest with dpkg -i
(config: mutations and release hooks allowed) and boots it again (q35, TCG) with hotpluggable disks
and NICs, a multifunction slot and a port with hotplug off; phase 2's libvirt domain boots meanwhile,
so the two boots overlap. Then it runs the commands a user would,
the real CLIs (the venv's `unplugctl` on the host, `unplugd` in the guest through qemu-guest-agent),
and prints each command, its real output and one line on what it showed:

1. QEMU (QMP): the guest's `unplugd inspect`; `unplugctl status`, `check` (exit 3, 5, 6), `unplug`
   refused, `wait-ready`; `release` (the shipped example hook stops a service and unmounts its
   filesystem); `unplug --prepare`; `unplug --with-companions`; hot-add: `slots`, `plug` of a whole
   two-function slot confirmed by the guest, then `unplug SLOT --release` of it once in use.
2. libvirt: the same guest as a transient domain, unplugctl given only its name (the agent found
   through the domain's <channel>); a remote URI (qemu+ext running virt-ssh-helper: what qemu+ssh
   runs at the far end, without ssh), where the agent is reached through libvirt itself; the fleet
   forms (`status --all-domains` over two URIs, `--unpluggable`, `check` over URIs); an unplug over
   the remote URI and a multifunction slot through libvirt's monitor passthrough.

Every step checks its exit code and what it claims (a device gone from the guest, a service
stopped); the demo exits non-zero at the first that does not behave as shown, and prints its wall
time at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from tests.conftest import REPO
from tests.vm import MUTATIONS_CONFIG, GuestVM
from tests.vm.devices import Device, disk_on_root_port, multifunction_slot, net_on_root_port, pcie_root_port
from tests.vm.libvirt_domain import LibvirtGuest, unplug_layout
from tests.vm.qga import ExecResult

LIBVIRTD_SETUP = REPO / "packaging" / "dev" / "libvirtd-setup.sh"
EXAMPLE_HOOKS = "/usr/share/unplugd/examples/release.d"

# What an administrator writes to allow leases (unplug --prepare) and release hooks. The hook timeout
# is raised from its default (30 s) because this guest is emulated (TCG) on shared cores: the example
# hook's systemctl calls took seconds each in the e2e runs (tests/e2e/test_release_e2e.py).
GUEST_CONFIG = (
    MUTATIONS_CONFIG
    + "[release]\nenabled = true\nhook_timeout_seconds = 120.0  # default 30; this guest is emulated (TCG)\n"
)

# The venv's console script: what `unplugctl` is on a user's PATH after `pip install`.
UNPLUGCTL = Path(sys.executable).with_name("unplugctl")
# Seconds for each agent call (unplugctl's default is 5): a TCG guest on loaded cores takes seconds
# to scan. Added to every unplugctl command and said once, not repeated in each shown command.
AGENT_TIMEOUT = "30"
# Seconds unplug, release and plug may wait for the guest: enumerating, binding virtio, running a
# hook or ejecting a slot takes tens of seconds under TCG (tests/e2e/test_hot_add.py: PLUG_TIMEOUT).
GUEST_WAIT = "180"
# The plugged NIC's MAC, to find it in the guest afterwards.
HOT_MAC = "52:54:00:d0:00:01"

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


class DemoFailed(Exception):
    pass


class _Guest(Protocol):
    def exec(self, cmd: str, timeout: float = ...) -> ExecResult: ...


def step(title: str) -> None:
    print(f"\n{BOLD}== {title}{RESET}", flush=True)


def showed(text: str) -> None:
    """The one line after a step's commands: what it showed."""
    print(f"{BOLD}-> {text}{RESET}", flush=True)


def display(argv: Sequence[str]) -> str:
    """argv as a user types it: shell-quoted, except words holding the demo's $VARIABLES, written
    as they are to be typed (`$QMP`, `"$HV"`). Pure."""
    return " ".join(a if "$" in a else shlex.quote(a) for a in argv)


def expand(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The words with each placeholder of env (`$QMP`, `"$HV"`) replaced by its value; longer
    placeholders first, so `"$HV"` goes whole. Pure."""
    keys = sorted(env, key=len, reverse=True)
    out = []
    for word in argv:
        for k in keys:
            word = word.replace(k, env[k])
        out.append(word)
    return out


def slot_path_of(plug_output: str) -> str:
    """The slot `unplugctl plug` chose, from its first line (`slot 0000:00/05.0/00 (rp 0x00) chosen: ...`)."""
    m = re.search(r"^slot (\S+) \(", plug_output, re.M)
    if m is None:
        raise DemoFailed("unplugctl plug did not say which slot it filled")
    return m.group(1)


def fleet_lines(output: str, domain: str) -> list[str]:
    """A fleet command's lines about `domain` (`URI DOMAIN: ...`, one per URI)."""
    return [line for line in output.splitlines() if f" {domain}: " in line and "://" in line.split(" ", 1)[0]]


def guest_command(vm: _Guest, cmd: str, *, show: bool = True, timeout: float = 120) -> str:
    """Run a command in the guest (through qemu-guest-agent) and show it and its output."""
    if show:
        print(f"{DIM}guest#{RESET} {cmd}", flush=True)
    r = vm.exec(cmd, timeout=timeout)
    if show and (r.stdout or r.stderr):
        print((r.stdout + r.stderr).rstrip(), flush=True)
    if r.rc != 0:
        raise DemoFailed(f"guest command failed ({r.rc}): {cmd}\n{r.stderr}")
    return r.stdout


def host_command(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """Run a host command other than unplugctl (qemu-img, cat) and show it and its output."""
    print(f"{DIM}host#{RESET} {display(argv)}", flush=True)
    p = subprocess.run(expand(argv, env), capture_output=True, text=True, timeout=60)
    if p.stdout or p.stderr:
        print((p.stdout + p.stderr).rstrip(), flush=True)
    if p.returncode != 0:
        raise DemoFailed(f"{argv[0]}: exit {p.returncode}")
    return p.stdout


def run_unplugctl(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    hidden: Sequence[str] = (),
    expect: int | Sequence[int] = 0,
    timeout: float = 300,
) -> str:
    """Show `unplugctl ARGS`, run it (plus `hidden` and the agent timeout), print its output as a
    terminal would (stderr's progress and stdout together), check its exit code; return the output."""
    print(f"{DIM}host#{RESET} {display(['unplugctl', *args])}", flush=True)
    argv = [str(UNPLUGCTL), *expand(args, env), *hidden, "--agent-timeout", AGENT_TIMEOUT]
    start = time.monotonic()
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, cwd=REPO)
    out = p.stdout.rstrip()
    if out:
        print(out, flush=True)
    wanted = (expect,) if isinstance(expect, int) else tuple(expect)
    print(f"{DIM}exit code {p.returncode} ({time.monotonic() - start:.1f} s){RESET}", flush=True)
    if p.returncode not in wanted:
        raise DemoFailed(f"unplugctl {args[0]}: exit {p.returncode}, expected {' or '.join(map(str, wanted))}")
    return out


class Background:
    """fn in a thread; join() waits and raises what fn raised (a thread's exception is otherwise lost)."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self._error: BaseException | None = None

        def run() -> None:
            try:
                fn()
            except BaseException as e:  # handed to join()
                self._error = e

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


# ------------------------------------------------------------------ phase 1: QEMU, QMP


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
        self.env = {"$QMP": str(vm.qmp_socket), "$AGENT": str(vm.agent_socket), "$WORK": str(vm.workdir)}

    def guest(self, cmd: str, *, show: bool = True, timeout: float = 120) -> str:
        return guest_command(self.vm, cmd, show=show, timeout=timeout)

    def unplugctl(self, *args: str, expect: int | Sequence[int] = 0) -> str:
        """unplugctl against the VM's QMP socket and the agent's virtio-serial chardev."""
        return run_unplugctl([*args, "--qmp", "$QMP", "--agent", "serial:$AGENT"], self.env, expect=expect)

    def gone_from_guest(self, link: str) -> None:
        if self.guest(f"test -e {link} && echo present || echo gone", show=False).strip() != "gone":
            raise DemoFailed(f"the guest still has {link} after the unplug")
        print(f"guest: {link} is gone")

    def run(self) -> None:
        vm = self.vm
        step("Phase 1: a QEMU VM, driven through its QMP socket (no libvirt)")
        print(f"QMP={vm.qmp_socket}      # QEMU's -qmp unix socket")
        print(f"AGENT={vm.agent_socket}  # the host end of the agent's virtio-serial port (a chardev socket)")
        print(f"WORK={vm.workdir}         # the VM's work directory (its disk images)")
        print(
            f"(every unplugctl below also gets --agent-timeout {AGENT_TIMEOUT}: an emulated guest answers in seconds)"
        )

        step("In the guest: the agent's config allows leases and release hooks; the shipped example hook is installed")
        self.guest("cat /etc/unplugd/config.toml")
        self.guest(
            f"install -m 0755 {EXAMPLE_HOOKS}/50-stop-units-and-unmount /etc/unplugd/release.d/ "
            "&& ls /etc/unplugd/release.d/"
        )
        showed("[release] enabled (needs [mutations]); hooks run only from /etc/unplugd/release.d/, root's alone")

        step("In the guest: a service keeps its data on 'data' (/data); a process reads 'scratch'; nic1 routes")
        self.guest(
            "mkfs.ext4 -q -L data /dev/disk/by-id/virtio-data && mkdir -p /data && "
            "mount /dev/disk/by-id/virtio-data /data && findmnt /data"
        )
        self.guest("systemd-run --unit=app -p RequiresMountsFor=/data -p WorkingDirectory=/data sleep infinity")
        self.guest(
            "systemd-run --unit=scratch-reader -p StandardInput=file:/dev/disk/by-id/virtio-scratch sleep infinity"
        )
        ifname = self._ifname_of("nic1")
        self.guest(
            f"ip link set {ifname} up && ip addr add 192.0.2.10/24 dev {ifname} && "
            f"ip route add default via 192.0.2.1 dev {ifname} && ip -br addr show {ifname}"
        )

        step("Inside the guest: `unplugd inspect` (the same report the host will get)")
        self.guest("unplugd inspect")
        showed("a line per function, grouped by slot, and the first reason a BUSY one has (-v: every reason)")

        step("On the host: every slot, its hardware and the guest's answer for each function")
        self.unplugctl("status")
        showed("the host joined QEMU's topology with the guest's report by PCI path: one verdict per slot")

        step("Is 'data' safe to unplug? No: mounted in the guest (exit 3 = blocked by the guest)")
        self.unplugctl("check", "data", expect=3)
        self.unplugctl("unplug", "data", expect=3)
        showed("unplug refuses what check refuses: nothing was sent to QEMU")

        step("'scratch' is held open by a process; 'nic1' carries the default route")
        self.unplugctl("check", "scratch", expect=3)
        self.unplugctl("check", "nic1", expect=3)
        showed("each is BLOCKED_BY_GUEST with its own reason")

        step("The multifunction slot: unplugging the disk would take the NIC with it (exit 6)")
        self.unplugctl("check", "mfdisk", expect=6)
        showed("NEEDS_COMPANIONS: QEMU removes whole slots, so one function alone is refused")

        step("A root port with hotplug=off: the hardware says no (exit 5)")
        self.unplugctl("check", "pinned", expect=5)
        showed("NOT_HOTPLUGGABLE comes from the host's topology, whatever the guest says")

        step("wait-ready returns as soon as the guest lets go (watching, not polling): the reader stops")
        waiter = Background(lambda: self.unplugctl("wait-ready", "scratch", "--timeout", GUEST_WAIT))
        time.sleep(3)  # wait-ready is watching by now: the stop below is an event it sees, not a first look
        self.guest("systemctl stop scratch-reader")
        waiter.join()
        showed("wait-ready exited 0 the moment the guest's report said READY")

        step("Release hooks: ask the guest to let go of 'data' (its hook stops app.service, unmounts /data)")
        self.unplugctl("release", "data", "--timeout", GUEST_WAIT)
        state = self.guest("systemctl is-active app.service || true; findmnt /data || echo '/data: not mounted'")
        if "inactive" not in state or "not mounted" not in state:
            raise DemoFailed("after the release app.service still runs or /data is still mounted")
        showed("RELEASED: the guest's own hook did what an administrator would have logged in to do")

        step("Unplug 'data' with a prepare lease: the guest claims the disk, QEMU removes it, the agent confirms")
        self.unplugctl("unplug", "data", "--prepare", "--timeout", GUEST_WAIT)
        self.gone_from_guest("/dev/disk/by-id/virtio-data")
        showed("UNPLUGGED: DEVICE_DELETED from QEMU, and the guest no longer has the disk")

        step("The whole multifunction slot, with consent: both functions go together")
        self.unplugctl("unplug", "mfdisk", "--with-companions", "--timeout", GUEST_WAIT)
        self.gone_from_guest("/dev/disk/by-id/virtio-mfdisk")
        showed("both functions of the slot left together, as QEMU removes them")

        step("Hot-add: where can a device go now?")
        self.unplugctl("slots")
        showed("every bus, its free slots, whether 8 functions fit, and why the other places cannot take one")

        step("Plug a whole two-function slot: a disk (function 0) and a NIC (function 1), backends first")
        host_command(["qemu-img", "create", "-q", "-f", "qcow2", "$WORK/hot.qcow2", "64M"], self.env)
        out = self.unplugctl(
            "plug",
            "virtio-blk-pci,drive=hotdisk,id=hotdisk,serial=hotdisk",
            f"virtio-net-pci,netdev=hotnet,id=hotnic,mac={HOT_MAC}",
            "--blockdev",
            "driver=qcow2,node-name=hotdisk,file.driver=file,file.filename=$WORK/hot.qcow2",
            "--netdev",
            "user,id=hotnet,restrict=on",
            "--timeout",
            GUEST_WAIT,
        )
        slot = slot_path_of(out)
        if "PLUGGED" not in out:
            raise DemoFailed("unplugctl plug did not report PLUGGED")
        showed(f"function 1 went in first, function 0 last; exit 0 only once the guest reported both at {slot}")

        step("In the guest: the new slot, its disk and its interface")
        self.guest(f"unplugd inspect --device {slot}.0 --device {slot}.1")
        self.guest(f"ls /dev/disk/by-id/virtio-hotdisk && grep -l {HOT_MAC} /sys/class/net/*/address")
        showed("READY: nothing in the guest uses them yet")

        step("Use it: a filesystem on the new disk, mounted in the guest")
        self.guest(
            "mkfs.ext4 -q /dev/disk/by-id/virtio-hotdisk && mkdir -p /srv/hot && "
            "mount /dev/disk/by-id/virtio-hotdisk /srv/hot && findmnt /srv/hot"
        )

        step("Unplug the slot with --release: the hook unmounts /srv/hot, then a lease, device_del, the guest confirms")
        self.unplugctl("unplug", slot, "--release", "--timeout", GUEST_WAIT)
        self.gone_from_guest("/dev/disk/by-id/virtio-hotdisk")
        if self.guest(f"grep -l {HOT_MAC} /sys/class/net/*/address || true", show=False).strip():
            raise DemoFailed("the guest still has the plugged NIC after the unplug")
        print("guest: the plugged NIC is gone")
        showed("one command: released by the guest's hook, unplugged whole, confirmed by the agent")

        step("What is left")
        self.unplugctl("status")
        showed(f"phase 1 done (guest booted in {vm.boot_seconds or 0:.0f} s under TCG)")

    def _ifname_of(self, qid: str) -> str:
        """The guest interface name of a NIC the harness created with QEMU id qid (matched by MAC)."""
        info = self.vm.qmp("qom-get", {"path": f"/machine/peripheral/{qid}", "property": "mac"})
        mac = str(info).lower()
        out = self.guest(f"grep -l {mac} /sys/class/net/*/address", show=False).strip()
        if not out:
            raise DemoFailed(f"no guest interface has MAC {mac}")
        return out.splitlines()[0].split("/")[4]


# ------------------------------------------------------------------ phase 2: libvirt, local and remote

# What `qemu+ssh://hv1/system` runs on hv1 through ssh (libvirt's protocol on its stdin and stdout);
# `qemu+ext` runs a command of our choosing the same way, so this remote transport needs no sshd.
HV_HELPER = (
    "#!/bin/sh\n# libvirt's protocol on stdin/stdout, as qemu+ssh:// runs it at the far end of ssh\n"
    "exec virt-ssh-helper {uri}\n"
)


class LibvirtDemo:
    """The guest as a libvirt domain; unplugctl gets nothing but its name, or a remote URI.

    Devices (libvirt_domain.unplug_layout): vdb (mounted here), vdc (idle), vdd + a NIC sharing a
    multifunction slot, vde behind a root port with hotplug='off'.
    """

    def __init__(self, guest: LibvirtGuest, helper_dir: Path) -> None:
        self.vm = guest
        self.name = guest.name
        self.helper = helper_dir / "hv"
        self.helper.write_text(HV_HELPER.format(uri=shlex.quote(guest.uri)))
        self.helper.chmod(0o755)
        self.env = {"$DEMO": str(helper_dir), '"$HV"': f"qemu+ext:///system?command={self.helper}"}

    def guest(self, cmd: str, *, show: bool = True, timeout: float = 120) -> str:
        return guest_command(self.vm, cmd, show=show, timeout=timeout)

    def local(self, command: str, *args: str, expect: int | Sequence[int] = 0) -> str:
        """unplugctl COMMAND DOMAIN ARGS on the local libvirtd, shown as typed: the default URI."""
        return run_unplugctl([command, self.name, *args], self.env, hidden=["--connect", self.vm.uri], expect=expect)

    def unplugctl(self, *args: str, expect: int | Sequence[int] = 0) -> str:
        return run_unplugctl(args, self.env, expect=expect)

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
        self.local("status")
        showed("the same verdicts as under QMP, from libvirt's live XML and the agent on the domain's <channel>")

        step("vdb is mounted (3), vdd shares its slot with a NIC (6), vde's root port has hotplug='off' (5)")
        self.local("check", "vdb", expect=3)
        self.local("unplug", "vdb", expect=3)
        self.local("check", "vdd", expect=6)
        self.local("check", "vde", expect=5)
        showed("libvirt domains get the same answers and exit codes")

        step("A remote hypervisor: unplugctl over a remote URI reaches the agent through libvirt itself")
        print(
            "(qemu+ssh://hv1/system runs virt-ssh-helper on hv1 through ssh; qemu+ext runs a command of our "
            "choosing the same way: here that helper on this machine, so the demo needs no sshd)"
        )
        host_command(["cat", "$DEMO/hv"], self.env)
        print(f'{DIM}host#{RESET} HV="qemu+ext:///system?command=$DEMO/hv"', flush=True)
        self.unplugctl("check", self.name, "vdb", "-c", '"$HV"', expect=3)
        showed("the remote answer is the local one: the agent's channel opened over libvirt's own connection")

        step("Fleet: every running domain of each --connect URI, one line each")
        print("(two URIs, one hypervisor here: its local socket and the remote transport, so the domain twice)")
        out = self.unplugctl("status", "-c", "qemu:///system", "-c", '"$HV"', "--all-domains", expect=(0, 4))
        self._answered(out, 2, "guest agent reachable")
        self.unplugctl("status", "-c", '"$HV"', "--all-domains", "--unpluggable", "target=vd*", expect=(0, 4))
        out = self.unplugctl("check", "-c", "qemu:///system", "-c", '"$HV"', self.name, "vdb", expect=(0, 4))
        self._answered(out, 2, "BLOCKED_BY_GUEST")
        showed("domains asked concurrently, one line each; --unpluggable: who can give a disk back now")

        step("vdc is idle: unplug it over the remote URI; the device-removed event arrives there too")
        self.unplugctl("unplug", self.name, "vdc", "-c", '"$HV"', "--timeout", GUEST_WAIT)
        if self.guest("test -e /dev/disk/by-id/virtio-idle && echo present || echo gone", show=False).strip() != "gone":
            raise DemoFailed("the guest still sees vdc after the unplug")
        print("guest: /dev/disk/by-id/virtio-idle is gone")
        showed("libvirt detached it, its event came over the remote connection, the agent confirmed")

        step(
            "The multifunction slot, with consent: libvirt refuses to detach it, so device_del goes "
            "through its QEMU monitor passthrough (and libvirt marks the domain tainted)"
        )
        self.local("unplug", "vdd", "--with-companions", "--timeout", GUEST_WAIT)
        left = self.vm.live_pci_functions(3)
        if left:
            raise DemoFailed(f"still in the live XML on the multifunction slot's bus: {left}")
        print("live XML: nothing left on the slot's bus (disk and NIC both gone)")
        showed("both functions left together; libvirt's XML agrees")

        step("What is left")
        self.local("status")
        showed(f"phase 2 done (domain booted in {self.vm.boot_seconds or 0:.0f} s under TCG)")

    def _answered(self, output: str, count: int, words: str) -> None:
        """The fleet output has `count` lines about this domain and each says `words`; an exit code 4
        may only come from other domains (this machine's libvirtd may run others)."""
        mine = fleet_lines(output, self.name)
        if len(mine) != count or not all(words in line for line in mine):
            raise DemoFailed(f"expected {count} lines about {self.name} saying {words!r}, got: {mine}")


class Clock:
    """Where the demo's time went, for its last line: (what, seconds) in order."""

    def __init__(self) -> None:
        self.start = self._last = time.monotonic()
        self.parts: list[tuple[str, float]] = []

    def lap(self, what: str) -> None:
        now = time.monotonic()
        self.parts.append((what, now - self._last))
        self._last = now

    def summary(self) -> str:
        parts = ", ".join(f"{what} {_minutes(s)}" for what, s in self.parts)
        return f"{_minutes(time.monotonic() - self.start)} ({parts})"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--keep", action="store_true", help="leave each VM running until Enter is pressed")
    p.add_argument("--skip-libvirt", action="store_true", help="skip the second phase (the libvirt domain)")
    args = p.parse_args(argv)
    clock = Clock()
    step(
        "Building the guest image (cached by a hash of its recipe) and the .debs; dpkg -i in a stock guest, "
        "then booting it (q35, TCG): as a QEMU VM, and meanwhile as a libvirt domain for phase 2"
    )
    try:
        with contextlib.ExitStack() as stack:
            domain: LibvirtGuest | None = None
            with GuestVM("q35", devices=devices(), config=GUEST_CONFIG, name="unplugd-demo") as vm:
                clock.lap("image, packages and install")
                if not args.skip_libvirt:
                    # Booted while phase 1 runs: a TCG boot takes minutes of one core, phase 1 mostly
                    # waits on its guest; on two free cores the boots overlap instead of adding up.
                    subprocess.run(["sh", str(LIBVIRTD_SETUP)], check=True, timeout=60)
                    domain = stack.enter_context(
                        LibvirtGuest(unplug_layout(), config=GUEST_CONFIG, name=f"unplugd-demo-{os.getpid()}")
                    )
                vm.wait_booted(timeout=600)
                clock.lap("VM boot")
                Demo(vm).run()
                clock.lap("phase 1")
                if args.keep:
                    print(f"QMP: {vm.qmp_socket}\nagent: serial:{vm.agent_socket}")
                    input("Enter stops the VM. ")
            if domain is not None:
                libvirt_phase(domain, args.keep, clock)
    except DemoFailed as e:
        print(f"\ndemo FAILED after {_minutes(time.monotonic() - clock.start)}: {e}", file=sys.stderr)
        return 1
    print(f"\n{BOLD}demo OK{RESET}: every step did what it showed, in {clock.summary()}")
    return 0


def libvirt_phase(domain: LibvirtGuest, keep: bool, clock: Clock) -> None:
    step("Phase 2: the same guest as a transient libvirt domain (libvirtd started if needed)")
    domain.wait_booted(timeout=600)
    clock.lap("the domain's boot, past phase 1")
    helper_dir = Path(tempfile.mkdtemp(prefix="unplugd-demo-"))
    try:
        LibvirtDemo(domain, helper_dir).run()
        clock.lap("phase 2")
        if keep:
            print(f"domain: {domain.name} (virsh -c {domain.uri} ...)")
            input("Enter stops the domain. ")
    finally:
        shutil.rmtree(helper_dir, ignore_errors=True)


def _minutes(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60}m{whole % 60:02d}s"


if __name__ == "__main__":
    sys.exit(main())
