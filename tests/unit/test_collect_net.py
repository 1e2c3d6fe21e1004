"""collect_net on hand-built sysfs trees and netlink.json files (captured mode), and live mode with a faked dump."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from unplugd.agent import sysio
from unplugd.agent.collectors import net
from unplugd.agent.collectors.net import collect_net, load_netlink, parse_netlink, read_interface
from unplugd.agent.errors import ParseError, ReadError
from unplugd.agent.roots import Roots
from unplugd.agent.sysio import as_read_error


def make_iface(
    base: Path,
    name: str,
    ifindex: int,
    *,
    flags: str = "0x1003",
    operstate: str = "up",
    carrier: str | None = "1",
    mac: str = "52:54:00:12:34:56",
    uevent_extra: str = "",
    dirs: tuple[str, ...] = (),
    master: str | None = None,
    uppers: tuple[str, ...] = (),
    lowers: tuple[str, ...] = (),
) -> Path:
    """A sysfs net device laid out as the kernel does: devices/.../NAME plus class/net/NAME -> it."""
    dev = base / "sys" / "devices" / "virtual" / "net" / name
    dev.mkdir(parents=True)
    (dev / "ifindex").write_text(f"{ifindex}\n")
    (dev / "flags").write_text(f"{flags}\n")
    (dev / "operstate").write_text(f"{operstate}\n")
    (dev / "address").write_text(f"{mac}\n")
    (dev / "uevent").write_text(f"{uevent_extra}INTERFACE={name}\nIFINDEX={ifindex}\n")
    if carrier is not None:
        (dev / "carrier").write_text(f"{carrier}\n")
    for d in dirs:
        (dev / d).mkdir()
    if master:
        (dev / "master").symlink_to(f"../{master}")
    for up in uppers:
        (dev / f"upper_{up}").symlink_to(f"../{up}")
    for low in lowers:
        (dev / f"lower_{low}").symlink_to(f"../{low}")
    cls = base / "sys" / "class" / "net"
    cls.mkdir(parents=True, exist_ok=True)
    (cls / name).symlink_to(f"../../devices/virtual/net/{name}")
    return dev


def write_netlink(base: Path, data: Any) -> None:
    (base / "netlink.json").write_text(json.dumps(data))


EMPTY_NETLINK: dict[str, Any] = {"version": 1, "links": [], "addresses": [], "routes": []}


def test_nic_that_is_down_reads_carrier_as_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_iface(tmp_path, "eth0", 2, flags="0x1002", operstate="down", carrier="0")
    write_netlink(tmp_path, EMPTY_NETLINK)
    real_read = sysio.read_text

    def read_text(path: Path) -> str:
        # What the kernel does: carrier of a link that is down fails with EINVAL.
        if path.name == "carrier":
            raise as_read_error(path, OSError(errno.EINVAL, os.strerror(errno.EINVAL)))
        return real_read(path)

    monkeypatch.setattr("unplugd.agent.collectors.net.read_text", read_text)
    scan, problems = collect_net(Roots.under(tmp_path))
    eth0 = scan.interfaces["eth0"]
    assert eth0.admin_up is False
    assert eth0.operstate == "down"
    assert eth0.carrier is None
    assert eth0.ifindex == 2
    assert problems == []


@pytest.mark.parametrize(("text", "expected"), [("1", True), ("0", False), ("junk", None), (None, None)])
def test_carrier_values(tmp_path: Path, text: str | None, expected: bool | None) -> None:
    make_iface(tmp_path, "eth0", 2, carrier=text)
    assert read_interface(tmp_path / "sys" / "class" / "net", "eth0").carrier is expected


def test_bond_with_two_slaves(tmp_path: Path) -> None:
    make_iface(tmp_path, "bond0", 4, uevent_extra="DEVTYPE=bond\n", dirs=("bonding",), lowers=("eth1", "eth2"))
    make_iface(tmp_path, "eth1", 2, dirs=("bonding_slave",), master="bond0", uppers=("bond0",))
    make_iface(tmp_path, "eth2", 3, dirs=("bonding_slave",), master="bond0", uppers=("bond0",))
    write_netlink(
        tmp_path,
        {
            "addresses": [{"ifname": "bond0", "family": 4, "address": "198.51.100.7", "prefixlen": 24}],
            "routes": [
                {"family": 4, "destination": "0.0.0.0/0", "gateway": "198.51.100.1", "ifname": "bond0", "table": 254}
            ],
        },
    )
    scan = collect_net(Roots.under(tmp_path)).value
    bond = scan.interfaces["bond0"]
    assert bond.kind == "bond"
    assert sorted(bond.lowers) == ["eth1", "eth2"]
    assert [str(a) for a in bond.addresses] == ["198.51.100.7/24"]
    for slave in ("eth1", "eth2"):
        assert scan.interfaces[slave].master == "bond0"
        assert scan.interfaces[slave].uppers == ("bond0",)
        assert scan.interfaces[slave].kind == ""
        assert scan.interfaces[slave].addresses == ()
    (default,) = [r for r in scan.routes if r.is_default]
    assert (default.ifname, default.gateway, default.family) == ("bond0", "198.51.100.1", socket.AF_INET)


def test_bond_kind_from_bonding_dir_without_devtype(tmp_path: Path) -> None:
    make_iface(tmp_path, "bond0", 4, dirs=("bonding",))
    assert read_interface(tmp_path / "sys" / "class" / "net", "bond0").kind == "bond"


def test_bridge_with_a_port(tmp_path: Path) -> None:
    # As this kernel shows it: DEVTYPE=bridge and bridge/ on br0, brport/ + master on the port.
    make_iface(tmp_path, "br0", 5, uevent_extra="DEVTYPE=bridge\n", dirs=("bridge", "brif"), lowers=("eth3",))
    make_iface(tmp_path, "eth3", 3, dirs=("brport",), master="br0", uppers=("br0",))
    write_netlink(tmp_path, EMPTY_NETLINK)
    scan = collect_net(Roots.under(tmp_path)).value
    assert scan.interfaces["br0"].kind == "bridge"
    assert scan.interfaces["br0"].lowers == ("eth3",)
    assert scan.interfaces["eth3"].master == "br0"
    assert scan.interfaces["eth3"].uppers == ("br0",)


def test_nic_with_only_an_ipv6_default_route(tmp_path: Path) -> None:
    make_iface(tmp_path, "eth4", 6)
    write_netlink(
        tmp_path,
        {
            "addresses": [
                {"ifname": "eth4", "family": 6, "address": "2001:db8::5", "prefixlen": 64, "scope": "global"},
                {"ifname": "eth4", "family": 6, "address": "fe80::5054:ff:fe12:3456", "prefixlen": 64, "scope": "link"},
            ],
            "routes": [
                {"family": 6, "destination": "2001:db8::/64", "gateway": None, "ifname": "eth4", "table": 254},
                {"family": 6, "destination": "::/0", "gateway": "fe80::1", "ifname": "eth4", "table": 254},
            ],
        },
    )
    scan = collect_net(Roots.under(tmp_path)).value
    defaults = [r for r in scan.routes if r.is_default]
    assert [(r.family, r.destination, r.gateway, r.ifname) for r in defaults] == [
        (socket.AF_INET6, "::/0", "fe80::1", "eth4")
    ]
    assert [(a.family, a.scope) for a in scan.interfaces["eth4"].addresses] == [
        (socket.AF_INET6, "global"),
        (socket.AF_INET6, "link"),
    ]


def test_link_kind_from_netlink_beats_silent_sysfs(tmp_path: Path) -> None:
    # veth and macvlan leave no DEVTYPE in sysfs; the capture's links[] carry the kind.
    make_iface(tmp_path, "veth0", 7)
    make_iface(tmp_path, "eth0", 2)
    write_netlink(tmp_path, EMPTY_NETLINK | {"links": [{"ifname": "veth0", "ifindex": 7, "kind": "veth"}]})
    scan = collect_net(Roots.under(tmp_path)).value
    assert scan.interfaces["veth0"].kind == "veth"
    assert scan.interfaces["eth0"].kind == ""


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"addresses": {}}',
        '{"addresses": [], "routes": [{"family": 5, "destination": "::/0", "gateway": null, "ifname": "x"}]}',
        '{"addresses": [{"ifname": "e", "family": 4, "address": "fe80::1", "prefixlen": 64}], "routes": []}',
        '{"addresses": [{"ifname": "e", "family": 4, "address": "10.0.0.1", "prefixlen": 33}], "routes": []}',
        '{"addresses": [{"ifname": "e", "family": 4, "address": "10.0.0.1", "prefixlen": "24"}], "routes": []}',
        '{"addresses": [{"ifname": "e", "family": 4, "address": "10.0.0.1", "prefixlen": true}], "routes": []}',
        '{"addresses": [{"family": 4, "address": "10.0.0.1", "prefixlen": 8}], "routes": []}',
        '{"addresses": [], "routes": [{"family": 4, "destination": "0.0.0.0", "gateway": null, "ifname": "e"}]}',
        '{"addresses": [], "routes": [{"family": 4, "destination": "::/0", "gateway": null, "ifname": "e"}]}',
        '{"addresses": [], "routes": [{"family": 4, "destination": "0.0.0.0/0", "gateway": "x", "ifname": "e"}]}',
        '{"addresses": [], "routes": [{"family": 4, "destination": "0.0.0.0/0", "gateway": null, "ifname": 3}]}',
        '{"addresses": [], "routes": [], "links": [{"ifname": "e", "kind": 7}]}',
    ],
)
def test_malformed_netlink_json(tmp_path: Path, content: str) -> None:
    path = tmp_path / "netlink.json"
    path.write_text(content)
    with pytest.raises(ParseError):
        load_netlink(path)
    # The collector turns it into a problem affecting every interface, and still reports the links.
    make_iface(tmp_path, "eth0", 2)
    scan, problems = collect_net(Roots.under(tmp_path))
    assert list(scan.interfaces) == ["eth0"]
    assert scan.interfaces["eth0"].addresses == ()
    assert scan.routes == []
    assert [(p.object, p.affects) for p in problems] == [(str(path), ("*",))]


def test_missing_netlink_json_is_a_problem_not_silence(tmp_path: Path) -> None:
    make_iface(tmp_path, "eth0", 2)
    problems = collect_net(Roots.under(tmp_path)).problems
    assert len(problems) == 1
    assert problems[0].affects == ("*",)
    with pytest.raises(ReadError):
        load_netlink(tmp_path / "netlink.json")


def test_snapshot_round_trip_normalises_addresses() -> None:
    data = parse_netlink(
        {
            "addresses": [{"ifname": "e", "family": 6, "address": "2001:DB8:0:0::1", "prefixlen": 64}],
            "routes": [{"family": 4, "destination": "10.1.2.3/8", "gateway": None, "ifname": "e"}],
        }
    )
    assert data.addresses["e"][0].address == "2001:db8::1"
    assert data.addresses["e"][0].scope == "global"
    assert data.routes[0].destination == "10.0.0.0/8"
    assert data.routes[0].table == 254


def test_unreadable_interface_is_a_problem_for_that_interface(tmp_path: Path) -> None:
    dev = make_iface(tmp_path, "eth0", 2)
    make_iface(tmp_path, "eth1", 3)
    (dev / "flags").write_text("garbage\n")
    write_netlink(tmp_path, EMPTY_NETLINK)
    scan, problems = collect_net(Roots.under(tmp_path))
    assert list(scan.interfaces) == ["eth1"]
    assert [(p.object, p.affects) for p in problems] == [("/sys/class/net/eth0", ("eth0",))]


def test_interface_vanishing_mid_scan_is_skipped(tmp_path: Path) -> None:
    make_iface(tmp_path, "eth0", 2)
    make_iface(tmp_path, "eth1", 3)
    # class/net lists eth1, but its device directory is gone (unregistered between listdir and read).
    gone = tmp_path / "sys" / "devices" / "virtual" / "net" / "eth1"
    for f in gone.iterdir():
        f.unlink()
    gone.rmdir()
    write_netlink(tmp_path, EMPTY_NETLINK)
    scan, problems = collect_net(Roots.under(tmp_path))
    assert list(scan.interfaces) == ["eth0"]
    assert problems == []


def test_sockets_are_read_and_bad_lines_mark_every_interface(tmp_path: Path) -> None:
    make_iface(tmp_path, "eth0", 2)
    make_iface(tmp_path, "lo", 1, flags="0x9", operstate="unknown", mac="00:00:00:00:00:00")
    write_netlink(tmp_path, EMPTY_NETLINK)
    pnet = tmp_path / "proc" / "net"
    pnet.mkdir(parents=True)
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    (pnet / "tcp").write_text(
        header
        + "   0: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 77 1\n"
        + "   1: 0100007F:00\n"
    )
    (pnet / "udp").write_text(header)
    # tcp6/udp6 absent: a kernel without IPv6 is not a problem.
    scan, problems = collect_net(Roots.under(tmp_path))
    assert [(s.proto, s.local_port, s.state, s.inode) for s in scan.sockets] == [("tcp", 22, "LISTEN", 77)]
    assert [(p.object, p.affects) for p in problems] == [("/proc/net/tcp", ("eth0", "lo"))]


def _live_roots(base: Path) -> Roots:
    return Roots(sys=base / "sys", proc=base / "proc", dev=base / "dev", live=True, base=base)


def test_live_uses_the_netlink_dump(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_iface(tmp_path, "eth0", 2)
    dump = {
        "version": 1,
        "links": [{"ifname": "eth0", "ifindex": 2, "kind": ""}],
        "addresses": [{"ifname": "eth0", "family": 4, "address": "192.0.2.2", "prefixlen": 24, "scope": "global"}],
        "routes": [{"family": 4, "destination": "0.0.0.0/0", "gateway": "192.0.2.1", "ifname": "eth0", "table": 254}],
    }
    monkeypatch.setattr(net, "snapshot_netlink", lambda: dump)
    scan, problems = collect_net(_live_roots(tmp_path))
    assert [str(a) for a in scan.interfaces["eth0"].addresses] == ["192.0.2.2/24"]
    assert scan.routes[0].is_default
    assert problems == []


def test_live_netlink_failure_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_iface(tmp_path, "eth0", 2)

    def broken() -> dict[str, Any]:
        raise OSError(errno.EPROTONOSUPPORT, "netlink unavailable")

    monkeypatch.setattr(net, "snapshot_netlink", broken)
    scan, problems = collect_net(_live_roots(tmp_path))
    assert "eth0" in scan.interfaces
    assert [(p.object, p.affects) for p in problems] == [("netlink", ("*",))]


def test_route_without_an_outgoing_interface_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_iface(tmp_path, "eth0", 2)
    dump = EMPTY_NETLINK | {
        "routes": [{"family": 4, "destination": "0.0.0.0/0", "gateway": "192.0.2.1", "ifname": "", "table": 254}]
    }
    monkeypatch.setattr(net, "snapshot_netlink", lambda: dump)
    problems = collect_net(_live_roots(tmp_path)).problems
    assert len(problems) == 1
    assert "0.0.0.0/0" in problems[0].detail


def test_real_sysfs_of_this_machine_reads_without_problems() -> None:
    # Whatever interfaces this machine has, each reads cleanly and lo is up.
    net_dir = Path("/sys/class/net")
    if not (net_dir / "lo").exists():
        pytest.skip("no sysfs")
    lo = read_interface(net_dir, "lo")
    assert lo.admin_up is True
    assert lo.ifindex == 1
