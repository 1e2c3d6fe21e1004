"""Disks behind every controller on the guest's real Debian kernel (issue 15).

One q35 boot (tests/e2e/controllers.py): a plain NVMe controller, two NVMe controllers of one NVMe
subsystem sharing a namespace (native multipath: the head the user mounts is filed under
/sys/devices/virtual/nvme-subsystem, each controller has a hidden path device), a virtio-scsi HBA with
three LUNs, AHCI with a SATA disk, an empty AHCI controller, xHCI with a USB disk and a USB NIC, an
e1000e NIC. Idle first, then in use (every disk but two LUNs mounted, the NICs up), and in each state:

- the agent's report (`unplugd inspect --json` in the guest): every controller's state, the disk or
  interface each reason names, the multipath head on both of its functions, the empty controller
  READY with its warning, and no problem about the hidden path devices;
- `unplugd check NAME` for every name a user would type (kernel name, /dev path, /dev/disk/by-id and
  by-path links), through the CLI's main() in one guest interpreter: the function(s) it runs over and
  the exit code of their state;
- the host's `unplugctl check` of every controller agreeing (exit 0 / 3), and of the head's name
  naming both slots it spans;
- `unplugd capture` reproduces the in-use report offline (UNPLUGD_DK_CAPTURE_TO=FILE keeps the tree:
  tests/fixtures/captured/real_kernel/controllers.tree comes from here).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_vm_tools
from tests.e2e.controllers import DEVICES, LUNS, PORTS
from tests.e2e.real_kernel import CONFIG, FIGURES, unplugctl
from tests.vm import GuestVM

# The kernel modules each controller needs, loaded by udev at boot from the devices' modaliases.
MODULES = ("nvme", "virtio_scsi", "ahci", "xhci_pci", "usb_storage", "usbnet", "e1000e", "sd_mod")
# disk -> (controller qid, its /dev/disk/by-id link name). nvmp is the multipath head of nvmpa and nvmpb.
DISKS = {
    "nvplain": ("nvplain", "nvme-QEMU_NVMe_Ctrl_nvplain"),
    "nvmp": ("nvmpa", "nvme-QEMU_NVMe_Ctrl_nvmp"),
    "lun0": ("vscsi", "scsi-0QEMU_QEMU_HARDDISK_lun0"),
    "lun1": ("vscsi", "scsi-0QEMU_QEMU_HARDDISK_lun1"),
    "lun2": ("vscsi", "scsi-0QEMU_QEMU_HARDDISK_lun2"),
    "sata0": ("ahci1", "ata-QEMU_HARDDISK_sata0"),
    "usb0": ("xhci", "usb-QEMU_QEMU_HARDDISK_usb0-0:0"),
}
MOUNTED = ("nvplain", "nvmp", "lun1", "sata0", "usb0")  # lun0 and lun2 stay idle: their HBA is busy by lun1
NIC_MAC = "52:54:00:5b:00:01"
NIC, USB_NIC = "nic", "usbnic"


def pci_path(qid: str) -> str:
    """Each controller sits alone behind root port rpzN, function N of pcie.0 slot 0x10."""
    return f"0000:00/10.{int(PORTS[qid][-1])}/00.0"


SETUP = r"""
set -e
for m in $MODULES; do test -d /sys/module/$m || { echo "module $m not loaded"; exit 1; }; done
udevadm settle -t 120
mkdir -p /run/dk
for d in $DISKS; do
    link=$(cat /run/dk/$d.link)
    mkfs.ext4 -q -F "$link"
    mkdir -p /mnt/dk/$d
done
"""

LOCATE = r"""
for d in $DISKS; do
    dev=$(readlink -f "$(cat /run/dk/$d.link)")
    path=$(for l in /dev/disk/by-path/*; do [ "$(readlink -f $l)" = "$dev" ] && echo $l; done | head -1)
    echo "$d ${dev#/dev/} $path"
done
for n in /sys/class/net/*; do
    [ "$(cat $n/address)" = "$NIC_MAC" ] && echo "nic $(basename $n)"
    # The USB NIC by where it sits: its MAC is not fixed (cdc_subset, when it wins the race with
    # cdc_ether at boot, binds the data interface and makes up an address).
    case "$(readlink -f $n/device)" in */usb*) echo "usbnic $(basename $n)";; esac
done
true
"""


@dataclass
class Guest:
    vm: GuestVM
    kernel: dict[str, str]  # disk -> kernel name (nvme2n1, sdc)
    by_path: dict[str, str]  # disk -> a /dev/disk/by-path link ("" when udev made none: the head's)
    nics: dict[str, str]  # NIC or USB_NIC -> interface name

    def names(self, disk: str) -> list[str]:
        """Every name a user would type for a disk."""
        k = self.kernel[disk]
        out = [k, f"/dev/{k}", f"/dev/disk/by-id/{DISKS[disk][1]}"]
        return out + ([self.by_path[disk]] if self.by_path[disk] else [])


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    require_vm_tools()
    started = time.monotonic()
    with GuestVM("q35", devices=DEVICES, config=CONFIG, name="unplugd-e2e-controllers") as vm:
        vm.wait_booted(timeout=900)
        booted = time.monotonic()
        links = " && ".join(f"echo /dev/disk/by-id/{shlex.quote(link)} > /run/dk/{d}.link"
                            for d, (_, link) in DISKS.items())  # fmt: skip
        vm.exec(f"mkdir -p /run/dk && {links}", check=True)
        env = [f"MODULES={' '.join(MODULES)}", f"DISKS={' '.join(DISKS)}", f"NIC_MAC={NIC_MAC}",
               "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]  # fmt: skip
        vm.exec(["sh", "-c", SETUP], env=env, check=True, timeout=600)
        out = vm.exec(["sh", "-c", LOCATE], env=env, check=True, timeout=120).stdout
        kernel: dict[str, str] = {}
        by_path: dict[str, str] = {}
        nics: dict[str, str] = {}
        for line in out.splitlines():
            parts = line.split(" ")
            if parts[0] in DISKS:
                kernel[parts[0]] = parts[1]
                by_path[parts[0]] = parts[2] if len(parts) > 2 else ""
            elif len(parts) == 2:
                nics[parts[0]] = parts[1]
        assert set(kernel) == set(DISKS) and set(nics) == {NIC, USB_NIC}, out
        FIGURES.append(f"controllers guest: boot {booted - started:.0f} s, setup {time.monotonic() - booted:.0f} s")
        yield Guest(vm, kernel, by_path, nics)
    FIGURES.append(f"controllers guest: whole module {time.monotonic() - started:.0f} s")


def inspect(guest: Guest, *extra: str) -> dict[str, Any]:
    return json.loads(guest.vm.exec(["unplugd", "inspect", "--json", *extra], check=True, timeout=300).stdout)  # type: ignore[no-any-return]


def by_path(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["pciPath"]: f for f in report["functions"]}


def codes(f: dict[str, Any], *, blocking: bool = True) -> set[str]:
    reasons = f.get("reasons", [])
    return {r["code"].removeprefix("REASON_CODE_") for r in reasons if r.get("blocking", False) == blocking}


def text(f: dict[str, Any]) -> str:
    return "\n".join(f"{r['code']} {r.get('object', '')}: {r.get('detail', '')}" for r in f.get("reasons", []))


# `unplugd check NAME` for each name through the CLI's own main() in one guest interpreter: an
# interpreter start and the imports cost seconds each under TCG, ~30 names a state.
_CHECKS_PY = """
import contextlib, io, json, sys
from unplugd.agent import cli
found = {}
for name in sys.argv[1:]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = cli.main(["check", name])
        except SystemExit as exc:  # a usage error: argparse exits
            rc = exc.code
    found[name] = [rc, out.getvalue()]
print(json.dumps(found))
"""


def checks(guest: Guest, names: list[str]) -> dict[str, tuple[int, str]]:
    """`unplugd check NAME` in the guest for each name: (exit code, output)."""
    out = guest.vm.exec(["python3", "-c", _CHECKS_PY, *names], check=True, timeout=900).stdout
    found = {name: (int(rc), text) for name, (rc, text) in json.loads(out).items()}
    assert sorted(found) == sorted(names), out
    return found


def all_names(guest: Guest) -> list[str]:
    return [n for d in DISKS for n in guest.names(d)] + [guest.nics[NIC], guest.nics[USB_NIC]]


def expected_paths(guest: Guest, name: str) -> set[str]:
    for d in DISKS:
        if name in guest.names(d):
            return {pci_path("nvmpa"), pci_path("nvmpb")} if d == "nvmp" else {pci_path(DISKS[d][0])}
    return {pci_path("nic")} if name == guest.nics[NIC] else {pci_path("xhci")}


# --------------------------------------------------------------------------- idle


@pytest.fixture(scope="module")
def idle(guest: Guest) -> dict[str, Any]:
    return inspect(guest)


def test_every_controller_is_ready_when_idle(guest: Guest, idle: dict[str, Any]) -> None:
    functions = by_path(idle)
    for qid in PORTS:
        f = functions[pci_path(qid)]
        assert f["state"] == "FUNCTION_STATE_READY", (qid, text(f))


def test_the_head_is_a_disk_of_both_functions_and_hidden_paths_are_no_problem(
    guest: Guest, idle: dict[str, Any]
) -> None:
    head = guest.kernel["nvmp"]
    functions = by_path(idle)
    for qid in ("nvmpa", "nvmpb"):
        assert head in [b["name"] for b in functions[pci_path(qid)].get("blockDevices", [])], qid
    assert not [p for p in idle.get("problems", []) if "nvme" in p["object"]], idle["problems"]


def test_every_disk_of_a_controller_is_listed(guest: Guest, idle: dict[str, Any]) -> None:
    functions = by_path(idle)
    for disk, (qid, _) in DISKS.items():
        assert guest.kernel[disk] in [b["name"] for b in functions[pci_path(qid)].get("blockDevices", [])], disk
    xhci = functions[pci_path("xhci")]
    assert guest.nics[USB_NIC] in [n["name"] for n in xhci.get("netInterfaces", [])]


def test_the_empty_ahci_controller_says_so(idle: dict[str, Any]) -> None:
    f = by_path(idle)[pci_path("ahci0")]
    assert f["state"] == "FUNCTION_STATE_READY"
    assert codes(f, blocking=False) == {"EMPTY_CONTROLLER"}, text(f)
    assert "nothing is attached" in text(f) and "ahci" in text(f)


def test_check_by_every_name_when_idle(guest: Guest) -> None:
    for name, (rc, out) in checks(guest, all_names(guest)).items():
        assert rc == 0, (name, out)
        listed = {line.split(" ", 1)[0] for line in out.splitlines() if not line.startswith(" ")}
        assert len(listed) == len(expected_paths(guest, name)), (name, out)


def test_unplugctl_check_agrees_when_idle(guest: Guest) -> None:
    for qid in PORTS:
        rc, out, err = unplugctl(guest.vm, "check", qid)
        assert rc == 0 and "UNPLUGGABLE" in out, (qid, out + err)


# --------------------------------------------------------------------------- in use


@pytest.fixture(scope="module")
def busy(guest: Guest, idle: dict[str, Any]) -> dict[str, Any]:
    mounts = " && ".join(f"mount $(cat /run/dk/{d}.link) /mnt/dk/{d}" for d in MOUNTED)
    nic, usb_nic = guest.nics[NIC], guest.nics[USB_NIC]
    guest.vm.exec(f"{mounts} && ip link set {nic} up && ip addr add 192.0.2.50/24 dev {nic} "
                  f"&& ip link set {usb_nic} up", check=True, timeout=300)  # fmt: skip
    return inspect(guest)


def test_every_controller_is_busy_naming_its_disk(guest: Guest, busy: dict[str, Any]) -> None:
    functions = by_path(busy)
    for disk in MOUNTED:
        qids = ("nvmpa", "nvmpb") if disk == "nvmp" else (DISKS[disk][0],)
        for qid in qids:
            f = functions[pci_path(qid)]
            assert f["state"] == "FUNCTION_STATE_BUSY", (qid, text(f))
            assert "MOUNTED" in codes(f), (qid, text(f))
            assert f"{guest.kernel[disk]} is mounted on /mnt/dk/{disk}" in text(f), (qid, text(f))


def test_one_busy_lun_makes_the_hba_busy_and_only_it_is_named(guest: Guest, busy: dict[str, Any]) -> None:
    f = by_path(busy)[pci_path("vscsi")]
    assert codes(f) == {"MOUNTED"}, text(f)
    named = {r["object"] for r in f["reasons"]}
    assert named == {guest.kernel["lun1"]}, text(f)
    assert not {guest.kernel[lun] for lun in LUNS if lun != "lun1"} & named


def test_nics_busy_and_the_usb_controller_names_disk_and_nic(guest: Guest, busy: dict[str, Any]) -> None:
    functions = by_path(busy)
    nic = functions[pci_path("nic")]
    assert codes(nic) == {"LINK_UP", "HAS_ADDRESS"}, text(nic)
    xhci = functions[pci_path("xhci")]
    assert codes(xhci) == {"MOUNTED", "LINK_UP"}, text(xhci)
    assert guest.nics[USB_NIC] in text(xhci) and guest.kernel["usb0"] in text(xhci)
    assert functions[pci_path("ahci0")]["state"] == "FUNCTION_STATE_READY"


def test_check_by_every_name_when_busy(guest: Guest, busy: dict[str, Any]) -> None:
    for name, (rc, out) in checks(guest, all_names(guest)).items():
        assert rc == 3, (name, out)
        assert len([line for line in out.splitlines() if not line.startswith(" ")]) == len(
            expected_paths(guest, name)
        ), (name, out)


def test_unplugctl_check_agrees_when_busy(guest: Guest, busy: dict[str, Any]) -> None:
    for qid in PORTS:
        rc, out, err = unplugctl(guest.vm, "check", qid)
        if qid == "ahci0":
            assert rc == 0 and "UNPLUGGABLE" in out, out + err
            continue
        assert rc == 3 and "BLOCKED_BY_GUEST" in out, (qid, out + err)
        assert ("LINK_UP" if qid == "nic" else "MOUNTED") in out, (qid, out)
    # The head runs over two slots: the host will not pick one, and names both.
    rc, out, err = unplugctl(guest.vm, "check", guest.kernel["nvmp"])
    assert rc == 2, out + err
    assert "0000:00/10.1/00" in err and "0000:00/10.2/00" in err, err


def test_capture_reproduces_the_busy_report_offline(guest: Guest, busy: dict[str, Any]) -> None:
    vm = guest.vm
    vm.exec("rm -rf /run/dk/capture && unplugd capture /run/dk/capture --text /run/dk/capture.tree",
            check=True, timeout=300)  # fmt: skip
    save_to = os.environ.get("UNPLUGD_DK_CAPTURE_TO")
    if save_to:
        Path(save_to).write_text(vm.read_file("/run/dk/capture.tree", timeout=120))
    offline = by_path(inspect(guest, "--root", "/run/dk/capture.tree"))
    live = by_path(busy)
    for qid in PORTS:
        p = pci_path(qid)
        assert (offline[p]["state"], codes(offline[p])) == (live[p]["state"], codes(live[p])), qid
