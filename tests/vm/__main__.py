"""Boot a guest by hand and leave it running until Ctrl-C:

    .venv/bin/python -m tests.vm [--machine q35|pc] [--disks N] [--nics N] [--multifunction]

Prints the QMP socket, the agent's virtio-serial chardev socket (for `unplugctl --qmp ... --agent
serial:...`) and how to reach the serial console (root, no password).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from tests.vm.devices import (
    Device,
    disk_on_root_port,
    multifunction_slot,
    net_on_root_port,
    pcie_root_port,
    virtio_disk,
    virtio_net,
)
from tests.vm.guest import GuestVM


def build_devices(machine: str, disks: int, nics: int, multifunction: bool) -> list[Device]:
    devices: list[Device] = []
    chassis = 1
    for i in range(disks):
        devices.append(disk_on_root_port(f"disk{i}", chassis=chassis) if machine == "q35" else virtio_disk(f"disk{i}"))
        chassis += 1
    for i in range(nics):
        devices.append(net_on_root_port(f"nic{i}", chassis=chassis) if machine == "q35" else virtio_net(f"nic{i}"))
        chassis += 1
    if multifunction:
        if machine == "q35":
            port = pcie_root_port("rp-mf", chassis=chassis)
            devices.append(port + multifunction_slot("mfdisk", "mfnic", bus="rp-mf", slot=0))
        else:
            devices.append(multifunction_slot("mfdisk", "mfnic", slot=6))
    return devices


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.vm", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--machine", choices=["q35", "pc"], default="q35")
    p.add_argument("--disks", type=int, default=1)
    p.add_argument("--nics", type=int, default=1)
    p.add_argument("--multifunction", action="store_true", help="add a disk+NIC multifunction slot")
    args = p.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    devices = build_devices(args.machine, args.disks, args.nics, args.multifunction)
    with GuestVM(args.machine, devices=devices) as vm:
        vm.wait_booted()
        print(f"QMP:      {vm.qmp_socket}")
        print(f"agent:    serial:{vm.agent_socket}")
        print(f"qemu-ga:  {vm.qga_socket}")
        print(f"console:  socat -,raw,echo=0 UNIX-CONNECT:{vm.console_socket}   (log: {vm.serial_log})")
        print("Ctrl-C stops the VM.", flush=True)
        try:
            while not stop.wait(1) and vm.running:
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
