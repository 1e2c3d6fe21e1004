"""unplugctl over a remote libvirt transport: a private libvirtd listening on loopback TCP
(qemu+tcp://127.0.0.1:PORT/system, auth none), domains with no guest OS.

What this libvirt (9.0) answers for virDomainOpenChannel on our <channel type='unix'> (host/channel.py
relies on each); the same topology over TCP as over the local socket; the agent is sought through
the channel over TCP; a fleet status over both URIs and one that refuses; an unplug whose
hypervisor goes silent mid-wait (libvirtd stopped with SIGSTOP: the TCP connection stays open,
only keepalive can tell) ends HYPERVISOR_LOST, never hangs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import REPO
from tests.integration.private_libvirtd import PrivateLibvirtd, private_libvirtd
from unplugd.host.backends.libvirt import AGENT_CHANNEL, KEEPALIVE_COUNT, KEEPALIVE_INTERVAL_S


@pytest.fixture(scope="module")
def daemon() -> Iterator[PrivateLibvirtd]:
    with private_libvirtd(tcp=True) as d:
        yield d


@pytest.fixture(scope="module")
def domain(daemon: PrivateLibvirtd) -> Iterator[str]:
    with daemon.domain("q35") as name:
        yield name


def unplugctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "unplugd.host.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _open(uri: str) -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt.open(uri)


def test_open_channel_over_tcp_held_and_forced(daemon: PrivateLibvirtd, domain: str) -> None:
    import libvirt

    assert daemon.tcp_uri is not None
    conn = _open(daemon.tcp_uri)
    try:
        dom = conn.lookupByName(domain)
        first = conn.newStream(0)
        dom.openChannel(AGENT_CHANNEL, first, 0)
        first.send(b"\x00")  # the port takes bytes: there is a stream to QEMU's chardev
        second = conn.newStream(0)
        with pytest.raises(libvirt.libvirtError, match="Active channel stream exists") as held:
            dom.openChannel(AGENT_CHANNEL, second, 0)
        assert held.value.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED
        dom.openChannel(AGENT_CHANNEL, second, libvirt.VIR_DOMAIN_CHANNEL_FORCE)
        with pytest.raises(libvirt.libvirtError, match="I/O failure"):
            first.send(b"\x00")  # the forced-out stream fails
        # a recv blocked on the stream returns at once on abort (how a session ends, host/channel.py)
        got: list[str] = []

        def recv() -> None:
            try:
                second.recv(16)
            except libvirt.libvirtError as exc:
                got.append(exc.get_error_message())

        t = threading.Thread(target=recv)
        t.start()
        time.sleep(0.3)
        second.abort()
        t.join(5)
        assert not t.is_alive() and got and "closed" in got[0]
    finally:
        conn.close()


def _slots(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["slotPath"], s["verdict"]) for s in doc["slots"]]


def test_status_over_tcp_reads_the_same_topology_and_seeks_the_agent_through_libvirt(
    daemon: PrivateLibvirtd, domain: str
) -> None:
    assert daemon.tcp_uri is not None
    local = unplugctl("status", domain, "-c", daemon.uri, "--json", "--agent-timeout", "2")
    remote = unplugctl("status", domain, "-c", daemon.tcp_uri, "--json", "--agent-timeout", "2")
    assert local.returncode == remote.returncode == 0, local.stderr + remote.stderr
    lj, rj = json.loads(local.stdout), json.loads(remote.stdout)
    assert _slots(lj) == _slots(rj) and len(_slots(rj)) > 5
    # no guest OS: unreachable both ways, but over TCP through the channel's stream, not its path
    assert not rj["guestReachable"]
    assert f"libvirt channel {AGENT_CHANNEL} of {domain} on {daemon.tcp_uri}" in rj["guestError"]
    assert "no answer from the guest" in rj["guestError"]
    assert "virtio-serial chardev" in lj["guestError"]  # local: the socket path, as before


def test_fleet_status_over_two_uris_and_one_that_refuses(daemon: PrivateLibvirtd, domain: str) -> None:
    assert daemon.tcp_uri is not None
    dead = "qemu+tcp://127.0.0.1:1/system"  # nothing listens on port 1
    p = unplugctl(
        "status",
        "-c",
        daemon.tcp_uri,
        "-c",
        daemon.uri,
        "-c",
        dead,
        "--all-domains",
        "--json",
        "--agent-timeout",
        "2",
        "--hypervisor-timeout",
        "5",
    )
    assert p.returncode == 4, p.stdout + p.stderr  # the domains' guests and one URI unreachable
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    by = {(d["uri"], d["domain"]): d for d in lines}
    assert set(by) == {(daemon.tcp_uri, domain), (daemon.uri, domain), (dead, "*")}
    assert by[(dead, "*")]["state"] == "unreachable" and "cannot connect" in by[(dead, "*")]["error"]
    a, b = by[(daemon.tcp_uri, domain)], by[(daemon.uri, domain)]
    assert a["state"] == b["state"] == "unreachable"  # no guest OS: no agent
    assert _slots(a["status"]) == _slots(b["status"])
    # the filter: no domain has anything UNPLUGGABLE without a guest answer; text lists none
    f = unplugctl(
        "status", "-c", daemon.tcp_uri, "--all-domains", "--unpluggable", "target=vd*", "--agent-timeout", "2"
    )
    assert f.returncode == 4 and f.stdout == "", f.stdout + f.stderr
    assert "0 of 1 domain(s) have a device matching target=vd*" in f.stderr


def test_a_hypervisor_gone_silent_mid_wait_is_lost_not_a_hang(daemon: PrivateLibvirtd, domain: str) -> None:
    """unplug of a disk (no guest OS: the unplug stays pending), then libvirtd frozen: only keepalive
    notices; the wait ends HYPERVISOR_LOST (exit 9) well before --timeout."""
    assert daemon.tcp_uri is not None and daemon.proc is not None
    timeout = 120.0
    cmd = [
        sys.executable,
        "-m",
        "unplugd.host.cli",
        "unplug",
        domain,
        "vdb",
        "-c",
        daemon.tcp_uri,
        "--force",
        "--timeout",
        str(timeout),
        "--json",
        "--agent-timeout",
        "2",
        "--hypervisor-timeout",
        "5",
    ]
    pid = int((daemon.root / "libvirtd.pid").read_text())
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "requested" in line:
                break
        start = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            os.kill(pid, signal.SIGCONT)
        waited = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    doc = json.loads(out)
    assert proc.returncode == 9, out + err
    assert doc["outcome"] == "HYPERVISOR_LOST"
    assert [f["removed"] for f in doc["functions"]] == [False]
    # (not PENDING: keepalive ended the wait, about interval * (count + 1) s in, long before --timeout)
    assert "lost the hypervisor" in doc["message"], doc["message"]
    print(
        f"frozen libvirtd: HYPERVISOR_LOST after {waited:.1f}s (keepalive {KEEPALIVE_INTERVAL_S}s x {KEEPALIVE_COUNT})",
        file=sys.stderr,
    )
