"""Property tests for every parser of untrusted input (hypothesis, bounded so `make test` stays fast).

Two kinds: arbitrary bytes never raise anything but the parser's documented
error (tests/fuzz/targets.py, shared with `make fuzz`), and what the kernel or
the other end could really write parses back to what was written, for any
name a user may choose.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import TARGETS, text_of
from unplugd.agent import treetext
from unplugd.agent.collectors import mounts, net, rtnetlink, swaps
from unplugd.agent.model import ScanProblem, format_devno, parse_devno
from unplugd.agent.sysio import parse_uevent
from unplugd.framing import MAX_PAYLOAD, Frame, FrameDecoder, FrameKind, encode_frame, sync_preamble
from unplugd.pci import PciAddress, PciPath
from unplugd.text import display_text, unescape_octal, wire_text

# Enough to find the shallow bugs on every run, few enough that all of them take seconds;
# `make fuzz` runs the same targets for minutes. No deadline: the machine is shared.
BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A name the kernel accepts in a path component: any byte but NUL and "/".
component = st.binary(min_size=1, max_size=24).filter(lambda b: b"\0" not in b and b"/" not in b)
path = st.lists(component, min_size=1, max_size=4).map(lambda parts: b"/" + b"/".join(parts))


def _kernel_escape(raw: bytes) -> str:
    """Space, tab, newline and backslash as \\ooo, as the kernel writes mountinfo and /proc/swaps."""
    return text_of(b"".join(b"\\%03o" % c if c in b" \t\n\\" else bytes([c]) for c in raw))


# --------------------------------------------------------------------------- arbitrary bytes


@pytest.mark.parametrize("name", sorted(TARGETS))
@BOUNDED
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_the_documented_error(name: str, data: bytes) -> None:
    TARGETS[name](data)


# --------------------------------------------------------------------------- what the kernel writes


@BOUNDED
@given(points=st.lists(path, min_size=1, max_size=5), source=path)
def test_mountinfo_round_trips_any_path(points: list[bytes], source: bytes) -> None:
    lines = [
        f"{20 + i} 1 252:{i} / {_kernel_escape(p)} rw,relatime shared:1 - ext4 {_kernel_escape(source)} rw"
        for i, p in enumerate(points)
    ]
    parsed = mounts.parse_mountinfo("\n".join(lines) + "\n")
    assert [m.mount_point for m in parsed] == [text_of(p) for p in points]
    assert {m.source for m in parsed} == {text_of(source)}


@BOUNDED
@given(paths=st.lists(path, min_size=1, max_size=5))
@example(paths=[b"/swap\x0bfile", b"/\x1c\x85"])  # whitespace to str.split(), not to the kernel
def test_swaps_round_trip_any_path(paths: list[bytes]) -> None:
    text = "Filename\tType\tSize\tUsed\tPriority\n" + "".join(
        f"{_kernel_escape(p)}\tfile\t{i}\t0\t-2\n" for i, p in enumerate(paths)
    )
    assert [s if isinstance(s, ScanProblem) else s[0] for s in swaps.parse_swaps(text)] == [text_of(p) for p in paths]


@BOUNDED
@given(ifindex=st.integers(1, 2**31 - 1), name=st.binary(min_size=1, max_size=15).filter(lambda b: b"\0" not in b))
def test_rtnetlink_link_keeps_any_interface_name(ifindex: int, name: bytes) -> None:
    attr = name + b"\0"
    rta = struct.pack("=HH", 4 + len(attr), rtnetlink.IFLA_IFNAME) + attr
    rta += bytes(-len(rta) % 4)
    payload = struct.pack("=BxHiII", 0, 1, ifindex, 0, 0) + rta
    msg = struct.pack("=IHHII", 16 + len(payload), 16, 0, 1, 0) + payload
    ((_, _, _, body),) = list(rtnetlink.iter_messages(msg))
    link = rtnetlink.parse_link(body)
    assert (link.ifindex, link.name) == (ifindex, os.fsdecode(name))


@BOUNDED
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF), st.integers(1, 11), st.integers(0, 2**40)),
        min_size=1,
        max_size=5,
    )
)
def test_proc_net_reads_every_well_formed_line(rows: list[tuple[int, int, int, int]]) -> None:
    lines = ["  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"]
    for n, (ip, port, state, inode) in enumerate(rows):
        lines.append(
            f"{n:4d}: {ip:08X}:{port:04X} 00000000:0000 {state:02X} 00000000:00000000 "
            f"00:00000000 00000000     0        0 {inode} 1 0000000000000000 20 4 30 10 -1"
        )
    problems: list[object] = []
    found = net.parse_proc_net("\n".join(lines) + "\n", "tcp", problems)  # type: ignore[arg-type]
    assert problems == []
    assert [(s.local_port, s.inode) for s in found] == [(port, inode) for _, port, _, inode in rows]


@BOUNDED
@given(
    pairs=st.dictionaries(
        st.text(st.characters(exclude_characters="=\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), min_size=1, max_size=10)
        .map(str.strip)
        .filter(bool),
        st.text(st.characters(exclude_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=20).map(
            str.strip
        ),
        max_size=6,
    )
)
def test_uevent_round_trips(pairs: dict[str, str]) -> None:
    assert parse_uevent("".join(f"{k}={v}\n" for k, v in pairs.items())) == pairs


@BOUNDED
@given(major=st.integers(0, 2**12 - 1), minor=st.integers(0, 2**20 - 1))
def test_devno_round_trips(major: int, minor: int) -> None:
    assert parse_devno(format_devno((major, minor)) + "\n") == (major, minor)


@BOUNDED
@given(
    domain=st.integers(0, 0xFFFF),
    bus=st.integers(0, 0xFF),
    slot=st.integers(0, 0x1F),
    fn=st.integers(0, 7),
    hops=st.lists(st.tuples(st.integers(0, 0x1F), st.integers(0, 7)), min_size=1, max_size=4),
)
def test_pci_address_and_path_round_trip(
    domain: int, bus: int, slot: int, fn: int, hops: list[tuple[int, int]]
) -> None:
    addr = PciAddress(domain, bus, slot, fn)
    assert PciAddress.parse(str(addr)) == addr
    p = PciPath(domain, bus, tuple(hops))
    assert PciPath.parse(str(p)) == p
    assert PciPath.parse(p.slot_path + f".{p.function:x}") == p


# --------------------------------------------------------------------------- the wire and the archive


frames = st.lists(
    st.builds(Frame, st.sampled_from(list(FrameKind)), st.integers(1, 2**32 - 1), st.binary(max_size=64)),
    max_size=6,
)


@BOUNDED
@given(sent=frames, garbage=st.binary(max_size=256), cuts=st.lists(st.integers(1, 64), max_size=30))
def test_frames_survive_any_split_after_garbage(sent: list[Frame], garbage: bytes, cuts: list[int]) -> None:
    """What a new client sends (garbage left by a dead one, the preamble, frames) decodes to its frames."""
    stream = garbage + sync_preamble() + b"".join(encode_frame(f) for f in sent)
    decoder = FrameDecoder()
    got: list[Frame] = []
    pos = 0
    for n in cuts:
        got += decoder.feed(stream[pos : pos + n])
        pos += n
    got += decoder.feed(stream[pos:])
    assert got == sent
    assert decoder.buffered < len(encode_frame(Frame(FrameKind.DATA, 1, bytes(MAX_PAYLOAD))))


entry_name = component.filter(lambda b: b not in (b".", b"..")).map(text_of)


@BOUNDED
@given(
    files=st.dictionaries(
        st.lists(entry_name, min_size=1, max_size=3).map("/".join), st.binary(max_size=64), min_size=1, max_size=6
    ),
    link=st.binary(min_size=1, max_size=32).filter(lambda b: b"\0" not in b).map(text_of),
)
def test_treetext_round_trips_any_name_and_content(files: dict[str, bytes], link: str) -> None:
    names = sorted(files)
    # a file cannot also be a directory of another entry
    kept = {n: c for n, c in files.items() if not any(o.startswith(n + "/") for o in names)}
    entries = [treetext.Entry(n, "file", content=c) for n, c in kept.items()]
    entries.append(treetext.Entry("zz-link", "link", target=link))
    parsed = treetext.parse(treetext.pack_entries(entries))
    assert {(e.path, e.kind, e.content, e.target) for e in parsed if e.kind != "dir"} == {
        (e.path, e.kind, e.content, e.target) for e in entries
    }


@BOUNDED
@given(raw=st.binary(max_size=64))
def test_guest_text_encodings(raw: bytes) -> None:
    text = text_of(raw)
    wire = wire_text(text)
    wire.encode("utf-8")  # strict: raises on anything protobuf would refuse
    assert unescape_octal(wire) == text
    shown = display_text(wire)
    assert shown.isprintable() and "\n" not in shown
