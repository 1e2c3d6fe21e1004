"""One fuzz target per parser of untrusted input: bytes in, only the parser's documented error out.

Every string the agent parses comes from a kernel table a guest user can fill
(mountinfo, swaps, /proc/net/*, uevent, netlink), from a captured tree someone
handed over (treetext, netlink.json) or from the wire (the virtio-serial
framing, PCI addresses in requests). A target returns normally or raises the
error its parser documents; anything else (IndexError, KeyError,
UnicodeError, ...) is a bug the property tests (tests/unit/test_parsers_fuzz.py)
and `make fuzz` (tests/fuzz/run.py) report.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

from unplugd.agent import treetext
from unplugd.agent.collectors import mounts, net, rtnetlink, swaps
from unplugd.agent.errors import ParseError
from unplugd.agent.model import parse_devno
from unplugd.agent.sysio import parse_uevent
from unplugd.framing import FrameDecoder
from unplugd.pci import PciAddress, PciPath
from unplugd.text import display_text, unescape_octal, wire_text

__all__ = ["TARGETS", "text_of"]


def text_of(data: bytes) -> str:
    """What sysio.read_text makes of a kernel file's bytes."""
    return data.decode("utf-8", "surrogateescape")


def _mountinfo(data: bytes) -> None:
    try:
        found = mounts.parse_mountinfo(text_of(data))
    except ParseError:
        return
    for m in found:  # whatever parses must survive the report's encodings
        wire_text(m.mount_point).encode("utf-8")
        display_text(m.source)


def _swaps(data: bytes) -> None:
    swaps.parse_swaps(text_of(data))  # malformed lines become problems, never exceptions


def _proc_net(data: bytes) -> None:
    # malformed lines become problems, never exceptions
    for proto in ("tcp", "udp6"):
        net.parse_proc_net(text_of(data), proto, [])


def _uevent(data: bytes) -> None:
    parse_uevent(text_of(data))


def _rtnetlink(data: bytes) -> None:
    try:
        for _type, _flags, _seq, payload in rtnetlink.iter_messages(data):
            for parse in (rtnetlink.parse_link, rtnetlink.parse_addr, rtnetlink.parse_route):
                with contextlib.suppress(rtnetlink.NetlinkError):
                    parse(payload)
    except rtnetlink.NetlinkError:
        pass


def _netlink_json(data: bytes) -> None:
    try:
        doc = json.loads(text_of(data))
    except ValueError:
        return
    with contextlib.suppress(ParseError):
        net.parse_netlink(doc)


def _devno(data: bytes) -> None:
    text = text_of(data)
    try:
        devno = parse_devno(text)
    except ValueError:
        return
    assert parse_devno(f"{devno[0]}:{devno[1]}") == devno


def _pci(data: bytes) -> None:
    text = text_of(data)
    for kind in (PciAddress, PciPath):
        try:
            value = kind.parse(text)
        except ValueError:
            continue
        assert kind.parse(str(value)) == value, (text, str(value))


def _framing(data: bytes) -> None:
    # the stream split at every 7th byte: frames must not depend on how reads were cut
    decoder = FrameDecoder()
    for i in range(0, len(data), 7):
        decoder.feed(data[i : i + 7])
    assert decoder.buffered <= len(data)


def _treetext(data: bytes) -> None:
    try:
        entries = treetext.parse(text_of(data))
    except treetext.TreeTextError:
        return
    canonical = treetext.pack_entries(entries)  # what parses packs to a fixed point
    assert treetext.pack_entries(treetext.parse(canonical)) == canonical


def _text(data: bytes) -> None:
    text = text_of(data)
    wire = wire_text(text)
    wire.encode("utf-8")  # strict: protobuf's requirement
    assert unescape_octal(wire) == text
    assert display_text(text).isprintable()


TARGETS: dict[str, Callable[[bytes], None]] = {
    "mountinfo": _mountinfo,
    "swaps": _swaps,
    "proc_net": _proc_net,
    "uevent": _uevent,
    "rtnetlink": _rtnetlink,
    "netlink_json": _netlink_json,
    "devno": _devno,
    "pci": _pci,
    "framing": _framing,
    "treetext": _treetext,
    "text": _text,
}
