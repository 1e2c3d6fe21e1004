"""Start QEMU (TCG, no guest OS) with a PCI layout, for the QMP backend's tests and fixture capture.

Firmware (SeaBIOS) numbers the buses a moment after start; with `enumerate=False`
the VM stays stopped (-S) and every bridge's bus number is still 0, which is
exactly the case the PCI-path join has to get right.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

QEMU = "qemu-system-x86_64"


def _disk(dev_id: str, **props: str) -> list[str]:
    opts = "".join(f",{k}={v}" for k, v in props.items())
    return [
        "-drive",
        f"if=none,id=drv-{dev_id},file=null-co://,format=raw",
        "-device",
        f"virtio-blk-pci,id={dev_id},drive=drv-{dev_id}{opts}",
    ]


def _nic(dev_id: str, **props: str) -> list[str]:
    opts = "".join(f",{k}={v}" for k, v in props.items())
    return [
        "-netdev",
        f"user,id=nd-{dev_id},restrict=on",
        "-device",
        f"virtio-net-pci,id={dev_id},netdev=nd-{dev_id}{opts}",
    ]


# machine -> QEMU arguments after -machine. Ids say what each device is there for.
MACHINES: dict[str, tuple[str, list[str]]] = {
    "pc": (
        "pc",
        [
            *_disk("mf-disk", addr="0x6.0", multifunction="on"),
            *_nic("mf-net", addr="0x6.1"),
            *_nic("net0", addr="0x7"),
            "-device",
            "pci-bridge,id=br1,chassis_nr=1,addr=0x3",
            *_disk("br-disk", bus="br1", addr="0x5"),
            "-device",
            "pci-bridge,id=br2,chassis_nr=2,bus=br1,addr=0x7",
            *_nic("br2-net", bus="br2", addr="0x1"),
            "-device",
            "pci-bridge,id=br-shpc,chassis_nr=3,shpc=on,addr=0x8",
            *_disk("shpc-disk", bus="br-shpc", addr="0x2"),
        ],
    ),
    "q35": (
        "q35",
        [
            # eight root ports in one multifunction slot, the way libvirt lays them out
            "-device",
            "pcie-root-port,id=rp1,chassis=1,addr=0x2.0,multifunction=on",
            *[a for i in range(2, 9) for a in ("-device", f"pcie-root-port,id=rp{i},chassis={i},addr=0x2.{i - 1}")],
            *_disk("rp-disk", bus="rp1"),
            "-device",
            "pcie-root-port,id=rp-off,chassis=20,hotplug=off,addr=0x4",
            *_nic("off-net", bus="rp-off"),
            # a multifunction device behind a hotplug-capable root port
            *_disk("mf-disk", bus="rp2", addr="0x0.0", multifunction="on"),
            *_nic("mf-net", bus="rp2", addr="0x0.1"),
            # integrated endpoint on pcie.0
            *_nic("int-net", addr="0x6"),
            # dmi-to-pci bridge, pci-bridge behind it, a disk behind that
            "-device",
            "i82801b11-bridge,id=dmi,addr=0x1e",
            "-device",
            "pci-bridge,id=pb1,chassis_nr=30,bus=dmi,addr=0x1",
            *_disk("pb-disk", bus="pb1", addr="0x3"),
            # a switch: upstream port on rp3, downstream port, a disk behind it
            "-device",
            "x3130-upstream,id=up1,bus=rp3",
            "-device",
            "xio3130-downstream,id=dp1,bus=up1,chassis=40,slot=0",
            *_disk("sw-disk", bus="dp1"),
            # an expander root complex with a root port and a NIC
            "-device",
            "pxb-pcie,id=pxb1,bus_nr=128,bus=pcie.0,addr=0x9",
            "-device",
            "pcie-root-port,id=rpx,chassis=50,bus=pxb1",
            *_nic("pxb-net", bus="rpx"),
        ],
    ),
}


@dataclass
class Qemu:
    proc: subprocess.Popen[bytes]
    qmp: str
    workdir: Path
    machine: str
    argv: list[str]


def have_qemu() -> bool:
    return shutil.which(QEMU) is not None


@contextlib.contextmanager
def run_qemu(name: str, *, enumerate: bool = True, extra: list[str] | None = None) -> Iterator[Qemu]:
    """QEMU with MACHINES[name]; stopped before firmware if enumerate=False. Always killed."""
    machine, args = MACHINES[name]
    workdir = Path(tempfile.mkdtemp(prefix=f"unplugd-qemu-{name}-"))
    qmp = str(workdir / "qmp.sock")
    argv = [
        QEMU,
        "-machine",
        machine,
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        "128",
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
        *args,
        *(extra or []),
    ]
    if not enumerate:
        argv.append("-S")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(qmp):
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"QEMU exited: {err}")
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU did not create its QMP socket")
            time.sleep(0.05)
        if enumerate:
            asyncio.run(_wait_enumerated(qmp))
        yield Qemu(proc, qmp, workdir, machine, argv)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def _wait_enumerated(qmp: str, timeout: float = 30.0) -> None:
    """Until SeaBIOS has given every bridge a secondary bus number (query-pci, no sleep loop on the guest)."""
    from qemu.qmp import QMPClient

    client = QMPClient("wait")
    await client.connect(qmp)
    try:
        deadline = time.monotonic() + timeout
        while True:
            buses = await client.execute("query-pci")
            if _all_numbered(buses):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("firmware did not number the PCI buses")
            await asyncio.sleep(0.2)
    finally:
        await client.disconnect()


def _all_numbered(buses: object) -> bool:
    def walk(devs: list[dict[str, object]]) -> bool:
        for d in devs:
            br = d.get("pci_bridge")
            if isinstance(br, dict):
                bus = br.get("bus")
                if not isinstance(bus, dict) or not bus.get("secondary"):
                    return False
                if not walk(br.get("devices") or []):
                    return False
        return True

    return isinstance(buses, list) and all(walk(b.get("devices") or []) for b in buses)
