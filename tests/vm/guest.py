"""GuestVM: boot the unplugd guest image under QEMU (TCG) for end-to-end tests.

    with GuestVM("q35", devices=[disk_on_root_port("data0", chassis=1)]) as vm:
        vm.wait_booted()
        rc, out, err = vm.exec("unplugd inspect --json")
        ...  # vm.qmp_socket for a qemu.qmp client, vm.agent_socket for unplugctl

What a VM gets, besides the devices a test asks for:
- the root disk: a throwaway qcow2 overlay on the cached image, on the chipset's built-in
  AHCI (q35) or IDE (pc) controller, so it is no hotpluggable PCI function;
- a virtio-serial controller `vser0` (q35: integrated on pcie.0, pc: pci.0, both at SERIAL_ADDR)
  with the ports org.qemu.guest_agent.0 (qga_socket) and org.unplugd.agent.0 (agent_socket);
- two QMP monitors: qmp_socket for the test, a private one for the harness (quit, powerdown,
  device_del helpers);
- the serial console on console_socket, logged to serial_log;
- the project's guest packages (built from the work tree) installed the way a user installs them:
  the root disk is an overlay of a stock guest into which install.py `dpkg -i`d them, wrote the
  config and powered off, so every boot here is the reboot after an install (packages=None: the
  stock guest, nothing of ours on it).

QEMU never outlives the harness: besides the context manager and an atexit hook, a small watcher
process kills QEMU's process group as soon as the process that started it dies, even by SIGKILL.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self

from tests.vm.devices import DataDisk, Device
from tests.vm.image import GuestImage, build_image, guest_debs
from tests.vm.monitor import Monitor, MonitorError
from tests.vm.qga import ExecResult, GuestAgent, GuestAgentError

__all__ = [
    "DEFAULT_GUEST_CONFIG",
    "MUTATIONS_CONFIG",
    "SERIAL_ADDR",
    "BootTimeout",
    "GuestBase",
    "GuestVM",
    "VMError",
    "run_tool",
    "watch_process_group",
]

log = logging.getLogger(__name__)

QEMU = os.environ.get("UNPLUGD_QEMU", "qemu-system-x86_64")
SERIAL_ADDR = "0x1e"
QGA_PORT = "org.qemu.guest_agent.0"
AGENT_PORT = "org.unplugd.agent.0"
PROGRESS_EVERY = 15.0
# What a test guest's administrator writes to /etc/unplugd/config.toml; None keeps the package's.
DEFAULT_GUEST_CONFIG: str | None = None
# For tests that prepare leases. One text for all of them: each distinct config costs one install boot.
MUTATIONS_CONFIG = "[mutations]\nenabled = true\n"
# "build": the work tree's guest packages; paths: those .debs; None: the stock guest, nothing of ours.
Packages = Literal["build"] | Sequence[Path] | None

_live: weakref.WeakSet[GuestVM] = weakref.WeakSet()

# Reads stdin until EOF (the harness process died or closed the pipe), then kills QEMU's group
# and, if given, removes the VM's work directory once QEMU is gone.
_WATCHER = (
    "import os, shutil, signal, sys, time\n"
    "pgid = int(sys.argv[1])\n"
    "while os.read(0, 1):\n"
    "    pass\n"
    "try:\n"
    "    os.killpg(pgid, signal.SIGKILL)\n"
    "except OSError:\n"
    "    pass\n"
    "for _ in range(100):\n"
    "    try:\n"
    "        os.kill(pgid, 0)\n"
    "    except OSError:\n"
    "        break\n"
    "    time.sleep(0.05)\n"
    "if len(sys.argv) > 2:\n"
    "    shutil.rmtree(sys.argv[2], ignore_errors=True)\n"
)


class VMError(Exception):
    """QEMU failed to start, died, or the guest misbehaved."""


class BootTimeout(VMError):
    """The guest did not become ready in time."""


def progress(msg: str) -> None:
    print(f"[vm] {msg}", file=sys.stderr, flush=True)


class GuestBase:
    """What every test guest has, whatever starts it (QEMU here, libvirt in libvirt_domain.py): a work
    directory with the root overlay, data disks, the agent .deb and its config; `with` support; the
    boot wait. Subclasses provide start(), close(), exec(), _check_alive() and _guest_agent()."""

    def __init__(
        self,
        *,
        name: str,
        memory_mb: int,
        cpus: int,
        image: GuestImage | None,
        packages: Packages,
        config: str | None,
        keep_workdir: bool | None,
        workdir_prefix: str,
    ) -> None:
        self.name = name
        self.memory_mb = memory_mb
        self.cpus = cpus
        self._image = image
        self._packages = packages
        self._config = config
        self.keep_workdir = keep_workdir if keep_workdir is not None else os.environ.get("UNPLUGD_VM_KEEP") == "1"
        # Short: the channel sockets must fit a unix socket path (108 bytes).
        self.workdir = Path(tempfile.mkdtemp(prefix=workdir_prefix))
        self.qga_socket = self.workdir / "qga.sock"
        self.agent_socket = self.workdir / "agent.sock"
        self.serial_log = self.workdir / "serial.log"
        self.boot_seconds: float | None = None
        self._started_at = 0.0

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)

    def start(self) -> None:
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        raise NotImplementedError

    def _check_alive(self) -> None:
        raise NotImplementedError

    def _guest_agent(self) -> GuestAgent:
        raise NotImplementedError

    def exec(self, cmd: str | Sequence[str], timeout: float = 60.0) -> ExecResult:
        raise NotImplementedError

    @property
    def image(self) -> GuestImage:
        if self._image is None:
            self._image = build_image()
        return self._image

    def _prepare_files(self, disks: Iterable[DataDisk], root_disk: Path | None = None) -> None:
        """The root disk (root_disk itself, or an overlay of the installed or stock guest) and empty
        data disks."""
        w = self.workdir
        if root_disk is None:
            backing, fmt = self.root_backing()
            run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", fmt, str(w / "root.qcow2")])
        else:
            (w / "root.qcow2").symlink_to(root_disk)
        for disk in disks:
            run_tool(["qemu-img", "create", "-q", "-f", "qcow2", str(w / disk.name), disk.size])

    def root_backing(self) -> tuple[Path, str]:
        """(disk, format) the root overlay sits on: the stock image, or a guest with our packages
        installed (built once per process and config, see install.py)."""
        if self._packages is None:
            return self.image.disk, "raw"
        from tests.vm.install import installed_root

        debs = guest_debs() if self._packages == "build" else tuple(Path(p) for p in self._packages)
        return installed_root(debs, self._config, self.image), "qcow2"

    def wait_booted(self, timeout: float = 300.0) -> float:
        """Wait until qemu-ga answers and systemd finished booting; return seconds since start.

        A degraded boot (some unit failed, e.g. an agent still under construction) counts as booted;
        the failed units are logged.
        """
        qga = self._guest_agent()
        self.boot_seconds = wait_for_boot(self, qga, self._started_at or time.monotonic(), timeout)
        return self.boot_seconds


class GuestVM(GuestBase):
    def __init__(
        self,
        machine: Literal["q35", "pc"] = "q35",
        extra_args: Sequence[str] = (),
        devices: Iterable[Device] = (),
        *,
        memory_mb: int = 1024,
        cpus: int = 1,
        image: GuestImage | None = None,
        packages: Packages = "build",
        config: str | None = DEFAULT_GUEST_CONFIG,
        name: str = "unplugd-guest",
        keep_workdir: bool | None = None,
        root_disk: Path | None = None,
        allow_reboot: bool = False,
    ) -> None:
        """Describe a VM; nothing runs until start() or `with`.

        packages: "build" installs the work tree's guest packages (once per test process and config,
        then every VM boots an overlay of that installed guest), paths install those .debs, None
        boots the stock guest. config: TOML text the administrator wrote to /etc/unplugd/config.toml
        after installing (None keeps the package's). root_disk: boot this disk itself, writable,
        instead of an overlay. allow_reboot: a guest reboot restarts the VM instead of ending QEMU.
        keep_workdir: keep logs and sockets after exit (default: only when UNPLUGD_VM_KEEP=1).
        """
        if machine not in ("q35", "pc"):
            raise ValueError(f"machine must be q35 or pc, not {machine!r}")
        super().__init__(
            name=name,
            memory_mb=memory_mb,
            cpus=cpus,
            image=image,
            packages=packages,
            config=config,
            keep_workdir=keep_workdir,
            workdir_prefix="unplugd-vm-",
        )
        self.root_disk = root_disk
        self.allow_reboot = allow_reboot
        self.machine = machine
        self.extra_args = tuple(extra_args)
        self.device = Device.join(devices)
        self.qmp_socket = self.workdir / "qmp.sock"
        self.console_socket = self.workdir / "console.sock"
        self.qemu_log = self.workdir / "qemu.log"
        self._monitor_socket = self.workdir / "monitor.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._watcher: subprocess.Popen[bytes] | None = None
        self._watch_fd: int | None = None
        self._monitor: Monitor | None = None
        self._qga = GuestAgent(self.qga_socket)

    # -- lifecycle --

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command_line(self) -> list[str]:
        """The full QEMU command line (after start() has prepared the work directory)."""
        img = self.image
        w = self.workdir
        bus = "pcie.0" if self.machine == "q35" else "pci.0"
        cmd = [
            QEMU,
            "-name",
            f"{self.name},debug-threads=on",
            "-machine",
            self.machine,
            "-accel",
            "tcg",
            "-m",
            str(self.memory_mb),
            "-smp",
            str(self.cpus),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-vga",
            "none",
            "-kernel",
            str(img.kernel),
            "-initrd",
            str(img.initrd),
            "-append",
            img.cmdline,
            "-drive",
            f"file={w}/root.qcow2,if=ide,index=0,format=qcow2,cache=unsafe",
            "-chardev",
            f"socket,id=con0,path={self.console_socket},server=on,wait=off,logfile={self.serial_log}",
            "-serial",
            "chardev:con0",
            "-chardev",
            f"socket,id=mon0,path={self._monitor_socket},server=on,wait=off",
            "-mon",
            "chardev=mon0,mode=control",
            "-chardev",
            f"socket,id=qmp0,path={self.qmp_socket},server=on,wait=off",
            "-mon",
            "chardev=qmp0,mode=control",
            "-device",
            f"virtio-serial-pci,id=vser0,bus={bus},addr={SERIAL_ADDR}",
            "-chardev",
            f"socket,id=qga0,path={self.qga_socket},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,nr=1,chardev=qga0,name={QGA_PORT}",
            "-chardev",
            f"socket,id=agent0,path={self.agent_socket},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,nr=2,chardev=agent0,name={AGENT_PORT}",
            "-pidfile",
            str(w / "qemu.pid"),
        ]
        if not self.allow_reboot:
            cmd.append("-no-reboot")
        cmd += [arg.replace("{workdir}", str(w)) for arg in self.device.args]
        cmd += list(self.extra_args)
        return cmd

    def start(self) -> None:
        if self._proc is not None:
            raise VMError("already started")
        self._prepare_files(self.device.disks, self.root_disk)
        cmd = self.command_line()
        (self.workdir / "cmdline.txt").write_text(" ".join(cmd) + "\n")
        log.info("starting %s", " ".join(cmd))
        with open(self.qemu_log, "wb") as out:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._started_at = time.monotonic()
        _live.add(self)
        self._start_watcher(self._proc.pid)
        self._monitor = self._connect_monitor(timeout=30.0)
        progress(f"started QEMU pid {self._proc.pid} ({self.machine}, TCG), workdir {self.workdir}")

    def _start_watcher(self, pgid: int) -> None:
        self._watcher, self._watch_fd = watch_process_group(pgid, None if self.keep_workdir else self.workdir)

    def _connect_monitor(self, timeout: float) -> Monitor:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            if self._monitor_socket.exists():
                try:
                    return Monitor(self._monitor_socket)
                except MonitorError as exc:
                    last = exc
            time.sleep(0.05)
        raise VMError(f"QEMU monitor did not come up in {timeout:.0f}s: {last}")

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise VMError(
                f"QEMU exited with code {self._proc.returncode}:\n{_tail(self.qemu_log, 20)}\n"
                f"--- serial console ---\n{_tail(self.serial_log, 30)}"
            )

    def _guest_agent(self) -> GuestAgent:
        return self._qga

    # -- inside the guest --

    def exec(
        self,
        cmd: str | Sequence[str],
        timeout: float = 60.0,
        *,
        input: bytes | str | None = None,
        env: Sequence[str] | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Run a command in the guest through qemu-guest-agent: (rc, stdout, stderr).

        A string runs under /bin/sh -c; a sequence is run as argv. check=True raises VMError on rc != 0.
        """
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        data = input.encode() if isinstance(input, str) else input
        self._check_alive()
        try:
            result = self._qga.exec(argv, timeout=timeout, input=data, env=env)
        except GuestAgentError as exc:
            self._check_alive()
            raise VMError(f"guest exec {argv!r}: {exc}") from exc
        if check and result.rc != 0:
            raise VMError(f"guest command {argv!r} failed with {result.rc}:\n{result.stdout}{result.stderr}")
        return result

    def qga(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Any qemu-guest-agent command, e.g. qga("guest-get-fsinfo")."""
        return self._qga.call(command, arguments, timeout)

    def read_file(self, path: str, timeout: float = 30.0) -> str:
        return self.exec(["cat", path], timeout=timeout, check=True).stdout

    # -- the harness' own monitor --

    def qmp(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """A QMP command on the harness' private monitor (tests may use qmp_socket with their own client)."""
        if self._monitor is None:
            raise VMError("VM not started")
        return self._monitor.execute(command, arguments, timeout)

    def wait_event(self, name: str, timeout: float = 60.0, **data: Any) -> dict[str, Any]:
        """Wait for a QMP event on the private monitor whose data contains every given key/value."""
        if self._monitor is None:
            raise VMError("VM not started")
        return self._monitor.wait_event(
            name, timeout, lambda ev: all(ev.get("data", {}).get(k) == v for k, v in data.items())
        )

    def device_del(self, qid: str, timeout: float = 60.0) -> float:
        """device_del and wait for its DEVICE_DELETED; return the seconds it took."""
        start = time.monotonic()
        self.qmp("device_del", {"id": qid})
        self.wait_event("DEVICE_DELETED", timeout, device=qid)
        return time.monotonic() - start

    def reboot(self, timeout: float = 300.0) -> float:
        """Reboot the guest (needs allow_reboot) and wait until the new boot has finished booting."""
        if not self.allow_reboot:
            raise VMError("reboot needs GuestVM(allow_reboot=True); without it QEMU exits")
        old_boot = self.read_file("/proc/sys/kernel/random/boot_id").strip()
        try:
            self._qga.send("guest-shutdown", {"mode": "reboot"})
        except GuestAgentError as exc:
            raise VMError(f"guest-shutdown (reboot): {exc}") from exc
        self._started_at = time.monotonic()
        deadline = self._started_at + timeout
        while True:  # the old boot may answer qemu-ga for a moment after the reboot was queued
            self._check_alive()
            with contextlib.suppress(VMError):
                boot = self.exec(["cat", "/proc/sys/kernel/random/boot_id"], timeout=5).stdout.strip()
                if boot not in ("", old_boot):
                    break
            if time.monotonic() > deadline:
                raise BootTimeout(f"guest did not come back from a reboot in {timeout:.0f}s")
            time.sleep(1.0)
        return self.wait_booted(timeout=timeout)  # measured from the reboot, like the first boot from start

    # -- teardown --

    def shutdown(self, timeout: float = 60.0) -> bool:
        """ACPI power-off and wait for QEMU to exit; kill it if it does not. True if it powered off."""
        if not self.running:
            return True
        with contextlib.suppress(MonitorError, OSError):
            self.qmp("system_powerdown")
        assert self._proc is not None
        try:
            self._proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            self.kill()
            return False

    def kill(self) -> None:
        """Stop QEMU now (no guest shutdown: the root disk is a throwaway overlay anyway)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(MonitorError, OSError):
                self.qmp("quit", timeout=2.0)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def close(self, failed: bool = False) -> None:
        """Kill QEMU, stop the watcher, remove the work directory (kept on request)."""
        self.kill()
        self._qga.close()
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self._watcher is not None:
            with contextlib.suppress(OSError):
                self._watcher.kill()
            self._watcher.wait(5)
            self._watcher = None
        if self._watch_fd is not None:
            os.close(self._watch_fd)
            self._watch_fd = None
        _live.discard(self)
        if failed:
            progress(f"VM failed; last console lines:\n{_tail(self.serial_log, 25)}")
        if self.keep_workdir or (failed and os.environ.get("UNPLUGD_VM_KEEP_FAILED") == "1"):
            progress(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def serial_text(self) -> str:
        return self.serial_log.read_text(errors="replace") if self.serial_log.exists() else ""


def watch_process_group(pgid: int, cleanup: Path | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Start a watcher that SIGKILLs process group pgid (then removes cleanup, a directory) once this
    process dies or closes the returned fd. Kill the watcher first to stop it without either.

    The caller keeps the pipe's write end (not inherited by children); the kernel closes it when the
    caller dies, however it dies, and the watcher's read then returns EOF.
    """
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-c", _WATCHER, str(pgid)] + ([str(cleanup)] if cleanup is not None else [])
    try:
        watcher = subprocess.Popen(argv, stdin=read_fd, start_new_session=True)
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return watcher, write_fd


def run_tool(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VMError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")


class _Booting(Protocol):
    serial_log: Path

    def _check_alive(self) -> None: ...

    def exec(self, cmd: list[str], timeout: float = 60.0) -> ExecResult: ...


def wait_for_boot(vm: _Booting, qga: GuestAgent, started_at: float, timeout: float) -> float:
    """Wait for qemu-ga, then for systemd to finish booting (degraded counts, failed units are logged).

    Shared by GuestVM (QEMU run by the harness) and LibvirtGuest (a libvirt domain). Returns the
    seconds since started_at.
    """
    deadline = started_at + timeout
    last_report = time.monotonic()
    while True:
        vm._check_alive()
        if qga.ping(timeout=2.0):
            break
        now = time.monotonic()
        if now > deadline:
            raise BootTimeout(
                f"qemu-ga not answering after {timeout:.0f}s\n--- serial console ---\n{_tail(vm.serial_log, 30)}"
            )
        if now - last_report >= PROGRESS_EVERY:
            last_report = now
            progress(f"booting: {now - started_at:.0f}s, console: {_last_line(vm.serial_log)}")
        time.sleep(0.5)
    ga_seconds = time.monotonic() - started_at
    remaining = max(5.0, deadline - time.monotonic())
    rc, out, _ = vm.exec(["systemctl", "is-system-running", "--wait"], timeout=remaining)
    state = out.strip()
    if state not in ("running", "degraded"):
        raise BootTimeout(f"systemd state {state!r} (rc {rc}) after {timeout:.0f}s")
    if state == "degraded":
        _, failed, _ = vm.exec(["systemctl", "--failed", "--no-legend", "--plain"], timeout=30)
        log.warning("guest booted degraded; failed units: %s", failed.strip())
        progress(f"guest booted degraded; failed units: {' '.join(failed.split()[:1]) or '?'}")
    boot_seconds = time.monotonic() - started_at
    progress(f"booted: qemu-ga after {ga_seconds:.1f}s, systemd {state} after {boot_seconds:.1f}s")
    return boot_seconds


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_bytes()[-16384:].decode(errors="replace")
    except OSError:
        return "(none)"
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])


def _last_line(path: Path) -> str:
    lines = [ln for ln in _tail(path, 5).splitlines() if ln.strip()]
    return lines[-1][:100] if lines else "(nothing yet)"


@atexit.register
def _kill_leftovers() -> None:
    for vm in list(_live):
        with contextlib.suppress(Exception):
            vm.close()
