"""A real guest: boot the image (q35, TCG) with data disks and a NIC behind root ports, and check
that the agent's packages are installed (dpkg -i, then this boot), that `unplugd inspect` finds the data disk's PCI
function, that the service's sandbox still shows the agent what it must see (probed under the
unit's own settings, and through the running service asked by the host over virtio-serial), and
that the guest's PCI hotplug completes a device_del with DEVICE_DELETED.

One boot for the whole module (a TCG boot costs half a minute); the tests run in file order and
the unplug comes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from google.protobuf.json_format import MessageToDict

from tests.conftest import REPO, require_vm_tools
from tests.vm import MUTATIONS_CONFIG, GuestVM, disk_on_root_port, net_on_root_port
from unplugd.host.client import SyncAgentClient

BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
UNIT = REPO / "packaging" / "systemd" / "unplugd.service"


@pytest.fixture(scope="module")
def vm() -> Iterator[GuestVM]:
    require_vm_tools()
    devices = [
        disk_on_root_port("data0", chassis=1),  # unplugged at the end
        disk_on_root_port("data1", chassis=2),  # mounted in a private mount namespace
        disk_on_root_port("data2", chassis=3),  # held open by an unprivileged process
        net_on_root_port("net0", chassis=4),
    ]
    # The other e2e tests' config: one install boot serves them all (the package's default config is
    # lived with in test_package_lifecycle.py).
    with GuestVM("q35", devices=devices, config=MUTATIONS_CONFIG) as guest:
        guest.wait_booted(timeout=600)
        yield guest


def guest_bdf(vm: GuestVM, serial: str) -> str:
    """The guest BDF of the virtio-blk disk with this serial, from its sysfs device path."""
    out = vm.exec(f"readlink -f /sys/block/$(basename $(readlink -f /dev/disk/by-id/virtio-{serial}))", check=True)
    bdfs = [part for part in out.stdout.strip().split("/") if BDF.match(part)]
    assert bdfs, f"no PCI function in the sysfs path of {serial}: {out.stdout!r}"
    return bdfs[-1]


def test_agent_package_installed_with_dpkg(vm: GuestVM) -> None:
    for package in ("python3-unplugd", "unplugd"):
        rc, out, err = vm.exec(f"dpkg-query -W -f '${{Status}} ${{Version}}' {package}")
        assert rc == 0, err
        assert out.startswith("install ok installed 0.1.0+git."), out
    assert vm.exec("dpkg-query -W unplugctl").rc != 0, "a guest carries no host tool"
    assert vm.exec("test -e /usr/lib/python3/dist-packages/unplugd/host").rc != 0
    rc, out, err = vm.exec("python3 -c 'import unplugd.v1.report_pb2 as r; print(r.DESCRIPTOR.package)'")
    assert (rc, out.strip()) == (0, "unplugd.v1"), err


def test_inspect_reports_the_data_disk(vm: GuestVM) -> None:
    bdf = guest_bdf(vm, "data0")
    rc, out, err = vm.exec("unplugd inspect --json", timeout=120)
    assert rc == 0, err
    report = json.loads(out)
    functions = {f["address"]: f for f in report["functions"]}
    assert bdf in functions, f"{bdf} missing from {sorted(functions)}"
    # a blank disk nothing opened, behind a root port that pciehp drives: free to go
    assert (functions[bdf]["state"], functions[bdf]["reasons"]) == ("FUNCTION_STATE_READY", []), functions[bdf]
    # the root disk hangs off the chipset's AHCI controller: busy with /, which no hotplug slot drives
    ahci = vm.exec("readlink -f /sys/block/sda", check=True).stdout
    root_bdf = [p for p in ahci.split("/") if BDF.match(p)][-1]
    root = functions[root_bdf]
    codes = {r["code"].removeprefix("REASON_CODE_") for r in root["reasons"]}
    assert root["state"] == "FUNCTION_STATE_BUSY", root
    assert {"ROOT_FILESYSTEM", "MOUNTED", "NO_HOTPLUG_DRIVER"} <= codes, root


# What the sandboxed agent must still see, checked by a process running under the unit's own
# [Service] settings: the mount table of a process in another mount namespace, the fds and mount
# namespace of a process owned by another user, every PCI function, and the kernel's exclusive
# claim on block devices (free disk: claim works; mounted disk: EBUSY).
SANDBOX_PROBE = r"""
import errno, json, os, sys
holder, mounted, opened = int(sys.argv[1]), sys.argv[2], sys.argv[3]
r = {}
r["other_ns"] = os.readlink(f"/proc/{holder}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
r["sees_mount"] = any(line.split(" - ")[1].split()[1] == mounted
                      for line in open(f"/proc/{holder}/mountinfo") if " - " in line)
r["sees_fd"] = any(os.readlink(f"/proc/{holder}/fd/{fd}") == opened for fd in os.listdir(f"/proc/{holder}/fd"))
r["pci_functions"] = len(os.listdir("/sys/bus/pci/devices"))
fd = os.open(opened, os.O_RDONLY | os.O_EXCL); os.close(fd); r["claim_free"] = True
try:
    os.close(os.open(mounted, os.O_RDONLY | os.O_EXCL)); r["claim_mounted"] = "claimed"
except OSError as e:
    r["claim_mounted"] = errno.errorcode[e.errno]
print(json.dumps(r))
"""

# RuntimeDirectory stays with the real service: a transient unit would remove /run/unplugd on exit.
SKIP_IN_PROBE = {
    "ExecStart",
    "Type",
    "Restart",
    "RestartSec",
    "TimeoutStopSec",
    "RuntimeDirectory",
    "RuntimeDirectoryMode",
}


def service_properties(unit: Path) -> list[str]:
    """The unit's [Service] settings as systemd-run -p arguments."""
    props, section = [], ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key = line.split("=", 1)[0]
        if section == "[Service]" and key not in SKIP_IN_PROBE:
            props += ["-p", line]
    return props


@dataclass(frozen=True)
class Holder:
    pid: str
    mounted: str  # /dev/vdX mounted in the holder's private mount namespace
    opened: str  # /dev/vdY held open by the holder (uid nobody)


@pytest.fixture(scope="module")
def disks(vm: GuestVM) -> tuple[str, str]:
    data1 = vm.exec("readlink -f /dev/disk/by-id/virtio-data1", check=True).stdout.strip()
    data2 = vm.exec("readlink -f /dev/disk/by-id/virtio-data2", check=True).stdout.strip()
    vm.exec(f"mkfs.ext4 -q {data1}", check=True, timeout=120)
    return data1, data2


@contextlib.contextmanager
def holding(vm: GuestVM, disks: tuple[str, str]) -> Iterator[Holder]:
    """A process that root starts in a private mount namespace with data1 mounted and data2 open,
    then runs as nobody: what only a fully privileged, unhidden agent can see."""
    data1, data2 = disks
    holder_cmd = (
        f"mkdir -p /mnt/d1 && mount {data1} /mnt/d1 && exec 3<{data2} && "
        "exec setpriv --reuid=65534 --regid=65534 --clear-groups sleep 600"
    )
    vm.exec(
        f"setsid -f unshare -m --propagation private sh -c {shlex.quote(holder_cmd)} </dev/null >/dev/null 2>&1",
        check=True,
    )
    try:
        pid = vm.exec("for i in $(seq 50); do pgrep -u nobody -x sleep && break; sleep 0.2; done", check=True)
        yield Holder(pid.stdout.split()[0], data1, data2)
    finally:
        vm.exec("pkill -u nobody -x sleep; while pgrep -u nobody -x sleep >/dev/null; do sleep 0.1; done", timeout=30)


def test_service_sandbox_hides_nothing_the_agent_needs(vm: GuestVM, disks: tuple[str, str]) -> None:
    props = " ".join(shlex.quote(p) for p in service_properties(UNIT))
    with holding(vm, disks) as h:
        rc, out, err = vm.exec(
            f"systemd-run --quiet --wait --pipe --collect {props} "
            f"python3 -c {shlex.quote(SANDBOX_PROBE)} {h.pid} {h.mounted} {h.opened}",
            timeout=120,
        )
    assert rc == 0, err
    seen = json.loads(out)
    assert seen["other_ns"] and seen["sees_mount"] and seen["sees_fd"], seen
    assert seen["pci_functions"] >= 8, seen
    assert seen["claim_free"] is True
    assert seen["claim_mounted"] == "EBUSY", seen


def test_running_service_answers_the_host_over_virtio_serial(vm: GuestVM, disks: tuple[str, str]) -> None:
    """The real unplugd.service, asked by the host client through the VM's virtio-serial port, sees
    the mount in another namespace and the fd of another user's process, and sees them go."""

    rc, out, _ = vm.exec("systemctl is-active unplugd.service")
    assert (rc, out.strip()) == (0, "active"), vm.exec("journalctl -u unplugd --no-pager -n 30").stdout
    bdf1, bdf2 = guest_bdf(vm, "data1"), guest_bdf(vm, "data2")

    def states(client: Any) -> dict[str, tuple[str, set[str]]]:
        report = MessageToDict(client.get_report([bdf1, bdf2], timeout=60))
        return {
            f["address"]: (f["state"], {r["code"] for r in f.get("reasons", [])}) for f in report.get("functions", [])
        }

    client = SyncAgentClient(f"serial:{vm.agent_socket}", timeout=60, connect_timeout=30)
    try:
        before = states(client)
        assert before[bdf1][0].endswith("READY") and before[bdf2][0].endswith("READY"), before
        with holding(vm, disks):
            busy = states(client)
        after = states(client)
    finally:
        client.close()
    assert busy[bdf1][0].endswith("BUSY") and "REASON_CODE_MOUNTED" in busy[bdf1][1], busy
    assert busy[bdf2][0].endswith("BUSY") and "REASON_CODE_OPEN_BY_PROCESS" in busy[bdf2][1], busy
    assert after == before


def test_service_unit_verifies_and_is_confined(vm: GuestVM) -> None:
    # --man=no: the unit names its manual pages, and a stock guest may have no man(1) to look them up
    rc, out, err = vm.exec("systemd-analyze verify --man=no unplugd.service", timeout=120)
    assert (rc, out + err) == (0, ""), out + err
    rc, out, err = vm.exec("systemd-analyze security --no-pager unplugd.service", timeout=120)
    assert rc == 0, err
    match = re.search(r"Overall exposure level for unplugd\.service: ([0-9.]+)", out)
    assert match, out[-500:]
    assert float(match.group(1)) <= 2.5, out  # the figure README states


async def unplug_over_qmp(socket: Path, qid: str, timeout: float) -> dict[str, Any]:
    from qemu.qmp import QMPClient

    client = QMPClient("e2e")
    await client.connect(str(socket))
    try:
        async with asyncio.timeout(timeout):
            with client.listener(("DEVICE_DELETED",)) as listener:
                await client.execute("device_del", {"id": qid})
                async for event in listener:
                    data = cast(dict[str, Any], event["data"])
                    if data.get("device") == qid:
                        return data
    finally:
        await client.disconnect()
    raise AssertionError("listener ended without DEVICE_DELETED")


def test_device_del_completes_in_the_guest(vm: GuestVM) -> None:
    bdf = guest_bdf(vm, "data0")
    data = asyncio.run(unplug_over_qmp(vm.qmp_socket, "data0", timeout=120))
    assert data["device"] == "data0"
    rc, _, _ = vm.exec(f"test -e /sys/bus/pci/devices/{bdf}")
    assert rc != 0, f"{bdf} still present in the guest after DEVICE_DELETED"
    assert "data0" not in qdev_ids(vm.qmp("query-pci")), "QEMU still lists data0"
    assert "rp-data0" in qdev_ids(vm.qmp("query-pci")), "the root port itself stays"


def qdev_ids(query_pci: list[dict[str, Any]]) -> set[str]:
    """Every device id in a query-pci answer, through bridges."""
    found: set[str] = set()

    def walk(devices: list[dict[str, Any]]) -> None:
        for dev in devices:
            found.add(dev.get("qdev_id", ""))
            walk(dev.get("pci_bridge", {}).get("devices", []))

    for bus in query_pci:
        walk(bus["devices"])
    return found
