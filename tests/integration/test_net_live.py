"""collect_net and parse_proc_net against real kernel objects: veth, bridge, addresses, routes, a TCP connection."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.netns import NetNS, netns
from unplugd.agent.collectors.net import parse_proc_net
from unplugd.agent.collectors.processes import scan_processes
from unplugd.agent.roots import Roots

__all__ = ["netns"]  # the fixture, imported for pytest

AF_INET, AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)


def defaults(scan: dict[str, Any]) -> list[tuple[int, str, str | None, str]]:
    return sorted(
        (r["family"], r["destination"], r["gateway"], r["ifname"])
        for r in scan["routes"]
        if r["destination"].endswith("/0")
    )


def addresses(scan: dict[str, Any], ifname: str) -> set[str]:
    return {f"{a['address']}/{a['prefixlen']}" for a in scan["interfaces"][ifname]["addresses"]}


def test_veth_bridge_addresses_routes_and_link_state(netns: NetNS) -> None:
    netns.ip("link", "add", "va", "type", "veth", "peer", "name", "vb")
    netns.ip("link", "add", "br0", "type", "bridge")
    netns.ip("link", "set", "va", "master", "br0")

    scan = netns.collect()
    assert scan["problems"] == []
    va, vb, br0 = (scan["interfaces"][n] for n in ("va", "vb", "br0"))
    assert (va["kind"], vb["kind"], br0["kind"]) == ("veth", "veth", "bridge")
    assert va["master"] == "br0"
    assert va["uppers"] == ["br0"]
    assert br0["lowers"] == ["va"]
    assert vb["master"] is None
    assert (vb["admin_up"], vb["operstate"], vb["carrier"]) == (False, "down", None)
    assert defaults(scan) == []

    # Up, with addresses and default routes v4 and v6 through vb.
    for link in ("va", "vb", "br0"):
        netns.ip("link", "set", link, "up")
    netns.ip("addr", "add", "198.51.100.2/24", "dev", "vb")
    netns.ip("-6", "addr", "add", "2001:db8:5::2/64", "dev", "vb", "nodad")
    netns.ip("route", "add", "default", "via", "198.51.100.1", "dev", "vb")
    netns.ip("-6", "route", "add", "default", "via", "2001:db8:5::1", "dev", "vb")
    netns.ip("route", "add", "203.0.113.0/24", "via", "198.51.100.9", "dev", "vb", "table", "100")

    scan = netns.collect()
    vb = scan["interfaces"]["vb"]
    assert vb["admin_up"] is True
    assert vb["carrier"] is True  # its peer va is up
    assert vb["operstate"] == "up"
    assert {"198.51.100.2/24", "2001:db8:5::2/64"} <= addresses(scan, "vb")
    assert any(a["scope"] == "link" for a in vb["addresses"])  # the kernel's fe80:: address
    assert defaults(scan) == [
        (AF_INET, "0.0.0.0/0", "198.51.100.1", "vb"),
        (AF_INET6, "::/0", "2001:db8:5::1", "vb"),
    ]
    assert ["203.0.113.0/24", 100, "vb"] in [[r["destination"], r["table"], r["ifname"]] for r in scan["routes"]]

    # Link down: the kernel drops the routes through it; the addresses stay.
    netns.ip("link", "set", "vb", "down")
    scan = netns.collect()
    vb = scan["interfaces"]["vb"]
    assert (vb["admin_up"], vb["carrier"]) == (False, None)
    assert defaults(scan) == []
    assert "198.51.100.2/24" in addresses(scan, "vb")
    # Its peer va is still administratively up, but without a carrier.
    va = scan["interfaces"]["va"]
    assert (va["admin_up"], va["operstate"], va["carrier"]) == (True, "lowerlayerdown", False)

    # Up again, the default route re-added; the address removed.
    netns.ip("link", "set", "vb", "up")
    netns.ip("route", "add", "default", "via", "198.51.100.1", "dev", "vb")
    scan = netns.collect()
    assert scan["interfaces"]["vb"]["admin_up"] is True
    assert defaults(scan) == [(AF_INET, "0.0.0.0/0", "198.51.100.1", "vb")]
    # Removing the address takes the route through its subnet with it.
    netns.ip("addr", "del", "198.51.100.2/24", "dev", "vb")
    scan = netns.collect()
    assert "198.51.100.2/24" not in addresses(scan, "vb")
    assert defaults(scan) == []

    # A port leaving the bridge.
    netns.ip("link", "set", "va", "nomaster")
    scan = netns.collect()
    assert scan["interfaces"]["va"]["master"] is None
    assert scan["interfaces"]["br0"]["lowers"] == []


def test_macvlan_and_tun_kinds(netns: NetNS) -> None:
    netns.ip("link", "add", "va", "type", "veth", "peer", "name", "vb")
    netns.ip("link", "add", "link", "vb", "name", "mv0", "type", "macvlan")
    netns.ip("tuntap", "add", "tp0", "mode", "tap")
    scan = netns.collect()
    ifs = scan["interfaces"]
    assert ifs["mv0"]["kind"] == "macvlan"
    assert ifs["mv0"]["lowers"] == ["vb"]
    assert ifs["vb"]["uppers"] == ["mv0"]
    assert ifs["tp0"]["kind"] == "tun"  # rtnetlink names tun and tap devices alike


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname(), timeout=5)
    accepted, _ = server.accept()
    try:
        yield server, client, accepted
    finally:
        for s in (accepted, client, server):
            s.close()


def test_live_loopback_connection_is_established(tcp_pair: tuple[socket.socket, socket.socket, socket.socket]) -> None:
    server, client, accepted = tcp_pair
    listen_port = server.getsockname()[1]
    client_port = client.getsockname()[1]
    socks = parse_proc_net(Path("/proc/net/tcp").read_text(), "tcp")
    by_inode = {s.inode: s for s in socks}

    listener = by_inode[os.fstat(server.fileno()).st_ino]
    assert (listener.local, listener.local_port, listener.state) == ("127.0.0.1", listen_port, "LISTEN")
    out = by_inode[os.fstat(client.fileno()).st_ino]
    assert (out.local_port, out.remote, out.remote_port, out.state) == (
        client_port,
        "127.0.0.1",
        listen_port,
        "ESTABLISHED",
    )
    back = by_inode[os.fstat(accepted.fileno()).st_ino]
    assert (back.local_port, back.remote_port, back.state) == (listen_port, client_port, "ESTABLISHED")

    # The socket inodes lead back to this very process.
    inode = os.fstat(client.fileno()).st_ino
    owners = scan_processes(Roots.live_system(), [], socket_inodes={inode}).value.socket_owners
    assert (os.getpid(), Path(f"/proc/{os.getpid()}/comm").read_text().strip()) in owners[inode]


def test_ipv6_loopback_connection_is_established() -> None:
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        server.bind(("::1", 0))
    except OSError:
        server.close()
        pytest.skip("no IPv6 loopback")
    server.listen()
    client = socket.create_connection(("::1", server.getsockname()[1]), timeout=5)
    accepted, _ = server.accept()
    try:
        socks = {s.inode: s for s in parse_proc_net(Path("/proc/net/tcp6").read_text(), "tcp6")}
        out = socks[os.fstat(client.fileno()).st_ino]
        assert (out.local, out.remote, out.remote_port, out.state) == (
            "::1",
            "::1",
            server.getsockname()[1],
            "ESTABLISHED",
        )
    finally:
        for s in (accepted, client, server):
            s.close()


DEBIAN_PYTHON = "/usr/bin/python3"


def _debian_pyroute2() -> str | None:
    probe = subprocess.run(
        [DEBIAN_PYTHON, "-c", "import pyroute2, importlib.metadata as m; print(m.version('pyroute2'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


@pytest.mark.debian
def test_debian_pyroute2_dumps_the_same(netns: NetNS) -> None:
    """The guest package runs on Debian 12's python3-pyroute2 (0.7): same links, addresses, routes."""
    if not Path(DEBIAN_PYTHON).exists() or _debian_pyroute2() is None:
        pytest.skip("Debian's python3-pyroute2 is not installed")
    netns.ip("link", "add", "va", "type", "veth", "peer", "name", "vb")
    netns.ip("link", "add", "br0", "type", "bridge")
    netns.ip("link", "set", "va", "master", "br0")
    for link in ("lo", "va", "vb", "br0"):
        netns.ip("link", "set", link, "up")
    netns.ip("addr", "add", "198.51.100.2/24", "dev", "vb")
    netns.ip("-6", "addr", "add", "2001:db8:5::2/64", "dev", "vb", "nodad")
    netns.ip("route", "add", "default", "nexthop", "via", "198.51.100.1", "dev", "vb", "nexthop", "via", "198.51.100.3")
    netns.ip("-6", "route", "add", "default", "via", "2001:db8:5::1", "dev", "vb")
    netns.ip("route", "add", "203.0.113.0/24", "via", "198.51.100.9", "table", "100")

    # A bridge's operstate follows its ports asynchronously: let it settle so
    # both collections see the same link state.
    deadline = time.monotonic() + 10
    while netns.run("cat", "/sys/class/net/br0/operstate").stdout.strip() != "up":
        assert time.monotonic() < deadline, "br0 never came up"
        time.sleep(0.05)
    ours, debian = netns.collect(), netns.collect(DEBIAN_PYTHON)
    assert debian["problems"] == [] == ours["problems"]
    for key in ("interfaces", "routes"):
        assert debian[key] == ours[key], key
    # Both hops of the multipath default route, each through vb.
    assert defaults(ours) == [
        (AF_INET, "0.0.0.0/0", "198.51.100.1", "vb"),
        (AF_INET, "0.0.0.0/0", "198.51.100.3", "vb"),
        (AF_INET6, "::/0", "2001:db8:5::1", "vb"),
    ]
    assert ["203.0.113.0/24", 100] in [[r["destination"], r["table"]] for r in ours["routes"]]
