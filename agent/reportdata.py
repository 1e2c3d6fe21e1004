"""Model + verdicts -> the Report as plain Python data, and its canonical JSON, without protobuf.

The one place the model is mapped onto the Report's fields. `report_data` gives a dict keyed by
the .proto's field names (enums by their names, `generated_at` as seconds and nanos): report.py
makes the protobuf message of it (`Report(**data)`, which checks every name and enum label), and
`to_json` prints protobuf's canonical JSON mapping of it byte for byte as `json_format` would
(lowerCamelCase keys, fields at their default printed after the others, uint64 as a string,
the timestamp as RFC 3339), so `unplugd inspect --json` imports no protobuf: importing
report_pb2 and json_format was ~30 ms of the ~100 ms the command took (issue 13).
tests/unit/test_reportdata.py holds both to the same bytes on every scenario tree.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import unplugd
from unplugd.agent.model import BlockDevice, DeviceNode, Inventory, Mount, NetInterface, PciFunction, format_devno
from unplugd.agent.readiness.reasons import FunctionVerdict, Reason, State
from unplugd.pci import PciAddress
from unplugd.text import wire_text as _w

__all__ = [
    "REASON_PREFIX",
    "STATE_PREFIX",
    "UNJUDGED",
    "Data",
    "from_json",
    "functions_data",
    "keep_functions",
    "report_data",
    "to_json",
    "worst",
]

Data = dict[str, Any]

STATE_PREFIX = "FUNCTION_STATE_"  # the proto's FunctionState labels: FUNCTION_STATE_BUSY
REASON_PREFIX = "REASON_CODE_"  # and ReasonCode's (unplugd.reason_codes.PREFIX, which imports protobuf)

_RANK = {State.READY: 0, State.UNKNOWN: 1, State.BUSY: 2}
_STATE = {s: STATE_PREFIX + s.value for s in State}
UNJUDGED = STATE_PREFIX + "UNSPECIFIED"  # functions_data's state: nothing was judged
_LABEL_RANK = {_STATE[s]: r for s, r in _RANK.items()}

# What the JSON mapping needs to know of report.proto beyond names and Python types (the test
# compares with json_format on every scenario, so a field added to the proto and not here fails).
_ENUM_FIELDS = frozenset({"state", "code"})  # default: the *_UNSPECIFIED label (number 0)
_INT64_FIELDS = frozenset({"size_bytes"})  # 64-bit integers are JSON strings
_TIMESTAMP_FIELDS = frozenset({"generated_at"})  # google.protobuf.Timestamp, a message: printed only when set


def worst(states: Sequence[State]) -> State:
    """BUSY > UNKNOWN > READY; READY for nothing at all."""
    return max(states, key=_RANK.__getitem__, default=State.READY)


def report_data(inventory: Inventory, verdicts: Sequence[FunctionVerdict]) -> Data:
    """The Report for the functions that have a verdict, in inventory order.

    Every field of every message is present (at its default when empty): the JSON mapping
    prints defaults, and the constructor sets them all the same.
    """
    by_addr = {v.address: v for v in verdicts}
    mount_points = _mount_points(inventory)
    now = time.time_ns()  # what Timestamp.GetCurrentTime() takes
    return {
        "functions": [
            _function(inventory, f, by_addr[f.address], mount_points)
            for f in inventory.functions
            if f.address in by_addr
        ],
        "slots": _slots(inventory, by_addr),
        "hostname": _w(inventory.hostname),
        "kernel": _w(inventory.kernel),
        "agent_version": unplugd.__version__,
        "generated_at": {"seconds": now // 1_000_000_000, "nanos": now % 1_000_000_000},
        "problems": [{"object": _w(p.object), "detail": _w(p.detail)} for p in inventory.problems],
        "from_capture": not inventory.live,
    }


def functions_data(inventory: Inventory) -> Data:
    """The Report of an inventory of PCI functions alone, unjudged (GetReportRequest.functions_only):
    each function and slot at UNJUDGED, without reasons."""
    data = report_data(inventory, [FunctionVerdict(f.address, f.path, State.READY) for f in inventory.functions])
    for item in (*data["functions"], *data["slots"]):
        item["state"] = UNJUDGED
    return data


def keep_functions(data: Data, addresses: Collection[str]) -> Data:
    """A copy with only the given functions (guest BDFs) and the slots they sit in.

    Slots stay whole: their function list and state still cover every sibling,
    because unplugging one function takes its whole slot.
    """
    functions = [f for f in data["functions"] if f["address"] in addresses]
    slots = {f["slot"] for f in functions}
    return {**data, "functions": functions, "slots": [s for s in data["slots"] if s["address"] in slots]}


# --------------------------------------------------------------------------- JSON


def to_json(data: Data, *, indent: int | None = 2) -> str:
    """protobuf's canonical JSON of the Report, as json_format.MessageToJson prints it with defaults."""
    import json  # here: `unplugd inspect`'s table, check and the served message need none of it

    return json.dumps(_json_message(data), indent=indent)


_JSON_NAMES: dict[str, str] = {}


def _json_name(field: str) -> str:
    """protoc's json_name: snake_case -> lowerCamelCase (mount_points -> mountPoints)."""
    name = _JSON_NAMES.get(field)
    if name is None:
        head, *rest = field.split("_")
        name = _JSON_NAMES[field] = head + "".join(p[:1].upper() + p[1:] for p in rest)
    return name


def _json_message(msg: Mapping[str, Any]) -> dict[str, Any]:
    """Set fields first, in field order, then those at their default (json_format's order).

    One loop with the common cases first (a report naming 2,000 processes has ~40,000 fields):
    strings as they are, lists of strings as they are, lists of messages converted."""
    out: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    names = _JSON_NAMES
    for field, value in msg.items():
        name = names.get(field) or _json_name(field)
        kind = type(value)
        if kind is str:
            if value and not (field in _ENUM_FIELDS and value.endswith("_UNSPECIFIED")):
                out[name] = value
            else:
                defaults[name] = value
        elif kind is list:
            if not value:
                defaults[name] = []
            elif type(value[0]) is dict:
                out[name] = [_json_message(v) for v in value]
            else:  # repeated strings (no repeated 64-bit integers in report.proto)
                out[name] = value
        elif kind is dict:
            out[name] = _timestamp(value) if field in _TIMESTAMP_FIELDS else _json_message(value)
        elif value:  # int, bool
            out[name] = str(value) if field in _INT64_FIELDS else value
        else:
            defaults[name] = str(value) if field in _INT64_FIELDS else value
    out.update(defaults)
    return out


def from_json(doc: Mapping[str, Any]) -> Data:
    """to_json's document (parsed) back into the data: what the table renders of the agent's answer.

    The inverse of _json_message: lowerCamelCase -> the proto's names, int64 strings -> ints,
    the timestamp -> seconds and nanos (tests/unit/test_reportdata.py: from_json(to_json(d)) == d)."""
    out: Data = {}
    for name, value in doc.items():
        field = _FIELD_NAMES.get(name) or _field_name(name)
        if type(value) is dict:
            out[field] = from_json(value)
        elif type(value) is list and value and type(value[0]) is dict:
            out[field] = [from_json(v) for v in value]
        elif field in _INT64_FIELDS:
            out[field] = int(value)
        elif field in _TIMESTAMP_FIELDS:
            out[field] = _timestamp_back(value)
        else:
            out[field] = value
    return out


_FIELD_NAMES: dict[str, str] = {}


def _field_name(name: str) -> str:
    """lowerCamelCase -> snake_case (mountPoints -> mount_points): _json_name's inverse."""
    field = _FIELD_NAMES[name] = "".join("_" + c.lower() if c.isupper() else c for c in name)
    return field


def _timestamp_back(text: str) -> dict[str, int]:
    """_timestamp's inverse: '2026-12-02T14:44:27.5Z' -> seconds and nanos (UTC)."""
    import datetime  # the table of the agent's answer only

    whole, _, fraction = text.removesuffix("Z").partition(".")
    moment = datetime.datetime.fromisoformat(whole)  # not strptime, which imports re and locale
    seconds = (moment - datetime.datetime(1970, 1, 1)) // datetime.timedelta(seconds=1)
    return {"seconds": seconds, "nanos": int(fraction.ljust(9, "0")) if fraction else 0}


def _timestamp(ts: Mapping[str, int]) -> str:
    """Timestamp.ToJsonString: UTC, with 0, 3, 6 or 9 digits of fraction."""
    nanos = ts["nanos"]
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts["seconds"]))
    if nanos == 0:
        return text + "Z"
    if nanos % 1_000_000 == 0:
        return f"{text}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{text}.{nanos // 1_000:06d}Z"
    return f"{text}.{nanos:09d}Z"


# --------------------------------------------------------------------------- pieces


def _function(
    inventory: Inventory, f: PciFunction, v: FunctionVerdict, mount_points: dict[tuple[int, int], list[str]]
) -> Data:
    block = (inventory.block_devices.get(name) for name in v.block_devices or f.block_devices)
    ifaces = (inventory.interfaces.get(name) for name in f.net_interfaces)
    return {
        "address": str(f.address),
        "pci_path": str(f.path),
        "state": _STATE[v.state],
        "reasons": [_reason(r) for r in v.reasons],
        "slot": f.address.slot_key,
        "slot_path": f.path.slot_path,
        "vendor_id": f"{f.vendor_id:04x}",
        "device_id": f"{f.device_id:04x}",
        "class_code": f"{f.class_code:06x}",
        "vendor_name": _w(f.vendor_name or ""),
        "device_name": _w(f.device_name or ""),
        "class_name": _w(f.class_name or ""),
        "driver": _w(f.driver or ""),
        "is_bridge": f.is_bridge,
        "hotplug_slot": _w(f.hotplug_slot or ""),
        "block_devices": [_block(bd, mount_points) for bd in block if bd is not None],
        "net_interfaces": [_interface(i) for i in ifaces if i is not None],
        "device_nodes": [_node(n) for n in f.device_nodes],
    }


def _reason(r: Reason) -> Data:
    return {
        "code": REASON_PREFIX + r.code.value,
        "detail": _w(r.detail),
        "blocking": r.blocking,
        "object": _w(r.object),
        "chain": [_w(c) for c in r.chain],
        "mount_point": _w(r.mount_point),
        "processes": [{"pid": p.pid, "command": _w(p.command), "fds": list(p.fds)} for p in r.processes],
        "addresses": [_w(a) for a in r.addresses],
    }


def _mount_points(inventory: Inventory) -> dict[tuple[int, int], list[str]]:
    """Mount points per device number: the agent's own namespace first, no repeats."""
    own: list[Mount] = [m for m in inventory.mounts if m.namespace == inventory.mount_namespace]
    other: list[Mount] = [m for m in inventory.mounts if m.namespace != inventory.mount_namespace]
    out: dict[tuple[int, int], list[str]] = {}
    for m in own + other:
        points = out.setdefault(m.devno, [])
        if m.mount_point not in points:
            points.append(m.mount_point)
    return out


def _block(bd: BlockDevice, mount_points: dict[tuple[int, int], list[str]]) -> Data:
    return {
        "name": _w(bd.name),
        "kind": bd.kind,
        "devno": format_devno(bd.devno),
        "size_bytes": max(bd.size_bytes, 0),
        "parent": _w(bd.parent or ""),
        "holders": [_w(h) for h in bd.holders],
        "mount_points": [_w(m) for m in mount_points.get(bd.devno, ())] if bd.devno[0] != 0 else [],
    }


def _interface(iface: NetInterface) -> Data:
    return {
        "name": _w(iface.name),
        "ifindex": iface.ifindex,
        "admin_up": iface.admin_up,
        "operstate": _w(iface.operstate),
        "carrier": bool(iface.carrier),
        "addresses": [str(a) for a in iface.addresses],
        "master": _w(iface.master or ""),
        "mac": _w(iface.mac),
    }


def _node(node: DeviceNode) -> Data:
    return {"path": _w(node.path), "devno": format_devno(node.devno), "type": node.kind}


def _slots(inventory: Inventory, by_addr: Mapping[PciAddress, FunctionVerdict]) -> list[Data]:
    slots: dict[str, Data] = {}
    for f in inventory.functions:
        v = by_addr.get(f.address)
        if v is None:
            continue
        key = f.address.slot_key
        slot = slots.get(key)
        if slot is None:
            slot = slots[key] = {
                "address": key,
                "slot_path": f.path.slot_path,
                "functions": [],
                "hotplug_slot": "",
                "state": _STATE[State.READY],
            }
        slot["functions"].append(str(f.address))
        if f.hotplug_slot and not slot["hotplug_slot"]:
            slot["hotplug_slot"] = _w(f.hotplug_slot)
        state = _STATE[v.state]
        if _LABEL_RANK[state] > _LABEL_RANK[slot["state"]]:
            slot["state"] = state
    return list(slots.values())
