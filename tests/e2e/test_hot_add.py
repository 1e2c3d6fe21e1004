"""Hot-add on real guests (issue 11): `unplugctl slots` and `unplugctl plug`, confirmed by the agent.

One pc guest (ACPI hotplug: acpiphp on the root bus and behind a pci-bridge) and one q35 guest (empty
pcie-root-ports, one with hotplug=off, one taken) carry every scenario:
- `slots` against the real topology: free slots, whole 8-function room, and why other places cannot;
- pc: a 4-function slot (2 NICs, 2 disks, with their backends) into a free root-bus slot chosen by
  unplugctl, another from a TOML spec file into a slot behind the pci-bridge; the guest reports every
  function at its PCI path with its interface or disk; then used (mounted, link up), unplug refused,
  released, unplugged;
- pc: a spec QEMU rejects halfway (its netdev does not exist): the functions already added and their
  backends are removed again, and query-pci and the agent agree nothing is left;
- q35: a NIC into an empty root port; hotplug=off and an occupied port refused with the reason;
  a device the guest has no driver for: NO_DRIVER at the timeout, rolled back (function 0 had arrived,
  so the guest ejects the slot).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_vm_tools
from tests.e2e.real_kernel import CONFIG, FIGURES, unplugctl
from tests.vm import GuestVM, pci_bridge, pcie_root_port, virtio_disk
from unplugd.host.exitcodes import Exit

PLUG_TIMEOUT = "180"  # TCG on shared cores: enumerating, binding virtio and creating vdX takes tens of seconds


def _qcow2(vm: GuestVM, name: str) -> str:
    path = vm.workdir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "32M"], check=True)
    return str(path)


def _blockdev(vm: GuestVM, node: str) -> str:
    return f"driver=qcow2,node-name={node},file.driver=file,file.filename={_qcow2(vm, node)}"


def _json(out: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(out)
    return doc


def _report(vm: GuestVM) -> dict[str, dict[str, Any]]:
    out = vm.exec("unplugd inspect --json", check=True, timeout=180).stdout
    return {f["pciPath"]: f for f in json.loads(out)["functions"]}


def _query_pci_paths(vm: GuestVM) -> set[str]:
    """Every qdev id query-pci shows, at any depth."""
    ids: set[str] = set()

    def walk(devs: list[dict[str, Any]]) -> None:
        for d in devs:
            if d.get("qdev_id"):
                ids.add(d["qdev_id"])
            walk(d.get("pci_bridge", {}).get("devices", []))

    for bus in vm.qmp("query-pci"):
        walk(bus["devices"])
    return ids


# ------------------------------------------------------------------------------------------ pc


@pytest.fixture(scope="module")
def pc() -> Iterator[GuestVM]:
    require_vm_tools()
    started = time.monotonic()
    with GuestVM("pc", (), [pci_bridge("br0", chassis_nr=1, addr="0x5")], config=CONFIG,
                 name="unplugd-e2e-hotadd-pc") as vm:  # fmt: skip
        vm.wait_booted(timeout=900)
        FIGURES.append(f"pc hot-add guest: boot {time.monotonic() - started:.0f} s")
        yield vm
    FIGURES.append(f"pc hot-add guest: whole module {time.monotonic() - started:.0f} s")


def test_pc_slots_table_names_free_room_and_why_not(pc: GuestVM) -> None:
    rc, out, err = unplugctl(pc, "slots", "--json")
    assert rc == 0, out + err
    buses = {b["bus"]: b for b in _json(out)["buses"]}
    root, bridge = buses["pci.0"], buses["br0"]
    assert root["kind"] == "pci-root" and root["hotplug"] and root["wholeSlot"]
    taken = {o["slot"] for o in root["occupied"]}  # host bridge, PIIX, the bridge, virtio-serial
    assert {0, 1, 0x5, 0x1E} <= taken and not taken & set(root["freeSlots"]) and root["freeSlots"]
    assert bridge["kind"] == "pci-bridge" and bridge["freeSlots"] == list(range(1, 32))
    rc, table, err = unplugctl(pc, "slots")
    assert rc == 0 and "occupied: 0x00" in table and "br0" in table, table + err


def _plug_four(pc: GuestVM, tag: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    specs = [
        f"virtio-blk-pci,drive={tag}d0,id={tag}f0,serial={tag}f0",
        f"virtio-net-pci,netdev={tag}n1,id={tag}f1",
        f"virtio-blk-pci,drive={tag}d2,id={tag}f2,serial={tag}f2",
        f"virtio-net-pci,netdev={tag}n3,id={tag}f3",
    ]
    args = [f"--netdev=user,id={tag}n1,restrict=on", f"--netdev=user,id={tag}n3,restrict=on",
            f"--blockdev={_blockdev(pc, f'{tag}d0')}", f"--blockdev={_blockdev(pc, f'{tag}d2')}"]  # fmt: skip
    rc, out, err = unplugctl(pc, "plug", *specs, *args, *extra, "--timeout", PLUG_TIMEOUT, "--json")
    return rc, _json(out) if out.strip() else {}, err


def _assert_present(doc: dict[str, Any], pc: GuestVM, tag: str) -> dict[str, dict[str, Any]]:
    assert doc["outcome"] == "PLUGGED", doc
    (slot,) = doc["slots"]
    assert slot["order"] == [f"{tag}f1", f"{tag}f2", f"{tag}f3", f"{tag}f0"]  # function 0 last
    funcs = {f["id"]: f for f in doc["functions"]}
    assert {f["arrival"] for f in funcs.values()} == {"PRESENT"}
    report = _report(pc)
    for f in funcs.values():
        g = report[f["pciPath"]]  # the guest reports it at the path the host planned
        assert f["objects"] and f["objects"] == [*(b["name"] for b in g.get("blockDevices", [])),
                                                 *(n["name"] for n in g.get("netInterfaces", []))]  # fmt: skip
    assert pc.exec(f"test -b /dev/disk/by-id/virtio-{tag}f0 && test -b /dev/disk/by-id/virtio-{tag}f2").rc == 0
    return funcs


def test_pc_four_function_slot_into_a_free_root_slot_then_use_refuse_release_unplug(pc: GuestVM) -> None:
    started = time.monotonic()
    rc, doc, err = _plug_four(pc, "ra")
    assert rc == 0, (doc, err)
    FIGURES.append(f"pc hot-add: 4-function slot plugged and confirmed in {time.monotonic() - started:.1f} s")
    (slot,) = doc["slots"]
    assert slot["chosen"] and slot["bus"] == "pci.0"
    assert re.search(r"^\[ *\d+\.\d\ds\] waiting: \d/4 present in the guest$", err, re.M), err  # progress on stderr
    funcs = _assert_present(doc, pc, "ra")
    disk, nic = funcs["raf0"]["objects"][0], funcs["raf1"]["objects"][0]
    # use: a filesystem mounted on one disk, one link up
    pc.exec(f"mkfs.ext4 -q /dev/{disk} && mkdir -p /mnt/ra && mount /dev/{disk} /mnt/ra && ip link set {nic} up",
            check=True, timeout=300)  # fmt: skip
    rc, out, err = unplugctl(pc, "unplug", slot["slotPath"], "--timeout", "60")
    assert rc == 3 and "MOUNTED" in out and "LINK_UP" in out, out + err
    pc.exec(f"umount /mnt/ra && ip link set {nic} down", check=True)
    rc, out, err = unplugctl(pc, "unplug", slot["slotPath"], "--timeout", PLUG_TIMEOUT, "--json")
    assert rc == 0, out + err
    gone = _json(out)["functions"]
    assert sorted(f["name"] for f in gone) == ["raf0", "raf1", "raf2", "raf3"]
    assert all(f["removed"] and f["guestGone"] for f in gone)


def test_pc_spec_file_fills_a_slot_behind_the_bridge(pc: GuestVM, tmp_path: Path) -> None:
    spec = tmp_path / "slots.toml"
    spec.write_text(
        "[[slots]]\n"
        'slot = "br0:0x3"\n'
        'netdevs = ["user,id=brn1,restrict=on", "user,id=brn3,restrict=on"]\n'
        f"blockdevs = [{json.dumps(_blockdev(pc, 'brd0'))}, {json.dumps(_blockdev(pc, 'brd2'))}]\n"
        'devices = ["virtio-blk-pci,drive=brd0,id=brf0,serial=brf0", "virtio-net-pci,netdev=brn1,id=brf1",\n'
        '           "virtio-blk-pci,drive=brd2,id=brf2,serial=brf2", "virtio-net-pci,netdev=brn3,id=brf3"]\n'
    )
    rc, out, err = unplugctl(pc, "plug", "--file", str(spec), "--timeout", PLUG_TIMEOUT, "--json")
    assert rc == 0, out + err
    doc = _json(out)
    (slot,) = doc["slots"]
    assert slot["bus"] == "br0" and slot["slot"] == 3 and not slot["chosen"]
    funcs = _assert_present(doc, pc, "br")
    assert all(f["pciPath"].startswith("0000:00/05.0/03.") for f in funcs.values())


def test_pc_a_spec_rejected_halfway_leaves_nothing_behind(pc: GuestVM) -> None:
    before_ids = _query_pci_paths(pc)
    before = set(_report(pc))
    specs = ["virtio-net-pci,netdev=rbn0,id=rbf0", "virtio-net-pci,netdev=rbn1,id=rbf1",
             "virtio-net-pci,netdev=no-such-netdev,id=rbf2"]  # fmt: skip
    backends = ("--netdev=user,id=rbn0,restrict=on", "--netdev=user,id=rbn1,restrict=on")
    rc, out, err = unplugctl(pc, "plug", *specs, *backends, "--slot", "br0:0x9", "--timeout", "60", "--json")
    assert rc == Exit.REJECTED, out + err
    doc = _json(out)
    assert doc["outcome"] == "REJECTED" and doc["rolledBack"] and not doc["leftovers"], doc
    assert "no-such-netdev" in doc["message"]
    assert "rollback: removing rbf1" in err  # function 1 was in; 2 was refused; 0 never went
    assert _query_pci_paths(pc) == before_ids
    assert set(_report(pc)) == before
    # its backends went too: the same ids can be created again
    rc, out, err = unplugctl(pc, "plug", "virtio-net-pci,netdev=rbn0,id=rbf0", "--netdev=user,id=rbn0,restrict=on",
                             "--slot", "br0:0x9", "--timeout", PLUG_TIMEOUT, "--json")  # fmt: skip
    assert rc == 0, out + err


# ----------------------------------------------------------------------------------------- q35


@pytest.fixture(scope="module")
def q35() -> Iterator[GuestVM]:
    require_vm_tools()
    started = time.monotonic()
    devices = [
        pcie_root_port("rpfree", chassis=1, addr="0x10.0", multifunction=True),
        pcie_root_port("rpoff", chassis=2, addr="0x10.1", hotplug=False),
        pcie_root_port("rptaken", chassis=3, addr="0x10.2"),
        pcie_root_port("rpspare", chassis=4, addr="0x10.3"),
        virtio_disk("dtaken", bus="rptaken"),
    ]
    with GuestVM("q35", (), devices, config=CONFIG, name="unplugd-e2e-hotadd-q35") as vm:
        vm.wait_booted(timeout=900)
        FIGURES.append(f"q35 hot-add guest: boot {time.monotonic() - started:.0f} s")
        yield vm
    FIGURES.append(f"q35 hot-add guest: whole module {time.monotonic() - started:.0f} s")


def test_q35_slots_table(q35: GuestVM) -> None:
    rc, out, err = unplugctl(q35, "slots", "--json")
    assert rc == 0, out + err
    buses = {b["bus"]: b for b in _json(out)["buses"]}
    assert not buses["pcie.0"]["hotplug"] and "integrated endpoint" in buses["pcie.0"]["reason"]
    assert buses["rpfree"]["freeSlots"] == [0] and buses["rpfree"]["wholeSlot"]
    assert buses["rpoff"]["freeSlots"] == [] and "hotplug='off'" in buses["rpoff"]["reason"]
    assert buses["rptaken"]["freeSlots"] == [] and buses["rptaken"]["occupied"][0]["functions"] == ["dtaken"]


def test_q35_refuses_hotplug_off_and_occupied_ports(q35: GuestVM) -> None:
    for slot, why in (("rpoff", "hotplug='off'"), ("rptaken", "occupied by dtaken")):
        rc, out, err = unplugctl(q35, "plug", "virtio-net-pci,netdev=x,id=xx", "--slot", slot)
        assert rc == Exit.NOT_HOTPLUGGABLE and why in out and "nothing was added" in out, out + err


def test_q35_nic_into_an_empty_root_port(q35: GuestVM) -> None:
    rc, out, err = unplugctl(q35, "plug", "virtio-net-pci,netdev=qn0,id=qnic,mac=52:54:00:11:00:01",
                             "--netdev=user,id=qn0,restrict=on", "--timeout", PLUG_TIMEOUT, "--json")  # fmt: skip
    assert rc == 0, out + err
    doc = _json(out)
    (slot,) = doc["slots"]
    assert slot["bus"] == "rpfree" and slot["chosen"]
    (f,) = doc["functions"]
    assert f["arrival"] == "PRESENT" and f["objects"]
    mac = q35.read_file(f"/sys/class/net/{f['objects'][0]}/address").strip()
    assert mac == "52:54:00:11:00:01"


def test_q35_a_device_without_a_guest_driver_is_rolled_back(q35: GuestVM) -> None:
    # pci-testdev (1b36:0005): QEMU's test device, which no guest driver claims.
    rc, out, err = unplugctl(q35, "plug", "pci-testdev,id=nodrv", "--slot", "rpspare", "--timeout", "30", "--json")
    assert rc == Exit.NOT_CONFIRMED, out + err
    doc = _json(out)
    assert doc["outcome"] == "NOT_CONFIRMED" and doc["rolledBack"] and not doc["leftovers"], doc
    (f,) = doc["functions"]
    assert f["arrival"] == "NO_DRIVER" and f["address"], f
    assert "nodrv" not in _query_pci_paths(q35)
    assert f["pciPath"] not in _report(q35)
