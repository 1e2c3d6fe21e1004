"""A small rtnetlink client: dump links, addresses and routes without pyroute2.

pyroute2 costs ~150 ms and ~25 MiB of RSS to import (it loads several hundred
modules, nftables and wifi included) against ~3 ms for the dump itself, and
the agent would carry that memory for its whole life. The three dumps need
only a handful of fixed headers and attributes (linux/netlink.h,
linux/rtnetlink.h, linux/if_link.h, linux/if_addr.h):

    nlmsghdr  len u32, type u16, flags u16, seq u32, pid u32
    ifinfomsg family u8, pad u8, type u16, index i32, flags u32, change u32
    ifaddrmsg family u8, prefixlen u8, flags u8, scope u8, index u32
    rtmsg     family, dst_len, src_len, tos, table, protocol, scope, type (u8), flags u32
    rtattr    len u16, type u16, payload padded to 4 bytes
    rtnexthop len u16, flags u8, hops u8, ifindex i32, then rtattrs (RTA_MULTIPATH)

parse_* are pure (bytes in, named tuples out: a tenth of a frozen
dataclass's import cost, this runs on every CLI start) and raise
NetlinkError on anything truncated or inconsistent; dump() does the I/O.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from typing import NamedTuple

from unplugd.agent.errors import AgentError

__all__ = [
    "AddrMsg",
    "LinkMsg",
    "NetlinkError",
    "NextHop",
    "RouteMsg",
    "dump",
    "iter_attrs",
    "iter_messages",
    "parse_addr",
    "parse_link",
    "parse_route",
]

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH

RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26

IFLA_IFNAME = 3
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_MULTIPATH = 9
RTA_TABLE = 15

_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

_NLMSGHDR = struct.Struct("=IHHII")
_RTATTR = struct.Struct("=HH")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTNEXTHOP = struct.Struct("=HBBi")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")

_ADDR_LEN: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 16}
_RECV_BUFFER = 65536
_DUMP_ATTEMPTS = 3


class NetlinkError(AgentError):
    """A malformed message, a kernel error answer, or a dump that kept changing under us."""


class LinkMsg(NamedTuple):
    ifindex: int
    name: str
    kind: str  # IFLA_INFO_KIND: veth, bridge, bond, ...; "" for none (physical NICs, lo)


class AddrMsg(NamedTuple):
    family: int
    ifindex: int
    prefixlen: int
    scope: int
    address: str  # IFA_LOCAL when present (point-to-point: IFA_ADDRESS is the peer), else IFA_ADDRESS
    label: str


class NextHop(NamedTuple):
    oif: int
    gateway: str | None


class RouteMsg(NamedTuple):
    family: int
    dst_len: int
    table: int  # RTA_TABLE when present (tables above 255), else rtmsg.table
    type: int
    dst: str | None
    oif: int | None
    gateway: str | None
    multipath: tuple[NextHop, ...] = ()


def _align(n: int) -> int:
    return (n + 3) & ~3


def iter_messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of each netlink message in one datagram."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < _NLMSGHDR.size:
            raise NetlinkError(f"truncated netlink header at byte {offset}")
        length, mtype, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise NetlinkError(f"netlink message length {length} at byte {offset} does not fit {len(data)} bytes")
        yield mtype, flags, seq, data[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)


def iter_attrs(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type without the nested/byte-order bits, payload) of each rtattr from offset on."""
    while offset < len(data):
        if len(data) - offset < _RTATTR.size:
            raise NetlinkError(f"truncated attribute header at byte {offset}")
        length, atype = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > len(data):
            raise NetlinkError(f"attribute length {length} at byte {offset} does not fit {len(data)} bytes")
        yield atype & _NLA_TYPE_MASK, data[offset + _RTATTR.size : offset + length]
        offset += _align(length)


def _attrs(data: bytes, offset: int) -> dict[int, bytes]:
    return dict(iter_attrs(data, offset))  # a repeated attribute: the last one, as the kernel never repeats these


def _string(payload: bytes) -> str:
    return os.fsdecode(payload.split(b"\0", 1)[0])  # names are bytes to the kernel; keep them as sysfs shows them


def _u32(payload: bytes, what: str) -> int:
    if len(payload) < _U32.size:
        raise NetlinkError(f"{what}: {len(payload)} bytes, want 4")
    value: int = _U32.unpack_from(payload)[0]
    return value


def _ip(family: int, payload: bytes, what: str) -> str:
    want = _ADDR_LEN.get(family)
    if want is None or len(payload) != want:
        raise NetlinkError(f"{what}: {len(payload)} bytes for address family {family}")
    return socket.inet_ntop(family, payload)


def _fixed(payload: bytes, header: struct.Struct, what: str) -> tuple[int, ...]:
    if len(payload) < header.size:
        raise NetlinkError(f"{what}: {len(payload)} bytes, want at least {header.size}")
    values: tuple[int, ...] = header.unpack_from(payload)
    return values


def parse_link(payload: bytes) -> LinkMsg:
    """An RTM_NEWLINK payload: ifinfomsg + attributes."""
    _family, _type, index, _flags, _change = _fixed(payload, _IFINFOMSG, "ifinfomsg")
    attrs = _attrs(payload, _IFINFOMSG.size)
    if IFLA_IFNAME not in attrs:
        raise NetlinkError(f"link {index} without IFLA_IFNAME")
    kind = ""
    if IFLA_LINKINFO in attrs:
        info = dict(iter_attrs(attrs[IFLA_LINKINFO]))
        kind = _string(info.get(IFLA_INFO_KIND, b""))
    return LinkMsg(ifindex=index, name=_string(attrs[IFLA_IFNAME]), kind=kind)


def parse_addr(payload: bytes) -> AddrMsg | None:
    """An RTM_NEWADDR payload; None for families other than IPv4/IPv6 or without an address."""
    family, prefixlen, _flags, scope, index = _fixed(payload, _IFADDRMSG, "ifaddrmsg")
    if family not in _ADDR_LEN:
        return None
    attrs = _attrs(payload, _IFADDRMSG.size)
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if raw is None:
        return None
    return AddrMsg(
        family=family,
        ifindex=index,
        prefixlen=prefixlen,
        scope=scope,
        address=_ip(family, raw, f"address on link {index}"),
        label=_string(attrs.get(IFA_LABEL, b"")),
    )


def _nexthops(family: int, data: bytes) -> tuple[NextHop, ...]:
    hops: list[NextHop] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _RTNEXTHOP.size:
            raise NetlinkError(f"truncated rtnexthop at byte {offset}")
        length, _flags, _hops, ifindex = _RTNEXTHOP.unpack_from(data, offset)
        if length < _RTNEXTHOP.size or offset + length > len(data):
            raise NetlinkError(f"rtnexthop length {length} at byte {offset} does not fit {len(data)} bytes")
        attrs = _attrs(data[offset : offset + length], _RTNEXTHOP.size)
        gateway = _ip(family, attrs[RTA_GATEWAY], "nexthop gateway") if RTA_GATEWAY in attrs else None
        hops.append(NextHop(oif=ifindex, gateway=gateway))
        offset += _align(length)
    return tuple(hops)


def parse_route(payload: bytes) -> RouteMsg | None:
    """An RTM_NEWROUTE payload; None for families other than IPv4/IPv6 (MPLS, multicast tables)."""
    family, dst_len, _src_len, _tos, table, _proto, _scope, rtype, _flags = _fixed(payload, _RTMSG, "rtmsg")
    if family not in _ADDR_LEN:
        return None
    attrs = _attrs(payload, _RTMSG.size)
    return RouteMsg(
        family=family,
        dst_len=dst_len,
        table=_u32(attrs[RTA_TABLE], "RTA_TABLE") if RTA_TABLE in attrs else table,
        type=rtype,
        dst=_ip(family, attrs[RTA_DST], "route destination") if RTA_DST in attrs else None,
        oif=_u32(attrs[RTA_OIF], "RTA_OIF") if RTA_OIF in attrs else None,
        gateway=_ip(family, attrs[RTA_GATEWAY], "route gateway") if RTA_GATEWAY in attrs else None,
        multipath=_nexthops(family, attrs[RTA_MULTIPATH]) if RTA_MULTIPATH in attrs else (),
    )


def _request(mtype: int, seq: int, body: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def _dump_once(sock: socket.socket, mtype: int, seq: int, body: bytes) -> tuple[list[tuple[int, bytes]], bool]:
    """Every (type, payload) of one dump, and whether the kernel flagged it as interrupted."""
    sock.send(_request(mtype, seq, body))
    out: list[tuple[int, bytes]] = []
    interrupted = False
    while True:
        data, _anc, msg_flags, _addr = sock.recvmsg(_RECV_BUFFER)
        if msg_flags & socket.MSG_TRUNC:
            raise NetlinkError(f"netlink datagram larger than {_RECV_BUFFER} bytes")
        if not data:
            raise NetlinkError("netlink socket closed mid-dump")
        for rtype, flags, rseq, payload in iter_messages(data):
            if rseq != seq:
                continue  # an answer to an earlier request: not ours
            interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
            if rtype == NLMSG_DONE:
                return out, interrupted
            if rtype == NLMSG_ERROR:
                code = _I32.unpack_from(payload)[0] if len(payload) >= _I32.size else 0
                if code == 0:  # an acknowledgement, not an error
                    continue
                raise NetlinkError(f"netlink dump {mtype}: {os.strerror(-code)}")
            out.append((rtype, payload))


def dump(*, timeout: float = 5.0) -> tuple[list[LinkMsg], list[AddrMsg], list[RouteMsg]]:
    """Links, IPv4/IPv6 addresses and routes (all tables) of this network namespace.

    OSError when the socket fails, NetlinkError on a malformed answer or a
    dump that was interrupted by changes on every attempt.
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        seq = 0

        def messages(mtype: int, body: bytes, want: int) -> list[bytes]:
            nonlocal seq
            for _ in range(_DUMP_ATTEMPTS):
                seq += 1
                got, interrupted = _dump_once(sock, mtype, seq, body)
                if not interrupted:  # a consistent snapshot; retry when it changed mid-dump
                    return [payload for rtype, payload in got if rtype == want]
            raise NetlinkError(f"netlink dump {mtype} kept changing during {_DUMP_ATTEMPTS} attempts")

        links = [
            parse_link(p) for p in messages(RTM_GETLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0), RTM_NEWLINK)
        ]
        addrs = [
            parse_addr(p) for p in messages(RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0), RTM_NEWADDR)
        ]
        routes = [
            parse_route(p)
            for p in messages(RTM_GETROUTE, _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0), RTM_NEWROUTE)
        ]
    return links, [a for a in addrs if a is not None], [r for r in routes if r is not None]
