"""What `unplugctl plug` is asked to add, parsed: QEMU `-device` / `-netdev` / `-blockdev` text and spec files. Pure.

A device spec is QEMU's own `-device` syntax: `virtio-net-pci,netdev=n3,mac=52:54:00:12:34:56`
(the driver first or as `driver=`, `,,` for a comma inside a value). device_add takes every
property as a string, so the properties travel as QEMU would read them from a command line.

`--blockdev` is `-blockdev` syntax: dotted keys nest (`file.filename=...`), or a JSON object
as -blockdev also takes. blockdev-add is strictly typed over QMP (`read-only` must be a JSON
boolean, QEMU 7.2 refuses "on"), and without QEMU's schema a keyval value cannot be told a
string from a boolean: the keyval form carries strings, the JSON form carries any type.
`--netdev` is `-netdev` syntax, handed to QEMU's own parser as it is (see QmpBackend.netdev_add).

A spec file (JSON or TOML) lists several slots, each with its devices and backends:

    [[slots]]
    slot = "br0:0x3"                 # optional: a free slot is chosen otherwise
    netdevs = ["user,id=hn1,restrict=on"]
    devices = ["virtio-net-pci,netdev=hn1", "virtio-blk-pci,drive=hd1"]
    blockdevs = ['{"driver": "qcow2", "node-name": "hd1", "file": {"driver": "file", "filename": "/d.qcow2"}}']
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from unplugd.host.errors import HostError

__all__ = [
    "DeviceSpec",
    "SlotRequest",
    "SpecError",
    "parse_blockdev",
    "parse_device",
    "parse_keyval",
    "parse_netdev",
    "parse_spec_file",
    "request_from_args",
]

# QEMU ids: a letter, then letters, digits, '-', '.', '_' (QEMU's id_wellformed()).
_QEMU_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
# Where a device goes is unplugctl's choice (--slot, or a free slot): a spec that names it
# would disagree with the plan, or silently decide function numbers itself.
PLACEMENT_KEYS = frozenset({"bus", "addr", "multifunction"})


class SpecError(HostError):
    """A device, backend or spec file that does not parse (a usage error)."""


def parse_keyval(text: str, *, implied: str) -> list[tuple[str, str]]:
    """`a,b=c,,d` -> [(implied, a), (b, "c,d")]: QEMU's keyval with an implied first key."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    out: list[tuple[str, str]] = []
    for n, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if not eq:
            if n == 0 and part:
                out.append((implied, part))
                continue
            raise SpecError(f"{text!r}: {part!r} is not KEY=VALUE")
        if not key:
            raise SpecError(f"{text!r}: empty key")
        out.append((key, value))
    keys = [k for k, _ in out]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise SpecError(f"{text!r}: {dup!r} given twice")
    return out


@dataclass(frozen=True)
class DeviceSpec:
    """One `-device` spec: its driver and properties, in the order given."""

    driver: str
    props: tuple[tuple[str, str], ...]
    text: str  # as the user wrote it, for messages

    @property
    def id(self) -> str | None:
        return dict(self.props).get("id")

    def prop(self, key: str) -> str | None:
        return dict(self.props).get(key)


def parse_device(text: str) -> DeviceSpec:
    pairs = parse_keyval(text.strip(), implied="driver")
    props = dict(pairs)
    driver = props.pop("driver", "")
    if not driver:
        raise SpecError(f"{text!r}: no driver (QEMU -device syntax: DRIVER,KEY=VALUE,...)")
    placed = sorted(PLACEMENT_KEYS & props.keys())
    if placed:
        raise SpecError(
            f"{text!r}: {', '.join(placed)} {'decides' if len(placed) == 1 else 'decide'} where the device goes; "
            "give the place with --slot (or `slot` in a spec file) and let unplugctl number the functions"
        )
    qid = props.get("id")
    if qid is not None and not _QEMU_ID.match(qid):
        raise SpecError(f"{text!r}: {qid!r} is not a QEMU id (a letter, then letters, digits, '-', '.', '_')")
    return DeviceSpec(driver, tuple((k, v) for k, v in pairs if k != "driver"), text)


def parse_netdev(text: str) -> str:
    """A `-netdev` spec, checked for an id (what netdev_del needs to undo it); returns its id."""
    props = dict(parse_keyval(text.strip(), implied="type"))
    qid = props.get("id", "")
    if not props.get("type") or not _QEMU_ID.match(qid):
        raise SpecError(f"--netdev {text!r}: needs TYPE,id=ID,... (QEMU -netdev syntax)")
    return qid


def parse_blockdev(text: str) -> dict[str, Any]:
    """A `-blockdev` spec -> blockdev-add's arguments; needs a node-name (what blockdev-del takes)."""
    t = text.strip()
    if t.startswith("{"):
        try:
            obj = json.loads(t)
        except ValueError as e:
            raise SpecError(f"--blockdev: not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise SpecError("--blockdev: the JSON form is an object")
    else:
        obj = {}
        for key, value in parse_keyval(t, implied="driver"):
            node: dict[str, Any] = obj
            *outer, last = key.split(".")
            for k in outer:
                child = node.setdefault(k, {})
                if not isinstance(child, dict):
                    raise SpecError(f"--blockdev {text!r}: {key!r} nests under a value")
                node = child
            if last in node:
                raise SpecError(f"--blockdev {text!r}: {key!r} nests under a value")
            node[last] = value
    name = obj.get("node-name")
    if not isinstance(name, str) or not _QEMU_ID.match(name) or not obj.get("driver"):
        raise SpecError(f"--blockdev {text!r}: needs driver=... and node-name=NAME (QEMU -blockdev syntax)")
    return obj


@dataclass(frozen=True)
class SlotRequest:
    """One slot to fill: its devices (function 0, 1, ... in this order), their backends, where."""

    devices: tuple[DeviceSpec, ...]
    netdevs: tuple[str, ...] = ()  # -netdev specs, created first
    blockdevs: tuple[Mapping[str, Any], ...] = ()  # blockdev-add arguments, created first
    slot: str | None = None  # --slot text; None: a free slot

    def __post_init__(self) -> None:
        if not 1 <= len(self.devices) <= 8:
            raise SpecError(f"a slot takes 1 to 8 devices (functions 0-7), not {len(self.devices)}")


def _strings(doc: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{where}: {key!r} must be a list of strings")
    return list(value)


def parse_spec_file(text: str, *, toml: bool) -> tuple[SlotRequest, ...]:
    """A spec file's text (TOML or JSON) -> its slots. Unknown keys are refused, not ignored."""
    try:
        doc: Any = tomllib.loads(text) if toml else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise SpecError(f"spec file does not parse: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("slots"), list) or set(doc) != {"slots"}:
        raise SpecError("a spec file holds one key, `slots`: a list of tables (devices, netdevs, blockdevs, slot)")
    out: list[SlotRequest] = []
    for n, entry in enumerate(doc["slots"], 1):
        where = f"spec file, slot {n}"
        if not isinstance(entry, dict):
            raise SpecError(f"{where}: not a table")
        extra = set(entry) - {"devices", "netdevs", "blockdevs", "slot"}
        if extra:
            raise SpecError(f"{where}: unknown keys {sorted(extra)}")
        slot = entry.get("slot")
        if slot is not None and not isinstance(slot, str):
            raise SpecError(f"{where}: `slot` is a string (BUS:SLOT or a slot path)")
        blockdevs = entry.get("blockdevs", [])
        if not isinstance(blockdevs, list):
            raise SpecError(f"{where}: `blockdevs` must be a list")
        out.append(
            SlotRequest(
                devices=tuple(parse_device(d) for d in _strings(entry, "devices", where)),
                netdevs=tuple(_checked_netdev(s) for s in _strings(entry, "netdevs", where)),
                blockdevs=tuple(parse_blockdev(json.dumps(b) if isinstance(b, dict) else str(b)) for b in blockdevs),
                slot=slot,
            )
        )
    if not out:
        raise SpecError("the spec file lists no slots")
    return tuple(out)


def _checked_netdev(text: str) -> str:
    parse_netdev(text)
    return text


def request_from_args(
    devices: Sequence[str], *, netdevs: Sequence[str] = (), blockdevs: Sequence[str] = (), slot: str | None = None
) -> SlotRequest:
    """The command line's one slot."""
    return SlotRequest(
        devices=tuple(parse_device(d) for d in devices),
        netdevs=tuple(_checked_netdev(n) for n in netdevs),
        blockdevs=tuple(parse_blockdev(b) for b in blockdevs),
        slot=slot,
    )
