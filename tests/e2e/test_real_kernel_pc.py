"""pc (i440fx) on the real kernel: ACPI hotplug behind a pci-bridge, and a slot the guest has no hotplug
driver for (issue 10).

QEMU's PIIX4 ACPI hotplug is switched off for the root bus (acpi-root-pci-hotplug=off) and left on for
bridges, so in the guest acpiphp drives the pci-bridge's slots and nothing drives pci.0's: a device_del
of a root-bus device would never complete. So: the root-bus disk is BUSY (NO_HOTPLUG_DRIVER) and unplugctl refuses it;
the disk behind the bridge is READY, is unplugged, and the agent confirms it gone.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require_vm_tools
from tests.e2e.real_kernel import CONFIG, FIGURES, unplugctl
from tests.vm import GuestVM, pci_bridge, virtio_disk

BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
NO_ROOT_HOTPLUG = ("-global", "PIIX4_PM.acpi-root-pci-hotplug=off")


@pytest.fixture(scope="module")
def vm() -> Iterator[GuestVM]:
    require_vm_tools()
    devices = [
        pci_bridge("br0", chassis_nr=1, addr="0x5"),
        virtio_disk("dbridged", bus="br0", addr="0x1"),
        virtio_disk("dbusy", bus="br0", addr="0x2"),
        virtio_disk("droot", addr="0x6"),
    ]
    started = time.monotonic()
    with GuestVM("pc", NO_ROOT_HOTPLUG, devices, config=CONFIG, name="unplugd-e2e-realkernel-pc") as guest:
        guest.wait_booted(timeout=900)
        guest.exec("mkfs.ext4 -q /dev/disk/by-id/virtio-dbusy && mkdir -p /mnt/busy "
                   "&& mount /dev/disk/by-id/virtio-dbusy /mnt/busy", check=True, timeout=300)  # fmt: skip
        FIGURES.append(f"pc real-kernel guest: boot and setup {time.monotonic() - started:.0f} s")
        yield guest
    FIGURES.append(f"pc real-kernel guest: whole module {time.monotonic() - started:.0f} s")


def test_the_agent_reached_its_port_after_boot(vm: GuestVM) -> None:
    """The installed package on an i440fx guest: after the boot the agent serves its virtio-serial port
    (the unit's device list was resolved after virtio_console loaded: the udev rule saw to it)."""
    assert vm.exec("systemctl is-active unplugd.service").stdout.strip() == "active"
    journal = vm.exec("journalctl -b -u unplugd.service --no-pager -o cat", timeout=60).stdout
    assert "Operation not permitted" not in journal, journal
    rc, out, err = unplugctl(vm, "status")
    assert rc == 0, out + err


def bdf_of(vm: GuestVM, serial: str) -> str:
    out = vm.exec(f"readlink -f /sys/block/$(basename $(readlink -f /dev/disk/by-id/virtio-{serial}))", check=True)
    return [p for p in out.stdout.strip().split("/") if BDF.match(p)][-1]


def report(vm: GuestVM) -> dict[str, dict[str, Any]]:
    out = vm.exec("unplugd inspect --json", check=True, timeout=180).stdout
    return {f["address"]: f for f in json.loads(out)["functions"]}


def codes(f: dict[str, Any]) -> set[str]:
    return {r["code"].removeprefix("REASON_CODE_") for r in f.get("reasons", []) if r.get("blocking")}


def test_acpiphp_drives_the_bridge_slots_and_not_the_root_bus(vm: GuestVM) -> None:
    slots = vm.exec("for s in /sys/bus/pci/slots/*; do echo $(cat $s/address) $(basename $(readlink $s/module)); done",
                    check=True).stdout.split("\n")  # fmt: skip
    bridged, root = bdf_of(vm, "dbridged"), bdf_of(vm, "droot")
    assert f"{bridged[:-2]} acpiphp" in slots, slots
    assert not any(line.startswith(root[:-2] + " ") for line in slots), slots


def test_root_bus_disk_has_no_hotplug_driver(vm: GuestVM) -> None:
    f = report(vm)[bdf_of(vm, "droot")]
    assert f["state"] == "FUNCTION_STATE_BUSY"
    assert codes(f) == {"NO_HOTPLUG_DRIVER"}
    (reason,) = f["reasons"]
    assert reason["object"] == bdf_of(vm, "droot")


def test_behind_the_bridge_one_disk_is_ready_and_one_is_mounted(vm: GuestVM) -> None:
    functions = report(vm)
    assert functions[bdf_of(vm, "dbridged")]["state"] == "FUNCTION_STATE_READY"
    busy = functions[bdf_of(vm, "dbusy")]
    assert codes(busy) == {"MOUNTED"} and "/mnt/busy" in busy["reasons"][0]["detail"]


def test_unplugctl_refuses_what_the_guest_could_never_release(vm: GuestVM) -> None:
    # QEMU's own acpi-root-pci-hotplug=off is visible to the host too (NOT_HOTPLUGGABLE, exit 5); the
    # guest says why on its side. The mounted disk behind the bridge is the guest's call alone (exit 3).
    # Under NOT_HOTPLUGGABLE the guest's NO_HOTPLUG_DRIVER is implied, so its words, not its code, show.
    cases = (("droot", 5, ("NOT_HOTPLUGGABLE", "an unplug request would never complete")), ("dbusy", 3, ("MOUNTED",)))
    for qid, rc_want, codes_want in cases:
        rc, out, err = unplugctl(vm, "unplug", qid, "--timeout", "30")
        assert rc == rc_want and "REFUSED" in out, out + err
        assert all(code in out for code in codes_want), out
    assert vm.exec("test -b /dev/disk/by-id/virtio-droot && mountpoint -q /mnt/busy").rc == 0


def test_the_disk_behind_the_bridge_is_unplugged_through_acpi(vm: GuestVM) -> None:
    rc, out, err = unplugctl(vm, "unplug", "dbridged", "--timeout", "120", "--json")
    assert rc == 0, out + err
    doc = json.loads(out)
    assert doc["outcome"] == "UNPLUGGED"
    assert [(f["name"], f["removed"], f["guestGone"]) for f in doc["functions"]] == [("dbridged", True, True)]
    assert vm.exec("test -e /dev/disk/by-id/virtio-dbridged").rc != 0
