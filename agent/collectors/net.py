"""Network interfaces, addresses, routes and sockets.

Links come from sysfs (roots.sys/class/net/*): flags, operstate, carrier,
master/upper/lower links, kind. Addresses and routes come from rtnetlink on a
live system (collectors/rtnetlink.py: importing pyroute2 would cost far more
than the dump itself) and from netlink.json in a captured tree, written by `unplugd capture` in the
schema snapshot_netlink() produces:

    {"version": 1,
     "links":     [{"ifname", "ifindex", "kind"}],                       (optional)
     "addresses": [{"ifname", "family": 4|6, "address", "prefixlen", "scope"}],
     "routes":    [{"family", "destination", "gateway", "ifname", "table"}]}

Sockets come from /proc/net/{tcp,tcp6,udp,udp6}. What cannot be read or parsed
becomes a ScanProblem, so the interfaces it touches are UNKNOWN, never READY.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Any, NamedTuple

from unplugd.agent.collectors import rtnetlink
from unplugd.agent.errors import ParseError, ReadError, Vanished
from unplugd.agent.lazylog import Logger
from unplugd.agent.model import Address, Collected, NetInterface, Route, ScanProblem, Socket
from unplugd.agent.roots import Roots
from unplugd.agent.sysio import listdir, parse_uevent, read_text, readlink_or

__all__ = [
    "IFF_UP",
    "SOCKET_FILES",
    "TCP_STATES",
    "NetScan",
    "NetlinkData",
    "collect_net",
    "load_netlink",
    "parse_flags",
    "parse_netlink",
    "parse_proc_net",
    "read_interface",
    "snapshot_netlink",
]

log = Logger(__name__)  # imports logging only to log (lazylog)

IFF_UP = 0x1
_IFF_TAP = 0x0002  # tun_flags: a tap (ethernet) device rather than tun

# Kernel TCP states (include/net/tcp_states.h), as /proc/net/tcp prints them.
TCP_STATES = {
    0x01: "ESTABLISHED",
    0x02: "SYN_SENT",
    0x03: "SYN_RECV",
    0x04: "FIN_WAIT1",
    0x05: "FIN_WAIT2",
    0x06: "TIME_WAIT",
    0x07: "CLOSE",
    0x08: "CLOSE_WAIT",
    0x09: "LAST_ACK",
    0x0A: "LISTEN",
    0x0B: "CLOSING",
    0x0C: "NEW_SYN_RECV",
}
SOCKET_FILES = ("tcp", "tcp6", "udp", "udp6")

# rtnetlink scopes (rtnetlink.h) by number, for addresses.
_SCOPES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_RTN_UNICAST = 1
_ANY = {4: str(ipaddress.IPv4Address(0)), 6: str(ipaddress.IPv6Address(0))}  # a default route has no RTA_DST
_RT_TABLE_MAIN = 254


class NetlinkData(NamedTuple):
    """Addresses, routes and link kinds as rtnetlink reports them."""

    addresses: dict[str, tuple[Address, ...]]  # by interface name
    routes: tuple[Route, ...]
    kinds: dict[str, str] = {}  # IFLA_INFO_KIND by name: veth, bond, ...


class NetScan(NamedTuple):
    interfaces: dict[str, NetInterface]
    routes: list[Route]
    sockets: list[Socket]


# --- sockets ---------------------------------------------------------------------------------


def _hex_ipv4(text: str) -> str:
    # One 32-bit word printed in host byte order.
    if len(text) != 8:
        raise ValueError(f"bad IPv4 field {text!r}")
    return str(ipaddress.IPv4Address(int(text, 16).to_bytes(4, sys.byteorder)))


def _hex_ipv6(text: str) -> str:
    # Four 32-bit words, each printed in host byte order.
    if len(text) != 32:
        raise ValueError(f"bad IPv6 field {text!r}")
    raw = b"".join(int(text[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, 32, 8))
    addr = ipaddress.IPv6Address(raw)
    if addr.ipv4_mapped is not None:
        # Spelled the same on every Python version (3.13 changed str() of these).
        return f"::ffff:{addr.ipv4_mapped}"
    return str(addr)


def _endpoint(text: str, v6: bool) -> tuple[str, int]:
    host, sep, port = text.partition(":")
    if not sep or len(port) != 4:
        raise ValueError(f"bad endpoint {text!r}")
    return (_hex_ipv6(host) if v6 else _hex_ipv4(host)), int(port, 16)


def _state_name(code: int, proto: str) -> str:
    if proto.startswith("udp"):
        # UDP reuses TCP_CLOSE for a socket that is bound but not connected.
        if code == 0x07:
            return "UNCONN"
        if code == 0x01:
            return "ESTABLISHED"
    return TCP_STATES.get(code, f"UNKNOWN_{code:02X}")


def parse_proc_net(text: str, proto: str, problems: list[ScanProblem] | None = None) -> list[Socket]:
    """Parse /proc/net/tcp|tcp6|udp|udp6. Pure.

    Malformed lines are skipped; when `problems` is given each one adds a
    ScanProblem there (it may have been a connection on any interface).
    """
    if proto not in SOCKET_FILES:
        raise ValueError(f"unknown socket table {proto!r}")
    v6 = proto.endswith("6")
    sockets: list[Socket] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or (lineno == 1 and fields[0] == "sl"):
            continue
        try:
            if len(fields) < 10 or not fields[0].endswith(":"):
                raise ValueError(f"expected at least 10 fields, got {len(fields)}")
            local, local_port = _endpoint(fields[1], v6)
            remote, remote_port = _endpoint(fields[2], v6)
            state = int(fields[3], 16)
            if len(fields[3]) != 2:
                raise ValueError(f"bad state {fields[3]!r}")
            inode = int(fields[9])
        except ValueError as exc:
            log.debug("/proc/net/%s line %d: %s", proto, lineno, exc)
            if problems is not None:
                problems.append(
                    ScanProblem(
                        object=f"/proc/net/{proto}",
                        detail=f"line {lineno} is malformed ({exc}): {line.strip()[:120]!r}",
                    )
                )
            continue
        sockets.append(
            Socket(
                proto=proto,
                local=local,
                local_port=local_port,
                remote=remote,
                remote_port=remote_port,
                state=_state_name(state, proto),
                inode=inode,
            )
        )
    return sockets


def _read_sockets(roots: Roots, problems: list[ScanProblem]) -> list[Socket]:
    sockets: list[Socket] = []
    for proto in SOCKET_FILES:
        path = roots.proc / "net" / proto
        try:
            text = read_text(path)
        except Vanished:
            continue  # no IPv6 in this kernel, or a capture without it
        except ReadError as exc:
            problems.append(ScanProblem(object=f"/proc/net/{proto}", detail=str(exc)))
            continue
        sockets.extend(parse_proc_net(text, proto, problems))
    return sockets


# --- netlink -------------------------------------------------------------------------------


def snapshot_netlink() -> dict[str, Any]:
    """Dump links, addresses and routes (every table) from rtnetlink, as netlink.json's schema.

    Raises OSError when the netlink socket fails and rtnetlink.NetlinkError
    on a malformed answer. Our own small client (collectors/rtnetlink.py),
    not pyroute2: importing pyroute2 alone costs ~150 ms and ~25 MiB.
    """
    link_msgs, addr_msgs, route_msgs = rtnetlink.dump()
    names = {link.ifindex: link.name for link in link_msgs}
    links = [{"ifname": link.name, "ifindex": link.ifindex, "kind": link.kind} for link in link_msgs]
    family_number: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 6}
    addresses = [
        {
            "ifname": names.get(a.ifindex, a.label),
            "family": family_number[a.family],
            "address": a.address,
            "prefixlen": a.prefixlen,
            "scope": _SCOPES.get(a.scope, str(a.scope)),
        }
        for a in addr_msgs
    ]
    routes: list[dict[str, Any]] = []
    for r in route_msgs:
        if r.type != _RTN_UNICAST:
            continue  # local, broadcast, multicast, blackhole: no interface carries traffic out
        family = family_number[r.family]
        base = {"family": family, "destination": f"{r.dst or _ANY[family]}/{r.dst_len}", "table": r.table}
        if r.multipath:
            routes.extend(base | {"gateway": hop.gateway, "ifname": names.get(hop.oif, "")} for hop in r.multipath)
        else:
            routes.append(base | {"gateway": r.gateway, "ifname": names.get(r.oif, "") if r.oif else ""})
    return {"version": 1, "links": links, "addresses": addresses, "routes": routes}


def _need(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise ParseError("netlink.json", f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ParseError("netlink.json", f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _family(obj: dict[str, Any], where: str) -> int:
    fam = _need(obj, "family", int, where)
    if fam not in _FAMILIES:
        raise ParseError("netlink.json", f"{where}: family must be 4 or 6, not {fam!r}")
    return _FAMILIES[fam]


def _list(data: dict[str, Any], key: str, required: bool) -> list[dict[str, Any]]:
    value = data.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise ParseError("netlink.json", f"{key!r} must be a list of objects")
    return value


def parse_netlink(data: Any) -> NetlinkData:
    """Validate a decoded netlink.json (or snapshot_netlink()'s dict). ParseError on anything off."""
    if not isinstance(data, dict):
        raise ParseError("netlink.json", "top level must be an object")
    addresses: dict[str, list[Address]] = {}
    for i, obj in enumerate(_list(data, "addresses", True)):
        where = f"addresses[{i}]"
        ifname = _need(obj, "ifname", str, where)
        family = _family(obj, where)
        text = _need(obj, "address", str, where)
        prefixlen = _need(obj, "prefixlen", int, where)
        scope = obj.get("scope", "global")
        if not isinstance(scope, str):
            raise ParseError("netlink.json", f"{where}: 'scope' must be a string")
        try:
            ip = ipaddress.ip_address(text)
        except ValueError as exc:
            raise ParseError("netlink.json", f"{where}: {exc}") from exc
        if _FAMILIES[ip.version] != family or not 0 <= prefixlen <= ip.max_prefixlen:
            raise ParseError("netlink.json", f"{where}: {text}/{prefixlen} does not fit family {obj['family']}")
        addresses.setdefault(ifname, []).append(Address(family, str(ip), prefixlen, scope))
    routes: list[Route] = []
    for i, obj in enumerate(_list(data, "routes", True)):
        where = f"routes[{i}]"
        family = _family(obj, where)
        dest = _need(obj, "destination", str, where)
        gateway = obj.get("gateway")
        ifname = _need(obj, "ifname", str, where)
        table = obj.get("table", _RT_TABLE_MAIN)
        if gateway is not None and not isinstance(gateway, str):
            raise ParseError("netlink.json", f"{where}: 'gateway' must be a string or null")
        if not isinstance(table, int) or isinstance(table, bool):
            raise ParseError("netlink.json", f"{where}: 'table' must be an integer")
        try:
            net = ipaddress.ip_network(dest, strict=False)
            gw = ipaddress.ip_address(gateway) if gateway else None
        except ValueError as exc:
            raise ParseError("netlink.json", f"{where}: {exc}") from exc
        if "/" not in dest or _FAMILIES[net.version] != family:
            raise ParseError("netlink.json", f"{where}: destination {dest!r} is not a family-{obj['family']} prefix")
        routes.append(Route(family, str(net), str(gw) if gw else None, ifname, table))
    kinds: dict[str, str] = {}
    for i, obj in enumerate(_list(data, "links", False)):
        name = _need(obj, "ifname", str, f"links[{i}]")
        kind = obj.get("kind") or ""
        if not isinstance(kind, str):
            raise ParseError("netlink.json", f"links[{i}]: 'kind' must be a string")
        if kind:
            kinds[name] = kind
    return NetlinkData({k: tuple(v) for k, v in addresses.items()}, tuple(routes), kinds)


def load_netlink(path: Path) -> NetlinkData:
    """Read and validate a captured netlink.json: ParseError on garbage, ReadError when unreadable."""
    import json  # captured trees only: the live scan asks the kernel

    text = read_text(path)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ParseError(str(path), f"not JSON: {exc}") from exc
    try:
        return parse_netlink(data)
    except ParseError as exc:
        raise ParseError(str(path), exc.detail) from exc


# --- links from sysfs ------------------------------------------------------------------------


def parse_flags(text: str) -> int:
    """sysfs `flags`: '0x1003' -> 0x1003; ValueError otherwise."""
    t = text.strip()
    if not t.lower().startswith("0x"):
        raise ValueError(f"flags not hex: {t!r}")
    return int(t, 16)


def _carrier(path: Path) -> bool | None:
    # Reading carrier of a link that is down fails with EINVAL: unknown, not "no carrier".
    try:
        text = read_text(path).strip()
    except ReadError:
        return None
    if text == "1":
        return True
    if text == "0":
        return False
    return None


def _kind(entries: list[str], uevent: dict[str, str], iface_dir: Path) -> str:
    devtype = uevent.get("DEVTYPE", "")
    if devtype:
        return devtype
    if "bonding" in entries:
        return "bond"
    if "bridge" in entries:
        return "bridge"
    if "tun_flags" in entries:
        try:
            return "tap" if parse_flags(read_text(iface_dir / "tun_flags")) & _IFF_TAP else "tun"
        except (ReadError, ValueError):
            return "tun"
    return ""


def read_interface(net_dir: Path, name: str, netlink_kind: str = "") -> NetInterface:
    """One interface from sysfs. Vanished when it went away; ReadError / ParseError otherwise."""
    d = net_dir / name
    entries = listdir(d)
    if not entries:
        raise Vanished(str(d), "no such interface")
    try:
        ifindex = int(read_text(d / "ifindex").strip())
        flags = parse_flags(read_text(d / "flags"))
    except ValueError as exc:
        raise ParseError(str(d), str(exc)) from exc
    operstate = read_text(d / "operstate").strip()
    mac = read_text(d / "address").strip() if "address" in entries else ""
    uevent = parse_uevent(read_text(d / "uevent")) if "uevent" in entries else {}
    master_link = readlink_or(d / "master") if "master" in entries else None
    return NetInterface(
        name=name,
        ifindex=ifindex,
        admin_up=bool(flags & IFF_UP),
        operstate=operstate,
        carrier=_carrier(d / "carrier"),
        mac=mac,
        kind=netlink_kind or _kind(entries, uevent, d),
        master=os.path.basename(master_link) if master_link else None,
        uppers=tuple(e[len("upper_") :] for e in entries if e.startswith("upper_")),
        lowers=tuple(e[len("lower_") :] for e in entries if e.startswith("lower_")),
    )


# --- the collector ---------------------------------------------------------------------------


def _netlink(roots: Roots, problems: list[ScanProblem]) -> NetlinkData | None:
    if roots.live:
        try:
            return parse_netlink(snapshot_netlink())
        except (OSError, rtnetlink.NetlinkError, ParseError) as exc:
            problems.append(ScanProblem(object="netlink", detail=f"cannot dump addresses and routes: {exc}"))
            return None
    try:
        return load_netlink(roots.netlink_snapshot)
    except (ReadError, ParseError) as exc:
        problems.append(ScanProblem(object=str(roots.netlink_snapshot), detail=str(exc)))
        return None


def collect_net(roots: Roots) -> Collected[NetScan]:
    """Every interface with its addresses, every route, every TCP/UDP socket, and what was unreadable."""
    problems: list[ScanProblem] = []
    netlink = _netlink(roots, problems)
    kinds = netlink.kinds if netlink else {}
    addresses = netlink.addresses if netlink else {}
    net_dir = roots.sys / "class" / "net"
    interfaces: dict[str, NetInterface] = {}
    try:
        names = listdir(net_dir)
    except ReadError as exc:
        problems.append(ScanProblem(object="/sys/class/net", detail=str(exc)))
        names = []
    for name in names:
        try:
            iface = read_interface(net_dir, name, kinds.get(name, ""))
        except Vanished:
            continue  # removed mid-scan: nothing left to unplug it from
        except (ReadError, ParseError) as exc:
            problems.append(ScanProblem(object=f"/sys/class/net/{name}", detail=str(exc), affects=(name,)))
            continue
        if name in addresses:
            iface = iface._replace(addresses=addresses[name])
        interfaces[name] = iface
    routes = list(netlink.routes) if netlink else []
    for route in routes:
        if not route.ifname:
            problems.append(
                ScanProblem(object="netlink", detail=f"route {route.destination} has no outgoing interface we can name")
            )
    socket_problems: list[ScanProblem] = []
    sockets = _read_sockets(roots, socket_problems)
    # A socket line we could not read may belong to any interface's addresses.
    every_iface = tuple(sorted(interfaces)) or ("*",)
    problems.extend(ScanProblem(p.object, p.detail, every_iface) for p in socket_problems)
    return Collected(NetScan(interfaces=interfaces, routes=routes, sockets=sockets), problems)
