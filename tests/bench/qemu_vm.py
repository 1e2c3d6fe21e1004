"""A QEMU process (TCG, no guest OS) whose PCI layout is a generated tree's, and a small QMP client.

Every function of the tree (but its host bridge) becomes a device at the same
place: pci-bridge for bridges, virtio-blk-pci (null-co drive) for disks,
virtio-net-pci (no backend) for NICs, pci-testdev for driverless functions.
Device ids name the tree's BDF (fn-BB-SS-F), so a fake guest agent serving
the tree answers for exactly the functions QEMU has. Machine `pc`: PIIX3
keeps slot 1, so the tree must start at slot 2 (TreeSpec.first_root_slot).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.bench.gen_tree import GeneratedTree, PciFn
from tests.bench.measure import spawn, stop

__all__ = ["QmpSync", "device_id", "qemu_argv", "running_qemu"]

QEMU = "qemu-system-x86_64"


def device_id(fn: PciFn) -> str:
    return f"fn-{fn.bus:02x}-{fn.slot:02x}-{fn.function}"


def _bridge_id(fn: PciFn) -> str:
    return f"br{fn.secondary_bus}"


def qemu_argv(tree: GeneratedTree, qmp: Path) -> list[str]:
    by_bdf = {f.bdf: f for f in tree.pci}
    slot_sizes: dict[tuple[str | None, int], int] = {}
    for f in tree.pci:
        key = (f.parent_bdf, f.slot)
        slot_sizes[key] = slot_sizes.get(key, 0) + 1
    argv = [
        QEMU,
        "-machine",
        "pc,accel=tcg",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        "256",
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
    ]
    for f in tree.pci:
        if f.kind == "host":
            continue
        parent = by_bdf[f.parent_bdf] if f.parent_bdf else None
        bus = _bridge_id(parent) if parent else "pci.0"
        addr = f"addr=0x{f.slot:02x}.{f.function}"
        if f.function == 0 and slot_sizes[(f.parent_bdf, f.slot)] > 1:
            addr += ",multifunction=on"
        if f.kind == "bridge":
            dev = f"pci-bridge,id={_bridge_id(f)},chassis_nr={f.secondary_bus},bus={bus},{addr}"
        elif f.kind == "blk":
            argv += ["-drive", f"if=none,id=drv-{device_id(f)},file=null-co://,format=raw"]
            dev = f"virtio-blk-pci,id={device_id(f)},drive=drv-{device_id(f)},bus={bus},{addr}"
        elif f.kind == "net":
            dev = f"virtio-net-pci,id={device_id(f)},bus={bus},{addr}"
        else:
            dev = f"pci-testdev,id={device_id(f)},bus={bus},{addr}"
        argv += ["-device", dev]
    return argv


class QmpSync:
    """Blocking QMP over a unix socket: enough for the bench's own look-ups."""

    def __init__(self, path: Path, timeout_s: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rwb")
        json.loads(self._file.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._file.write(json.dumps(msg).encode() + b"\n")
        self._file.flush()
        while True:
            reply = json.loads(self._file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error'].get('desc')}")
            return reply["return"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def _count(devices: list[dict[str, Any]]) -> tuple[int, int]:
    """(functions, bridges with a bus number assigned) in a query-pci device list."""
    total, numbered = 0, 0
    for d in devices:
        total += 1
        bridge = d.get("pci_bridge")
        if bridge:
            if bridge.get("bus", {}).get("secondary", 0):
                numbered += 1
            sub_total, sub_numbered = _count(bridge.get("devices", []))
            total += sub_total
            numbered += sub_numbered
    return total, numbered


@contextlib.contextmanager
def running_qemu(tree: GeneratedTree, timeout_s: float = 60.0) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    """QEMU with the tree's layout, after SeaBIOS numbered the buses: (process, QMP socket, functions)."""
    bridges = sum(1 for f in tree.pci if f.kind == "bridge")
    with tempfile.TemporaryDirectory(prefix="unplugd-bench-qemu-") as tmp:
        qmp = Path(tmp) / "qmp.sock"
        log = Path(tmp) / "qemu.log"
        with open(log, "wb") as log_file:
            proc = spawn(qemu_argv(tree, qmp), stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while not qmp.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(f"QEMU did not start: {' / '.join(tail)}")
                time.sleep(0.05)
            client = QmpSync(qmp)
            try:
                while True:
                    total, numbered = 0, 0
                    for bus in client.execute("query-pci"):
                        t, n = _count(bus["devices"])
                        total, numbered = total + t, numbered + n
                    if numbered >= bridges or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
            finally:
                client.close()
            yield proc, qmp, total
        finally:
            stop(proc)
