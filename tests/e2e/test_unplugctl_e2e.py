"""unplugctl end to end: a real guest (q35, TCG) with the agent on virtio-serial, QEMU through QMP.

A mounted data disk is BLOCKED_BY_GUEST and is not unplugged; an idle one is
unplugged: QEMU sends DEVICE_DELETED after the guest's hotplug driver ejects
it, and the agent confirms it gone. With --prepare the agent leases the idle
disk first (the kernel then refuses to mount it) and releases the lease.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.conftest import require_vm_tools
from tests.e2e.real_kernel import unplugctl_process
from tests.vm import MUTATIONS_CONFIG, GuestVM, disk_on_root_port

CONFIG = MUTATIONS_CONFIG


@pytest.fixture(scope="module")
def vm() -> Iterator[GuestVM]:
    require_vm_tools()
    devices = [
        disk_on_root_port("idle", chassis=1),
        disk_on_root_port("busy", chassis=2),
        disk_on_root_port("leased", chassis=3),
    ]
    with GuestVM("q35", devices=devices, config=CONFIG, name="unplugd-e2e-unplugctl") as guest:
        guest.wait_booted(timeout=600)
        guest.exec(
            "mkfs.ext4 -q /dev/disk/by-id/virtio-busy && mkdir -p /mnt/busy "
            "&& mount /dev/disk/by-id/virtio-busy /mnt/busy",
            check=True,
            timeout=120,
        )
        yield guest


def unplugctl(vm: GuestVM, *args: str, timeout: float = 180) -> tuple[int, str, str]:
    return unplugctl_process(vm, *args, timeout=timeout)


def test_status_sees_the_guest(vm: GuestVM) -> None:
    rc, out, err = unplugctl(vm, "status", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["guestReachable"], doc["guestError"]
    verdicts = {f["host"]["id"]: s["verdict"] for s in doc["slots"] for f in s["functions"] if f["host"]}
    assert verdicts["idle"] == "UNPLUGGABLE"
    assert verdicts["busy"] == "BLOCKED_BY_GUEST"


def test_status_text_shows_the_disks_and_folds_the_rest(vm: GuestVM) -> None:
    """On q35 the root ports, host bridge and ICH9 functions fold into one line; the disks show,
    one line each, named for both sides (id and the guest's disk)."""
    rc, out, err = unplugctl(vm, "status")
    assert rc == 0, err
    lines = out.splitlines()
    rows = {line.split()[0]: line for line in lines if line.startswith("0000:")}
    mine = {dev: next((r for r in rows.values() if f" {dev} (guest vd" in r), "") for dev in ("idle", "busy")}
    assert "UNPLUGGABLE" in mine["idle"] and "BLOCKED_BY_GUEST" in mine["busy"], out
    assert not any("pcie-root-port" in r or " mch " in r for r in rows.values()), out
    assert any(line.startswith("+ ") and "infrastructure slot(s) not shown" in line for line in lines), out
    assert "NO_HOTPLUG_DRIVER" not in out and "\x1b" not in out  # no colour into a pipe
    rc, every, err = unplugctl(vm, "status", "--all", "-v")
    assert rc == 0, err
    assert sum(line.startswith("0000:") for line in every.splitlines()) > len(rows)


def test_mounted_disk_is_blocked_and_stays(vm: GuestVM) -> None:
    rc, out, err = unplugctl(vm, "check", "busy")
    assert rc == 3, out + err
    assert "MOUNTED" in out
    rc, out, err = unplugctl(vm, "unplug", "busy", "--timeout", "60")
    assert rc == 3 and "REFUSED" in out, out + err
    ids = {d.get("qdev_id") for bus in vm.qmp("query-pci") for d in _walk(bus["devices"])}
    assert "busy" in ids
    assert vm.exec("mountpoint -q /mnt/busy").rc == 0


def test_idle_disk_is_unplugged_and_confirmed(vm: GuestVM) -> None:
    rc, out, err = unplugctl(vm, "unplug", "idle", "--timeout", "120", "--json")
    assert rc == 0, out + err
    doc = json.loads(out)
    assert doc["outcome"] == "UNPLUGGED"
    assert [(f["name"], f["removed"], f["guestGone"]) for f in doc["functions"]] == [("idle", True, True)]
    assert "deleted" in err  # progress on stderr
    assert vm.exec("test -e /dev/disk/by-id/virtio-idle").rc != 0


def test_prepare_leases_then_unplugs(vm: GuestVM) -> None:
    rc, out, err = unplugctl(vm, "unplug", "leased", "--prepare", "--timeout", "120", "--json")
    assert rc == 0, out + err
    doc = json.loads(out)
    assert doc["outcome"] == "UNPLUGGED" and doc["leaseLabel"], doc
    assert "prepared" in err


def _walk(devices: list[dict]) -> Iterator[dict]:  # type: ignore[type-arg]
    for d in devices:
        yield d
        yield from _walk(d.get("pci_bridge", {}).get("devices", []))
