"""unplugctl end to end the way a plain libvirt user runs it: `unplugctl status DOMAIN`, no flags.

One transient q35 domain (TCG) boots the guest image with the agent inside; unplugctl finds the
agent through the domain's <channel> in the live XML and the topology in the same XML. The
devices (tests/vm/libvirt_domain.py unplug_layout): a mounted disk vdb, an idle disk vdc, a
multifunction slot (disk vdd + NIC) and a disk vde behind a root port with hotplug='off'.

The tests run in file order on the one domain: verdicts first, then the refused unplug, the
plain detach (device-removed event), and the multifunction slot through the monitor passthrough.
Each command's wall time and the boot time are printed at the end of the module.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import REPO
from tests.integration.libvirtd import ensure_libvirtd
from tests.vm import MUTATIONS_CONFIG
from tests.vm.libvirt_domain import LibvirtGuest, unplug_layout

CONFIG = MUTATIONS_CONFIG

# `status` plans every slot as a whole (planner.plan), so the multifunction slot of vdd is judged with
# both its functions asked for: UNPLUGGABLE. Asking for vdd alone (check/unplug) is NEEDS_COMPANIONS.
STATUS = {"vdb": "BLOCKED_BY_GUEST", "vdc": "UNPLUGGABLE", "vdd": "UNPLUGGABLE", "vde": "NOT_HOTPLUGGABLE"}
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def guest(pytestconfig: pytest.Config) -> Iterator[LibvirtGuest]:
    ensure_libvirtd()
    if shutil.which("debootstrap") is None:
        pytest.skip("needs debootstrap for the guest image (packaging/dev/system-deps.sh)")
    vm = LibvirtGuest(unplug_layout(), config=CONFIG)
    try:
        with vm:
            TIMINGS["boot (create to systemd running)"] = vm.wait_booted(timeout=600)
            vm.exec(
                "mkfs.ext4 -q /dev/disk/by-id/virtio-data && mkdir -p /mnt/data "
                "&& mount /dev/disk/by-id/virtio-data /mnt/data",
                check=True,
                timeout=120,
            )
            yield vm
    finally:
        _report(pytestconfig)
    # After the domain is gone: libvirt forgot it and no QEMU of it is left.
    listed = subprocess.run(["virsh", "-c", vm.uri, "list", "--all", "--name"], capture_output=True, text=True)
    assert vm.name not in listed.stdout.split()
    leftover = subprocess.run(["pgrep", "-f", f"guest={vm.name}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"QEMU of {vm.name} still running: {leftover.stdout}"
    assert not vm.workdir.exists()


def _report(config: pytest.Config) -> None:
    """Print the timings past pytest's output capture (they are the point of running this by hand too)."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    cm = config.pluginmanager.get_plugin("capturemanager")
    if tr is None or not TIMINGS:
        return
    with cm.global_and_fixture_disabled() if cm is not None else contextlib.nullcontext():
        tr.write_line("")
        tr.write_line("libvirt e2e timings (wall seconds):")
        for what, seconds in TIMINGS.items():
            tr.write_line(f"  {seconds:7.2f}  {what}")


def unplugctl(vm: LibvirtGuest, *args: str, timeout: float = 180) -> tuple[int, str, str]:
    """`unplugctl ARGS` against the domain, as a user runs it: no --qmp, no --agent."""
    cmd = [sys.executable, "-m", "unplugd.host.cli", *args, "--connect", vm.uri, "--agent-timeout", "20"]
    start = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    TIMINGS[" ".join(["unplugctl", *args]).replace(vm.name, "DOMAIN")] = time.monotonic() - start
    return p.returncode, p.stdout, p.stderr


def _functions(doc: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(slot, function) for the functions in each slot itself, not those behind its bridges (root ports)."""
    for slot in doc["slots"]:
        for f in slot["functions"]:
            if not f["behindBridge"]:
                yield slot, f


def test_status_finds_the_agent_through_the_channel(guest: LibvirtGuest) -> None:
    rc, out, err = unplugctl(guest, "status", guest.name, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["guestReachable"], doc["guestError"]
    # Host and guest agree on every function, incl. the chipset's that libvirt's XML leaves out.
    assert doc["guestOnly"] == [] and doc["hostOnly"] == [], (doc["guestOnly"], doc["hostOnly"])
    # The only way to the agent was the <channel> of the live XML: the socket this domain was given.
    assert f"path='{guest.agent_socket}'" in guest.live_xml()
    verdicts = {t: slot["verdict"] for slot, f in _functions(doc) if f["host"] for t in f["host"]["targets"]}
    assert {t: verdicts.get(t) for t in STATUS} == STATUS
    by_target = {t: f for _, f in _functions(doc) if f["host"] for t in f["host"]["targets"]}
    assert any(r["code"] == "MOUNTED" for r in by_target["vdb"]["guest"]["reasons"])
    assert by_target["vdc"]["guestState"] == "READY"
    # The NIC shares vdd's slot and leaves with it.
    mf_slot = next(slot for slot, f in _functions(doc) if f["host"] and "vdd" in f["host"]["targets"])
    assert mf_slot["multifunction"]
    models = sorted(f["host"]["model"] for f in mf_slot["functions"])
    assert models == ["disk virtio", "interface virtio"], models
    assert [f["guestState"] for f in mf_slot["functions"]] == ["READY", "READY"]


def test_check_multifunction_disk_needs_companions(guest: LibvirtGuest) -> None:
    rc, out, err = unplugctl(guest, "check", guest.name, "vdd", "--json")
    assert rc == 6, out + err
    doc = json.loads(out)
    assert doc["verdict"] == "NEEDS_COMPANIONS"
    assert [(f["host"]["model"], f["requested"]) for f in doc["functions"]] == [
        ("disk virtio", True),
        ("interface virtio", False),
    ]


@pytest.mark.parametrize(("target", "code"), [("vdb", 3), ("vdc", 0), ("vdd", 6), ("vde", 5)])
def test_check_exit_codes(guest: LibvirtGuest, target: str, code: int) -> None:
    rc, out, err = unplugctl(guest, "check", guest.name, target)
    assert rc == code, out + err


def test_mounted_disk_is_refused_and_stays(guest: LibvirtGuest) -> None:
    rc, out, err = unplugctl(guest, "unplug", guest.name, "vdb", "--timeout", "60")
    assert rc == 3, out + err
    assert "REFUSED" in out
    assert "vdb" in guest.live_disk_targets()
    assert guest.exec("mountpoint -q /mnt/data").rc == 0


def test_idle_disk_is_detached_and_confirmed(guest: LibvirtGuest) -> None:
    rc, out, err = unplugctl(guest, "unplug", guest.name, "vdc", "--timeout", "120", "--json")
    assert rc == 0, out + err
    doc = json.loads(out)
    assert doc["outcome"] == "UNPLUGGED", doc["message"]
    assert [(f["removed"], f["guestGone"]) for f in doc["functions"]] == [(True, True)]
    assert "deleted" in err  # the device-removed event, in the progress on stderr
    assert "vdc" not in guest.live_disk_targets()
    assert guest.exec("test -e /dev/disk/by-id/virtio-idle").rc != 0


def test_multifunction_slot_goes_through_the_monitor(guest: LibvirtGuest) -> None:
    assert guest.live_pci_functions(3) == ["disk@0.0", "interface@0.1"]
    rc, out, err = unplugctl(guest, "unplug", guest.name, "vdd", "--with-companions", "--timeout", "120", "--json")
    assert rc == 0, out + err
    doc = json.loads(out)
    assert doc["outcome"] == "UNPLUGGED", doc["message"]
    assert len(doc["functions"]) == 2
    assert all(f["removed"] and f["guestGone"] for f in doc["functions"]), doc["functions"]
    assert "tainted" in err
    assert [s["viaMonitor"] for s in doc["plan"]["steps"] if s["step"] == "unplug"] == [True]
    assert guest.live_pci_functions(3) == []
    assert guest.exec("test -e /dev/disk/by-id/virtio-mfdisk").rc != 0
    # libvirt itself records the passthrough.
    assert "custom-monitor" in guest.libvirt_log.read_text(errors="replace")
