"""collectors/rtnetlink.py: the pure parsers on hand-built messages, good and malformed."""

from __future__ import annotations

import socket
import struct

import pytest

from unplugd.agent.collectors import rtnetlink as rt


def attr(atype: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


def message(mtype: int, payload: bytes, *, seq: int = 1, flags: int = rt.NLM_F_MULTI) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(payload), mtype, flags, seq, 0) + payload
    return raw + b"\0" * (-len(raw) % 4)


def ifinfo(index: int) -> bytes:
    return struct.pack("=BxHiII", 0, 1, index, 0x1043, 0)


def ifaddr(family: int, prefixlen: int, scope: int, index: int) -> bytes:
    return struct.pack("=BBBBI", family, prefixlen, 0, scope, index)


def rtm(family: int, dst_len: int, table: int, rtype: int) -> bytes:
    return struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, table, 3, 0, rtype, 0)


V4 = socket.inet_pton(socket.AF_INET, "198.51.100.1")
V4B = socket.inet_pton(socket.AF_INET, "198.51.100.2")
V6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (ifinfo(1) + attr(rt.IFLA_IFNAME, b"lo\0"), rt.LinkMsg(1, "lo", "")),
        (
            # IFLA_LINKINFO arrives with NLA_F_NESTED set; the kind is nested in it.
            ifinfo(7)
            + attr(rt.IFLA_IFNAME, b"br0\0")
            + attr(rt.IFLA_LINKINFO | 0x8000, attr(rt.IFLA_INFO_KIND, b"bridge\0")),
            rt.LinkMsg(7, "br0", "bridge"),
        ),
        (ifinfo(3) + attr(99, b"\1\2\3") + attr(rt.IFLA_IFNAME, b"eth0\0"), rt.LinkMsg(3, "eth0", "")),
        (ifinfo(4) + attr(rt.IFLA_IFNAME, b"caf\xc3\xa9\0"), rt.LinkMsg(4, "café", "")),
    ],
)
def test_parse_link(payload: bytes, expected: rt.LinkMsg) -> None:
    assert rt.parse_link(payload) == expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            ifaddr(socket.AF_INET, 24, 0, 2)
            + attr(rt.IFA_ADDRESS, V4)
            + attr(rt.IFA_LOCAL, V4)
            + attr(rt.IFA_LABEL, b"eth0\0"),
            rt.AddrMsg(socket.AF_INET, 2, 24, 0, "198.51.100.1", "eth0"),
        ),
        (
            # point-to-point: IFA_ADDRESS is the peer, IFA_LOCAL ours
            ifaddr(socket.AF_INET, 32, 0, 5) + attr(rt.IFA_ADDRESS, V4B) + attr(rt.IFA_LOCAL, V4),
            rt.AddrMsg(socket.AF_INET, 5, 32, 0, "198.51.100.1", ""),
        ),
        (
            ifaddr(socket.AF_INET6, 64, 253, 2) + attr(rt.IFA_ADDRESS, V6),
            rt.AddrMsg(socket.AF_INET6, 2, 64, 253, "2001:db8::1", ""),
        ),
        (ifaddr(socket.AF_PACKET, 0, 0, 2) + attr(rt.IFA_ADDRESS, b"\0" * 6), None),
        (ifaddr(socket.AF_INET, 24, 0, 2), None),
    ],
)
def test_parse_addr(payload: bytes, expected: rt.AddrMsg | None) -> None:
    assert rt.parse_addr(payload) == expected


def test_parse_route_plain_default_and_big_table() -> None:
    payload = (
        rtm(socket.AF_INET, 0, 252, 1)
        + attr(rt.RTA_TABLE, struct.pack("=I", 1000))
        + attr(rt.RTA_GATEWAY, V4)
        + attr(rt.RTA_OIF, struct.pack("=I", 2))
    )
    assert rt.parse_route(payload) == rt.RouteMsg(socket.AF_INET, 0, 1000, 1, None, 2, "198.51.100.1")


def test_parse_route_multipath() -> None:
    def hop(ifindex: int, gw: bytes) -> bytes:
        attrs = attr(rt.RTA_GATEWAY, gw)
        return struct.pack("=HBBi", 8 + len(attrs), 0, 0, ifindex) + attrs

    payload = rtm(socket.AF_INET, 24, 254, 1) + attr(rt.RTA_DST, V4) + attr(rt.RTA_MULTIPATH, hop(3, V4) + hop(4, V4B))
    route = rt.parse_route(payload)
    assert route is not None
    assert (route.dst, route.dst_len, route.oif, route.gateway) == ("198.51.100.1", 24, None, None)
    assert route.multipath == (rt.NextHop(3, "198.51.100.1"), rt.NextHop(4, "198.51.100.2"))


def test_parse_route_other_family_is_skipped() -> None:
    assert rt.parse_route(rtm(28, 20, 254, 1)) is None  # AF_MPLS


@pytest.mark.parametrize(
    ("parse", "payload", "message"),
    [
        (rt.parse_link, b"\0" * 8, "ifinfomsg"),
        (rt.parse_link, ifinfo(1), "without IFLA_IFNAME"),
        (rt.parse_link, ifinfo(1) + struct.pack("=HH", 40, rt.IFLA_IFNAME) + b"lo\0\0", "does not fit"),
        (rt.parse_link, ifinfo(1) + b"\x02\0", "truncated attribute"),
        (rt.parse_addr, ifaddr(socket.AF_INET, 24, 0, 2) + attr(rt.IFA_ADDRESS, V6), "16 bytes for address family"),
        (rt.parse_route, rtm(socket.AF_INET6, 0, 254, 1) + attr(rt.RTA_GATEWAY, V4), "4 bytes for address family"),
        (rt.parse_route, rtm(socket.AF_INET, 0, 254, 1) + attr(rt.RTA_TABLE, b"\1\0"), "RTA_TABLE"),
        (rt.parse_route, rtm(socket.AF_INET, 0, 254, 1) + attr(rt.RTA_MULTIPATH, b"\x20\0\0\0\1\0\0\0"), "rtnexthop"),
    ],
)
def test_malformed_payloads_raise_netlink_error(parse: object, payload: bytes, message: str) -> None:
    with pytest.raises(rt.NetlinkError, match=message):
        parse(payload)  # type: ignore[operator]


def test_iter_messages_splits_a_datagram() -> None:
    data = message(rt.RTM_NEWLINK, b"abc", seq=5) + message(rt.NLMSG_DONE, b"\0" * 4, seq=5, flags=rt.NLM_F_DUMP_INTR)
    got = list(rt.iter_messages(data))
    assert [(t, s, p) for t, _f, s, p in got] == [(rt.RTM_NEWLINK, 5, b"abc"), (rt.NLMSG_DONE, 5, b"\0" * 4)]
    assert got[1][1] & rt.NLM_F_DUMP_INTR


@pytest.mark.parametrize(
    "data",
    [
        message(rt.RTM_NEWLINK, b"abcd")[:10],  # header cut
        struct.pack("=IHHII", 64, rt.RTM_NEWLINK, 0, 1, 0) + b"\0" * 8,  # claims more than there is
        struct.pack("=IHHII", 8, rt.RTM_NEWLINK, 0, 1, 0),  # shorter than its own header
    ],
)
def test_iter_messages_rejects_garbage(data: bytes) -> None:
    with pytest.raises(rt.NetlinkError):
        list(rt.iter_messages(data))


class FakeSocket:
    """Answers each send with the datagrams queued for it (the request's seq filled in)."""

    def __init__(self, answers: list[list[bytes]]) -> None:
        self.answers = answers
        self.pending: list[bytes] = []
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        seq = struct.unpack_from("=IHHII", data)[3]
        self.pending = [d.replace(b"SEQ!", struct.pack("=I", seq)) for d in self.answers.pop(0)]
        return len(data)

    def recvmsg(self, size: int) -> tuple[bytes, list[object], int, object]:
        return self.pending.pop(0), [], 0, None


PLACEHOLDER_SEQ = struct.unpack("=I", b"SEQ!")[0]


def seq_message(mtype: int, payload: bytes, flags: int = rt.NLM_F_MULTI) -> bytes:
    """A message answering whatever request FakeSocket receives next."""
    return message(mtype, payload, seq=PLACEHOLDER_SEQ, flags=flags)


def test_dump_once_collects_until_done_and_skips_stale_answers() -> None:
    link = ifinfo(1) + attr(rt.IFLA_IFNAME, b"lo\0")
    stale = message(rt.RTM_NEWLINK, link, seq=999)
    sock = FakeSocket([[stale + seq_message(rt.RTM_NEWLINK, link), seq_message(rt.NLMSG_DONE, b"\0" * 4)]])
    got, interrupted = rt._dump_once(sock, rt.RTM_GETLINK, 7, b"")  # type: ignore[arg-type]
    assert got == [(rt.RTM_NEWLINK, link)]
    assert not interrupted
    assert struct.unpack_from("=IHHII", sock.sent[0])[1:4] == (rt.RTM_GETLINK, rt.NLM_F_REQUEST | rt.NLM_F_DUMP, 7)


def test_dump_once_reports_interruption_and_kernel_errors() -> None:
    sock = FakeSocket([[seq_message(rt.NLMSG_DONE, b"\0" * 4, flags=rt.NLM_F_MULTI | rt.NLM_F_DUMP_INTR)]])
    assert rt._dump_once(sock, rt.RTM_GETLINK, 1, b"") == ([], True)  # type: ignore[arg-type]
    sock = FakeSocket([[seq_message(rt.NLMSG_ERROR, struct.pack("=i", -1) + b"\0" * 16)]])
    with pytest.raises(rt.NetlinkError, match="Operation not permitted"):
        rt._dump_once(sock, rt.RTM_GETLINK, 1, b"")  # type: ignore[arg-type]
