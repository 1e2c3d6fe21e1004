"""parse_proc_net: table tests on lines captured from this machine's /proc/net/{tcp,tcp6,udp,udp6}."""

from __future__ import annotations

import sys

import pytest

from unplugd.agent.collectors.net import parse_proc_net
from unplugd.agent.model import ScanProblem

TCP_HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
TCP6_HEADER = (
    "  sl  local_address                         remote_address                        st tx_queue rx_queue"
    " tr tm->when retrnsmt   uid  timeout inode\n"
)

# Real lines (x86_64, little-endian): a listener on 0.0.0.0:2024, a TIME_WAIT to 203.0.113.80:80.
TCP_LISTEN = "   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1082 1 00000000d0be5b46 100 0 0 10 0"  # noqa: E501
TCP_TIME_WAIT = (
    "   1: 020200C0:C8D6 507100CB:0050 06 00000000:00000000 03:00000B0D 00000000     0        0 0 3 000000001860a362"
)
# [::]:47223 listening (dual stack); [::1]:54451 listening; an IPv4-mapped ESTABLISHED pair; ::1 ESTABLISHED.
TCP6_ANY = "   0: 00000000000000000000000000000000:B877 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 27310 1 00000000b24f7a5d 100 0 0 10 0"  # noqa: E501
TCP6_LOOP_LISTEN = "   1: 00000000000000000000000001000000:D4B3 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 27307 1 00000000c17158e3 100 0 0 10 0"  # noqa: E501
TCP6_MAPPED = "   2: 0000000000000000FFFF00000100007F:B877 0000000000000000FFFF00000100007F:8F52 01 00000000:00000000 00:00000000 00000000     0        0 27312 1 000000005b082e9b 20 0 0 10 -1"  # noqa: E501
TCP6_LOOP_EST = "   4: 00000000000000000000000001000000:846E 00000000000000000000000001000000:D4B3 01 00000000:00000000 00:00000000 00000000     0        0 27308 2 00000000edf17fe3 20 0 0 10 -1"  # noqa: E501
UDP6_BOUND = " 6121: 000000FD000000000000000002000000:9973 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 27313 2 000000000aa6c6b3 0"  # noqa: E501
UDP_CONNECTED = " 8096: 0100007F:E12A 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 27314 2 00000000b92df395 0"  # noqa: E501

little_endian_only = pytest.mark.skipif(sys.byteorder != "little", reason="lines captured on a little-endian host")


@little_endian_only
@pytest.mark.parametrize(
    ("proto", "line", "expected"),
    [
        ("tcp", TCP_LISTEN, ("0.0.0.0", 2024, "0.0.0.0", 0, "LISTEN", 1082)),
        ("tcp", TCP_TIME_WAIT, ("192.0.2.2", 51414, "203.0.113.80", 80, "TIME_WAIT", 0)),
        ("tcp6", TCP6_ANY, ("::", 47223, "::", 0, "LISTEN", 27310)),
        ("tcp6", TCP6_LOOP_LISTEN, ("::1", 54451, "::", 0, "LISTEN", 27307)),
        ("tcp6", TCP6_MAPPED, ("::ffff:127.0.0.1", 47223, "::ffff:127.0.0.1", 36690, "ESTABLISHED", 27312)),
        ("tcp6", TCP6_LOOP_EST, ("::1", 33902, "::1", 54451, "ESTABLISHED", 27308)),
        ("udp6", UDP6_BOUND, ("fd00::2", 39283, "::", 0, "UNCONN", 27313)),
        ("udp", UDP_CONNECTED, ("127.0.0.1", 57642, "127.0.0.1", 53, "ESTABLISHED", 27314)),
    ],
)
def test_parse_real_lines(proto: str, line: str, expected: tuple[str, int, str, int, str, int]) -> None:
    header = TCP6_HEADER if proto.endswith("6") else TCP_HEADER
    (sock,) = parse_proc_net(header + line + "\n", proto)
    assert sock.proto == proto
    assert (sock.local, sock.local_port, sock.remote, sock.remote_port, sock.state, sock.inode) == expected


@little_endian_only
def test_whole_file_keeps_order_and_skips_header() -> None:
    text = TCP6_HEADER + "\n".join([TCP6_ANY, TCP6_LOOP_LISTEN, TCP6_MAPPED, TCP6_LOOP_EST]) + "\n"
    socks = parse_proc_net(text, "tcp6")
    assert [s.inode for s in socks] == [27310, 27307, 27312, 27308]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("   0: 00000000:07E8 00000000:0000 0A", "too few fields"),
        ("   0: 0000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1", "short address"),
        ("   0: 00000000:7E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1", "short port"),
        ("   0: 0000000G:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1", "not hex"),
        ("   0: 00000000:07E8 00000000:0000 ZZ 00000000:00000000 00:00000000 00000000 0 0 1 1", "bad state"),
        ("   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 x 1", "bad inode"),
        ("   0: 00000000 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1", "no port"),
        ("garbage 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1", "no slot"),
    ],
)
def test_malformed_lines_are_skipped_with_a_problem(line: str, why: str) -> None:
    problems: list[ScanProblem] = []
    good = "   1: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 77 1"
    socks = parse_proc_net(TCP_HEADER + line + "\n" + good + "\n", "tcp", problems)
    assert [s.inode for s in socks] == [77], why
    assert len(problems) == 1
    assert problems[0].object == "/proc/net/tcp"
    assert "line 2" in problems[0].detail


def test_ipv6_line_in_ipv4_table_is_malformed() -> None:
    problems: list[ScanProblem] = []
    assert parse_proc_net(TCP6_HEADER + TCP6_ANY + "\n", "tcp", problems) == []
    assert len(problems) == 1


def test_truncated_file_and_empty_file() -> None:
    assert parse_proc_net("", "udp") == []
    assert parse_proc_net(TCP_HEADER, "tcp") == []
    problems: list[ScanProblem] = []
    # A read cut off in the middle of a line: the partial line is reported, never half-parsed.
    assert parse_proc_net(TCP_HEADER + TCP_LISTEN[:40], "tcp", problems) == []
    assert len(problems) == 1


def test_unknown_table_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown socket table"):
        parse_proc_net("", "sctp")
