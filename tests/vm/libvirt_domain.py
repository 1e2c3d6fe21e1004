"""LibvirtGuest: the unplugd guest image booted as a transient libvirt domain, agent inside.

    with LibvirtGuest(unplug_layout()) as guest:
        guest.wait_booted()
        guest.exec("findmnt", check=True)
        ...  # `unplugctl status <guest.name>`: the agent is found through the domain's <channel>

This is the path a plain libvirt user takes: no QMP socket, no --agent flag. What the domain gets,
besides the devices a test asks for:
- the root disk: a throwaway qcow2 overlay on q35's built-in AHCI (SATA), so it is no hotpluggable
  PCI function; direct kernel boot from the image's kernel/initrd/cmdline. Like the QEMU harness
  (guest.py) it overlays the stock guest into which our packages were installed with dpkg -i
  (install.py), so the domain's boot is the reboot after an install;
- a virtio-serial controller pinned to 00:1d with two unix <channel>s in the work directory:
  org.unplugd.agent.0 (for unplugctl) and org.qemu.guest_agent.0, which libvirtd itself connects
  to, so commands in the guest go through libvirt's qemu-agent-command (exec());
- the serial console logged to serial.log in the work directory.

The domain is transient (virDomainCreateXML): destroying it removes it from libvirt. It goes away on
exit from the `with`, on failure, at interpreter exit, and, through a small watcher process, also
when the process that created it dies by SIGKILL.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from tests.vm.devices import DataDisk
from tests.vm.guest import DEFAULT_GUEST_CONFIG, GuestBase, Packages, VMError, _tail, progress
from tests.vm.image import GuestImage
from tests.vm.qga import ExecResult, GuestAgent, GuestAgentError

__all__ = [
    "URI",
    "DomainDevice",
    "LibvirtGuest",
    "ethernet_nic",
    "pci_address",
    "pcie_root_port",
    "unplug_layout",
    "virtio_disk",
]

log = logging.getLogger(__name__)

URI = os.environ.get("UNPLUGD_LIBVIRT_URI", "qemu:///system")
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
AGENT_PORT = "org.unplugd.agent.0"
QGA_PORT = "org.qemu.guest_agent.0"

_live: weakref.WeakSet[LibvirtGuest] = weakref.WeakSet()

# Reads stdin until EOF (the creating process died or closed the pipe), then destroys the domain
# and removes the work directory. Killed first on an orderly close.
_WATCHER = (
    "import os, shutil, subprocess, sys\n"
    "while os.read(0, 1):\n"
    "    pass\n"
    "subprocess.run(['virsh', '-c', sys.argv[1], 'destroy', sys.argv[2]],\n"
    "               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)\n"
    "shutil.rmtree(sys.argv[3], ignore_errors=True)\n"
)


# ------------------------------------------------------------------ device XML


@dataclass(frozen=True)
class DomainDevice:
    """A fragment of <devices> XML, plus backing files to create empty in the work directory first.

    The XML may contain `{workdir}`, replaced (attribute-quoted) when the domain starts.
    """

    xml: str
    disks: tuple[DataDisk, ...] = ()


def pci_address(bus: int, slot: int, function: int = 0, *, multifunction: bool = False) -> str:
    mf = " multifunction='on'" if multifunction else ""
    return f"<address type='pci' domain='0x0000' bus='{bus:#04x}' slot='{slot:#04x}' function='{function:#x}'{mf}/>"


def pcie_root_port(
    index: int, *, slot: int, function: int = 0, multifunction: bool = False, hotplug: bool = True
) -> DomainDevice:
    """A pcie-root-port on pcie.0 providing bus `index`; hotplug=False is <target hotplug='off'/>."""
    target = "" if hotplug else "<target hotplug='off'/>"
    return DomainDevice(
        f"<controller type='pci' index='{index}' model='pcie-root-port'>{target}"
        f"{pci_address(0, slot, function, multifunction=multifunction)}</controller>"
    )


def virtio_disk(
    target: str,
    *,
    bus: int,
    slot: int = 0,
    function: int = 0,
    multifunction: bool = False,
    serial: str | None = None,
    size: str = "64M",
) -> DomainDevice:
    """A virtio disk on an empty qcow2 file; in the guest /dev/disk/by-id/virtio-<serial> (default: target)."""
    serial = serial if serial is not None else target
    if len(serial) > 20:
        raise ValueError(f"virtio-blk serial longer than 20 bytes: {serial!r}")
    disk = DataDisk(f"{target}.qcow2", size)
    return DomainDevice(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='unsafe'/>"
        f"<source file='{{workdir}}/{disk.name}'/><target dev='{target}' bus='virtio'/><serial>{serial}</serial>"
        f"{pci_address(bus, slot, function, multifunction=multifunction)}</disk>",
        (disk,),
    )


def ethernet_nic(mac: str, *, bus: int, slot: int = 0, function: int = 0) -> DomainDevice:
    """A virtio NIC on a tap that libvirt creates and attaches to nothing: no bridge, no address, no route.

    libvirt 9 cannot ask for QEMU's restricted user network, and this needs no host setup to undo:
    the tap goes away with the domain, and nothing the guest sends can leave the machine.
    """
    return DomainDevice(
        f"<interface type='ethernet'><mac address='{mac}'/><model type='virtio'/>"
        f"{pci_address(bus, slot, function)}</interface>"
    )


def unplug_layout() -> list[DomainDevice]:
    """The devices the libvirt e2e test and demo put under test, each behind its own root port
    (root ports as functions of pcie.0 slot 2, the way libvirt lays them out):

    vdb 'data'    bus 1: hotpluggable; the test mounts it            -> BLOCKED_BY_GUEST
    vdc 'idle'    bus 2: hotpluggable, unused                        -> UNPLUGGABLE
    vdd 'mfdisk'  bus 3: function 0 of a multifunction slot,
    + NIC         bus 3: function 1 of that slot                     -> NEEDS_COMPANIONS
    vde 'pinned'  bus 4: its root port has hotplug='off'             -> NOT_HOTPLUGGABLE
    """
    return [
        pcie_root_port(1, slot=2, function=0, multifunction=True),
        pcie_root_port(2, slot=2, function=1),
        pcie_root_port(3, slot=2, function=2),
        pcie_root_port(4, slot=2, function=3, hotplug=False),
        virtio_disk("vdb", bus=1, serial="data"),
        virtio_disk("vdc", bus=2, serial="idle"),
        virtio_disk("vdd", bus=3, function=0, multifunction=True, serial="mfdisk"),
        ethernet_nic("52:54:00:75:6e:01", bus=3, function=1),
        virtio_disk("vde", bus=4, serial="pinned"),
    ]


# ------------------------------------------------------------------ guest agent through libvirt


class LibvirtGuestAgent(GuestAgent):
    """qemu-guest-agent through libvirt (virsh qemu-agent-command): libvirtd owns the qga channel.

    Reuses GuestAgent's exec/ping on top of a different call().
    """

    def __init__(self, dom: Any) -> None:
        super().__init__(Path("/nonexistent"))
        self._dom = dom

    def call(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        import libvirt
        import libvirt_qemu  # type: ignore[import-untyped]

        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        try:
            reply = libvirt_qemu.qemuAgentCommand(self._dom, json.dumps(req), max(1, int(timeout + 0.999)), 0)
        except libvirt.libvirtError as exc:
            raise GuestAgentError(f"{command}: {exc.get_error_message()}") from exc
        try:
            answer = json.loads(reply)
        except (TypeError, ValueError) as exc:
            raise GuestAgentError(f"{command}: reply is not JSON: {reply!r:.200}") from exc
        if not isinstance(answer, dict):
            raise GuestAgentError(f"{command}: unexpected reply {answer!r:.200}")
        if "error" in answer:
            err = answer["error"]
            raise GuestAgentError(f"{command}: {err.get('class')}: {err.get('desc')}")
        return answer.get("return")

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ the domain


class LibvirtGuest(GuestBase):
    def __init__(
        self,
        devices: Iterable[DomainDevice] = (),
        *,
        name: str | None = None,
        memory_mb: int = 1024,
        cpus: int = 1,
        image: GuestImage | None = None,
        packages: Packages = "build",
        config: str | None = DEFAULT_GUEST_CONFIG,
        uri: str = URI,
        keep_workdir: bool | None = None,
    ) -> None:
        """Describe a domain; nothing runs until start() or `with`.

        packages, config: as GuestVM's (the domain boots an overlay of the guest that installed them).
        keep_workdir: keep logs and sockets after exit (default: UNPLUGD_VM_KEEP=1).
        """
        super().__init__(
            name=name or f"unplugd-e2e-{uuid.uuid4().hex[:8]}",
            memory_mb=memory_mb,
            cpus=cpus,
            image=image,
            packages=packages,
            config=config,
            keep_workdir=keep_workdir,
            workdir_prefix="unplugd-lv-",
        )
        self.devices = tuple(devices)
        self.uri = uri
        self._conn: Any = None
        self._dom: Any = None
        self._qga: LibvirtGuestAgent | None = None
        self._watcher: subprocess.Popen[bytes] | None = None
        self._watch_fd: int | None = None

    # -- lifecycle --

    @property
    def domain(self) -> Any:
        """The libvirt virDomain (raises VMError before start)."""
        if self._dom is None:
            raise VMError("domain not started")
        return self._dom

    @property
    def libvirt_log(self) -> Path:
        return Path("/var/log/libvirt/qemu") / f"{self.name}.log"

    def domain_xml(self) -> str:
        """The domain XML handed to libvirt (after start() has prepared the work directory)."""
        img = self.image
        w = str(self.workdir)

        def attr(value: str | Path) -> str:
            return quoteattr(str(value))

        cmdline = img.cmdline.replace("&", "&amp;").replace("<", "&lt;")
        devices = "\n    ".join(d.xml.replace("{workdir}", w) for d in self.devices)
        return f"""<domain type='qemu'>
  <name>{self.name}</name>
  <memory unit='MiB'>{self.memory_mb}</memory>
  <vcpu>{self.cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{img.kernel}</kernel>
    <initrd>{img.initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU}</emulator>
    <controller type='pci' index='0' model='pcie-root'/>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe'/>
      <source file={attr(self.workdir / "root.qcow2")}/>
      <target dev='sda' bus='sata'/>
    </disk>
    <controller type='usb' index='0' model='none'/>
    <controller type='virtio-serial' index='0'>{pci_address(0, 0x1D)}</controller>
    <channel type='unix'>
      <source mode='bind' path={attr(self.agent_socket)}/>
      <target type='virtio' name='{AGENT_PORT}'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path={attr(self.qga_socket)}/>
      <target type='virtio' name='{QGA_PORT}'/>
    </channel>
    <serial type='file'><source path={attr(self.serial_log)}/><target port='0'/></serial>
    <memballoon model='none'/>
    {devices}
  </devices>
</domain>
"""

    def start(self) -> None:
        import libvirt

        if self._dom is not None:
            raise VMError("already started")
        self._prepare_files(disk for dev in self.devices for disk in dev.disks)
        xml = self.domain_xml()
        (self.workdir / "domain.xml").write_text(xml)
        _quiet_libvirt()
        self._conn = libvirt.open(self.uri)
        # The watcher is up before the domain exists: no window in which a dying caller leaks it.
        self._start_watcher()
        self._started_at = time.monotonic()
        try:
            self._dom = self._conn.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            raise VMError(f"libvirt refused the domain {self.name}: {exc.get_error_message()}") from exc
        _live.add(self)
        self._qga = LibvirtGuestAgent(self._dom)
        progress(f"started libvirt domain {self.name} (q35, TCG) on {self.uri}, workdir {self.workdir}")

    def _start_watcher(self) -> None:
        read_fd, write_fd = os.pipe()
        argv = [
            sys.executable,
            "-c",
            _WATCHER,
            self.uri,
            self.name,
            str(self.workdir) if not self.keep_workdir else "/nonexistent",
        ]
        try:
            self._watcher = subprocess.Popen(argv, stdin=read_fd, start_new_session=True)
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self._watch_fd = write_fd

    @property
    def running(self) -> bool:
        import libvirt

        if self._dom is None:
            return False
        try:
            return bool(self._dom.isActive())
        except libvirt.libvirtError:
            return False

    def _check_alive(self) -> None:
        if self._dom is not None and not self.running:
            raise VMError(
                f"domain {self.name} is no longer running\n--- libvirt log ---\n{_tail(self.libvirt_log, 15)}\n"
                f"--- serial console ---\n{_tail(self.serial_log, 30)}"
            )

    def _guest_agent(self) -> GuestAgent:
        if self._qga is None:
            raise VMError("domain not started")
        return self._qga

    # -- inside the guest --

    def exec(self, cmd: str | Sequence[str], timeout: float = 60.0, *, check: bool = False) -> ExecResult:
        """Run a command in the guest through libvirt's qemu-agent-command: (rc, stdout, stderr).

        A string runs under /bin/sh -c. check=True raises VMError on rc != 0.
        """
        if self._qga is None:
            raise VMError("domain not started")
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        self._check_alive()
        try:
            result = self._qga.exec(argv, timeout=timeout)
        except GuestAgentError as exc:
            self._check_alive()
            raise VMError(f"guest exec {argv!r}: {exc}") from exc
        if check and result.rc != 0:
            raise VMError(f"guest command {argv!r} failed with {result.rc}:\n{result.stdout}{result.stderr}")
        return result

    # -- the domain as libvirt sees it --

    def live_xml(self) -> str:
        return str(self.domain.XMLDesc(0))

    def live_disk_targets(self) -> set[str]:
        """Target names (vdb, ...) of the disks in the live XML."""
        root = ET.fromstring(self.live_xml())  # from the local, root-only libvirtd
        return {t.get("dev", "") for t in root.findall("devices/disk/target")}

    def live_pci_functions(self, bus: int) -> list[str]:
        """Device elements in the live XML whose PCI address is on controller `bus`, as 'tag@slot.fn'."""
        root = ET.fromstring(self.live_xml())
        found = []
        devices = root.find("devices")
        for el in devices if devices is not None else ():
            a = el.find("address")
            if a is not None and a.get("type") == "pci" and int(a.get("bus", "-1"), 0) == bus:
                found.append(f"{el.tag}@{int(a.get('slot', '0'), 0)}.{int(a.get('function', '0'), 0)}")
        return sorted(found)

    # -- teardown --

    def close(self, failed: bool = False) -> None:
        """Destroy the domain, stop the watcher, remove the work directory (kept on request).

        Every step runs even when an earlier one fails (a closed stderr must not leak the domain).
        """
        import libvirt

        dom, self._dom = self._dom, None
        try:
            if dom is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                self._wait_forgotten()
        finally:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
            self._stop_watcher()
            _live.discard(self)
            keep = self.keep_workdir or (failed and os.environ.get("UNPLUGD_VM_KEEP_FAILED") == "1")
            if not keep:
                shutil.rmtree(self.workdir, ignore_errors=True)
            if not failed:
                with contextlib.suppress(OSError):
                    self.libvirt_log.unlink()
            with contextlib.suppress(OSError):
                if failed:
                    progress(f"domain {self.name} failed; last console lines:\n{_tail(self.serial_log, 25)}")
                    if self.libvirt_log.exists():
                        progress(f"libvirt's log of it: {self.libvirt_log}")
                if keep:
                    progress(f"kept {self.workdir}")

    def _stop_watcher(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(OSError):
                self._watcher.kill()
            self._watcher.wait(5)
            self._watcher = None
        if self._watch_fd is not None:
            os.close(self._watch_fd)
            self._watch_fd = None

    def _wait_forgotten(self, timeout: float = 30.0) -> None:
        """A destroyed transient domain disappears from libvirt; wait for that (QEMU has exited by then)."""
        import libvirt

        if self._conn is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.name not in {d.name() for d in self._conn.listAllDomains(0)}:
                    return
            except libvirt.libvirtError:
                return
            time.sleep(0.1)
        log.warning("domain %s still known to libvirt %.0fs after destroy", self.name, timeout)


def _quiet_libvirt() -> None:
    """libvirt prints every error to stderr by default (e.g. each "agent is not connected" while
    booting); they reach us as exceptions anyway."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, err: log.debug("libvirt: %s", err), None)


@atexit.register
def _destroy_leftovers() -> None:
    for guest in list(_live):
        with contextlib.suppress(Exception):
            guest.close()
