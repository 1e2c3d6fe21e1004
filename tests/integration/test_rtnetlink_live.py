"""Our rtnetlink dump (snapshot_netlink) against pyroute2's, on real links, addresses and routes in a netns.

pyroute2 stays a dependency (mutations/links.py sets interfaces down with it), so it is
the reference here: both dumps must hold the same links, kinds, addresses and
unicast routes, under the venv's pyroute2 and Debian's python3-pyroute2 0.7.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.integration.netns import NetNS, netns

__all__ = ["netns"]  # the fixture, imported for pytest

# Runs inside the namespace: both dumps, in netlink.json's schema, as JSON.
_BOTH = """
import json, socket
from pyroute2 import IPRoute
from unplugd.agent.collectors.net import snapshot_netlink

FAMILY = {socket.AF_INET: 4, socket.AF_INET6: 6}
SCOPES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
ANY = {4: "0.0.0.0", 6: "::"}

def reference():
    with IPRoute() as ipr:
        links, addrs, routes = ipr.get_links(), ipr.get_addr(), ipr.get_routes()
    names = {int(m["index"]): m.get_attr("IFLA_IFNAME") for m in links}
    out = {"links": [], "addresses": [], "routes": []}
    for m in links:
        info = m.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        out["links"].append({"ifname": names[int(m["index"])], "ifindex": int(m["index"]), "kind": kind or ""})
    for m in addrs:
        fam = FAMILY.get(m["family"])
        addr = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
        if fam and addr:
            out["addresses"].append({"ifname": names.get(int(m["index"]), ""), "family": fam, "address": addr,
                                     "prefixlen": int(m["prefixlen"]), "scope": SCOPES.get(int(m["scope"]))})
    for m in routes:
        fam = FAMILY.get(m["family"])
        if fam is None or m["type"] != 1:
            continue
        base = {"family": fam, "destination": f"{m.get_attr('RTA_DST') or ANY[fam]}/{m['dst_len']}",
                "table": int(m.get_attr("RTA_TABLE") or m["table"])}
        hops = m.get_attr("RTA_MULTIPATH")
        for hop in hops or [m]:
            oif = hop["oif"] if hops else m.get_attr("RTA_OIF")
            ifname = names.get(int(oif or 0), "")
            out["routes"].append(base | {"gateway": hop.get_attr("RTA_GATEWAY"), "ifname": ifname})
    return out

print(json.dumps({"ours": snapshot_netlink(), "pyroute2": reference()}))
"""


def _both(ns: NetNS, python: str) -> tuple[dict[str, Any], dict[str, Any]]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO / ".dev")}
    proc = ns.run("env", "-i", *(f"{k}={v}" for k, v in env.items()), python, "-c", _BOTH)
    if proc.returncode != 0:
        pytest.fail(f"dump in {ns.name} under {python} failed: {proc.stderr.strip()}")
    data = json.loads(proc.stdout)
    return data["ours"], data["pyroute2"]


def _key(entry: dict[str, Any]) -> str:
    return json.dumps(entry, sort_keys=True)


def _build(ns: NetNS) -> None:
    ns.ip("link", "add", "va", "type", "veth", "peer", "name", "vb")
    ns.ip("link", "add", "br0", "type", "bridge")
    ns.ip("link", "set", "va", "master", "br0")
    ns.ip("tuntap", "add", "dev", "tun0", "mode", "tun")
    ns.ip("link", "add", "link", "vb", "name", "mv0", "type", "macvlan", "mode", "bridge")
    for link in ("lo", "va", "vb", "br0", "tun0", "mv0"):
        ns.ip("link", "set", link, "up")
    ns.ip("addr", "add", "198.51.100.2/24", "dev", "vb")
    ns.ip("addr", "add", "198.51.100.7/24", "dev", "vb")  # a secondary
    ns.ip("-6", "addr", "add", "2001:db8:5::2/64", "dev", "vb", "nodad")
    ns.ip("addr", "add", "10.9.0.1", "peer", "10.9.0.2", "dev", "tun0")  # point-to-point: local vs peer
    ns.ip("route", "add", "default", "nexthop", "via", "198.51.100.1", "dev", "vb", "nexthop", "via", "198.51.100.3")
    ns.ip("-6", "route", "add", "default", "via", "2001:db8:5::1", "dev", "vb")
    ns.ip("-6", "route", "add", "2001:db8:9::/48", "nexthop", "via", "2001:db8:5::1", "nexthop", "via", "2001:db8:5::3")
    ns.ip("route", "add", "203.0.113.0/24", "via", "198.51.100.9", "table", "100")
    ns.ip("route", "add", "192.0.2.0/24", "dev", "mv0", "table", "5000")  # above 255: only in RTA_TABLE
    ns.ip("route", "add", "blackhole", "192.0.2.128/25")  # not unicast: left out by both


def _assert_same(ours: dict[str, Any], ref: dict[str, Any]) -> None:
    for key in ("links", "addresses", "routes"):
        assert sorted(map(_key, ours[key])) == sorted(map(_key, ref[key])), key


def test_our_dump_matches_pyroute2(netns: NetNS) -> None:
    _build(netns)
    ours, ref = _both(netns, sys.executable)
    _assert_same(ours, ref)
    kinds = {link["ifname"]: link["kind"] for link in ours["links"]}
    assert kinds == {"lo": "", "va": "veth", "vb": "veth", "br0": "bridge", "tun0": "tun", "mv0": "macvlan"}
    assert {"ifname": "tun0", "family": 4, "address": "10.9.0.1", "prefixlen": 32, "scope": "global"} in ours[
        "addresses"
    ]
    tables = {(r["destination"], r["table"]) for r in ours["routes"]}
    assert {("203.0.113.0/24", 100), ("192.0.2.0/24", 5000)} <= tables
    assert not any(r["destination"] == "192.0.2.128/25" for r in ours["routes"])
    v6_hops = sorted(r["gateway"] for r in ours["routes"] if r["destination"] == "2001:db8:9::/48")
    assert v6_hops == ["2001:db8:5::1", "2001:db8:5::3"]


DEBIAN_PYTHON = "/usr/bin/python3"


@pytest.mark.debian
def test_our_dump_matches_debian_pyroute2(netns: NetNS) -> None:
    probe = subprocess.run([DEBIAN_PYTHON, "-c", "import pyroute2"], capture_output=True, check=False)
    if not Path(DEBIAN_PYTHON).exists() or probe.returncode != 0:
        pytest.skip("Debian's python3-pyroute2 is not installed")
    _build(netns)
    ours, ref = _both(netns, DEBIAN_PYTHON)
    _assert_same(ours, ref)
