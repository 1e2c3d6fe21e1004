"""unplugctl by remote URI against a real guest: the same answers as the local connection.

One transient q35 domain (TCG) in a private libvirtd that also listens on loopback TCP
(qemu+tcp://127.0.0.1:PORT/system, auth none); the devices of tests/vm/libvirt_domain.py
unplug_layout (mounted vdb, idle vdc, multifunction vdd + NIC, vde behind hotplug='off'). The local
URI (the daemon's unix socket) reaches the agent through the channel's socket path, as before; the
TCP URI through libvirt's virDomainOpenChannel stream (host/channel.py). The tests run in file
order on the one domain: status and check both ways, a channel held by another libvirt client,
wait-ready, unplug with its device-removed event over TCP, and last the hypervisor going silent
while wait-ready watches (libvirtd frozen: only keepalive can tell).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import REPO
from tests.integration.private_libvirtd import PrivateLibvirtd, private_libvirtd
from tests.vm import MUTATIONS_CONFIG
from tests.vm.libvirt_domain import LibvirtGuest, unplug_layout
from unplugd.host.backends.libvirt import AGENT_CHANNEL

STATUS = {"vdb": "BLOCKED_BY_GUEST", "vdc": "UNPLUGGABLE", "vdd": "UNPLUGGABLE", "vde": "NOT_HOTPLUGGABLE"}
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def daemon() -> Iterator[PrivateLibvirtd]:
    if shutil.which("debootstrap") is None:
        pytest.skip("needs debootstrap for the guest image (packaging/dev/system-deps.sh)")
    with private_libvirtd(tcp=True) as d:
        yield d


@pytest.fixture(scope="module")
def guest(daemon: PrivateLibvirtd) -> Iterator[LibvirtGuest]:
    vm = LibvirtGuest(unplug_layout(), config=MUTATIONS_CONFIG, uri=daemon.uri)
    with vm:
        TIMINGS["boot"] = vm.wait_booted(timeout=600)
        vm.exec(
            "mkfs.ext4 -q /dev/disk/by-id/virtio-data && mkdir -p /mnt/data "
            "&& mount /dev/disk/by-id/virtio-data /mnt/data",
            check=True,
            timeout=120,
        )
        yield vm
    print(f"\nremote e2e timings (s): {json.dumps({k: round(v, 2) for k, v in TIMINGS.items()})}", file=sys.stderr)


def unplugctl(uri: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "unplugd.host.cli", *args, "--connect", uri, "--agent-timeout", "20"]
    start = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    TIMINGS[f"{args[0]} {'tcp' if uri.startswith('qemu+tcp') else 'local'} {' '.join(args[2:3])}"] = (
        time.monotonic() - start
    )
    return p


def _verdicts(doc: dict[str, Any]) -> dict[str, str]:
    return {
        t: s["verdict"]
        for s in doc["slots"]
        for f in s["functions"]
        if f["host"] and not f["behindBridge"]
        for t in f["host"]["targets"]
    }


def test_status_by_remote_uri_is_the_local_answer(daemon: PrivateLibvirtd, guest: LibvirtGuest) -> None:
    assert daemon.tcp_uri is not None
    docs = []
    for uri in (daemon.uri, daemon.tcp_uri):
        p = unplugctl(uri, "status", guest.name, "--json")
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        assert doc["guestReachable"], doc["guestError"]
        docs.append(doc)
    local, remote = docs
    assert {t: _verdicts(remote).get(t) for t in STATUS} == STATUS
    assert _verdicts(local) == _verdicts(remote)
    assert local["slots"] == remote["slots"]  # every function, reason and step alike
    assert remote["guestOnly"] == remote["hostOnly"] == []


@pytest.mark.parametrize(("target", "code"), [("vdb", 3), ("vdc", 0), ("vdd", 6), ("vde", 5)])
def test_check_by_remote_uri_exits_as_the_local(
    daemon: PrivateLibvirtd, guest: LibvirtGuest, target: str, code: int
) -> None:
    assert daemon.tcp_uri is not None
    local = unplugctl(daemon.uri, "check", guest.name, target, "--json")
    remote = unplugctl(daemon.tcp_uri, "check", guest.name, target, "--json")
    assert local.returncode == remote.returncode == code, local.stderr + remote.stderr
    assert json.loads(local.stdout) == json.loads(remote.stdout)


def test_a_channel_held_through_libvirt_is_refused_unless_forced(daemon: PrivateLibvirtd, guest: LibvirtGuest) -> None:
    import libvirt

    assert daemon.tcp_uri is not None
    conn = libvirt.open(daemon.tcp_uri)
    try:
        holder = conn.newStream(0)
        conn.lookupByName(guest.name).openChannel(AGENT_CHANNEL, holder, 0)
        p = unplugctl(daemon.tcp_uri, "status", guest.name, "--json", "--agent-timeout", "5")
        doc = json.loads(p.stdout)
        assert not doc["guestReachable"]
        assert "Active channel stream exists" in doc["guestError"] and "--force-channel" in doc["guestError"]
        p = unplugctl(daemon.tcp_uri, "status", guest.name, "--json", "--force-channel")
        assert json.loads(p.stdout)["guestReachable"], p.stdout + p.stderr
        # (what the forced-out holder sees on its own connection: tests/integration/test_libvirt_remote.py)
    finally:
        conn.close()


def _wait_ready_vdb(domain: str, uri: str) -> list[str]:
    """`unplugctl wait-ready DOMAIN vdb` over the remote URI, as its own process."""
    return [sys.executable, "-m", "unplugd.host.cli", "wait-ready", domain, "vdb", "--timeout", "150",
            "--connect", uri, "--agent-timeout", "20"]  # fmt: skip


def test_wait_ready_by_remote_uri(daemon: PrivateLibvirtd, guest: LibvirtGuest) -> None:
    assert daemon.tcp_uri is not None
    cmd = [*_wait_ready_vdb(guest.name, daemon.tcp_uri), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        time.sleep(5)  # wait-ready is watching through the channel's stream by now
        assert proc.poll() is None, proc.communicate()
        guest.exec("umount /mnt/data", check=True)
        out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    assert json.loads(out)["verdict"] == "UNPLUGGABLE"


def test_unplug_by_remote_uri_is_detached_and_confirmed(daemon: PrivateLibvirtd, guest: LibvirtGuest) -> None:
    assert daemon.tcp_uri is not None
    p = unplugctl(daemon.tcp_uri, "unplug", guest.name, "vdc", "--timeout", "120", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(p.stdout)
    assert doc["outcome"] == "UNPLUGGED", doc["message"]
    assert [(f["removed"], f["guestGone"]) for f in doc["functions"]] == [(True, True)]
    assert "deleted" in p.stderr  # the device-removed event came over the TCP connection
    assert "vdc" not in guest.live_disk_targets()


def test_hypervisor_silent_mid_wait_ends_with_a_clear_outcome(daemon: PrivateLibvirtd, guest: LibvirtGuest) -> None:
    """wait-ready watching vdb (mounted) through the channel's stream; libvirtd frozen: the TCP
    connection stays open and silent, keepalive declares it dead, the stream breaks, wait-ready ends
    GUEST_UNREACHABLE (exit 4) saying so, instead of waiting out its --timeout."""
    assert daemon.tcp_uri is not None
    guest.exec("mountpoint -q /mnt/data || mount /dev/disk/by-id/virtio-data /mnt/data", check=True)
    cmd = _wait_ready_vdb(guest.name, daemon.tcp_uri)
    pid = int((daemon.root / "libvirtd.pid").read_text())
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the first WatchReport message: the watch is established
            if "waiting:" in line:
                break
        assert proc.poll() is None, proc.communicate()
        start = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            out, err = proc.communicate(timeout=150)
        finally:
            os.kill(pid, signal.SIGCONT)
        TIMINGS["wait-ready: libvirtd frozen -> exit"] = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # not the timeout's answer (BLOCKED_BY_GUEST, exit 3): the watch ended when the stream broke
    assert proc.returncode == 4, out + err
    assert out.splitlines()[-1] == "GUEST_UNREACHABLE"
    assert "keepalive" in out or "stream broke" in out, out
