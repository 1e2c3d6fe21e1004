"""Model + verdicts -> Report message: the one place protobuf meets the model.

Also the JSON form `unplugd inspect --json` prints (protobuf's canonical JSON
mapping), written so it works on Debian 12's python3-protobuf 3.21 as well as
on current PyPI protobuf. json_format is imported only by the JSON
functions: the agent and the table output never need it (it pulls in
text_format and friends: ~2 MiB and ~15 ms on Debian's protobuf).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import unplugd
from unplugd.agent.model import BlockDevice, DeviceNode, Inventory, Mount, NetInterface, PciFunction, format_devno
from unplugd.agent.readiness.reasons import FunctionVerdict, Reason, State
from unplugd.pci import PciAddress
from unplugd.reason_codes import code_value
from unplugd.text import wire_text as _w
from unplugd.v1 import report_pb2

__all__ = ["build_report", "keep_functions", "report_from_json", "state_name", "to_json", "worst"]

_RANK = {State.READY: 0, State.UNKNOWN: 1, State.BUSY: 2}
_PB_STATE = {
    State.READY: report_pb2.FUNCTION_STATE_READY,
    State.BUSY: report_pb2.FUNCTION_STATE_BUSY,
    State.UNKNOWN: report_pb2.FUNCTION_STATE_UNKNOWN,
}
_PB_RANK = {_PB_STATE[s]: r for s, r in _RANK.items()}


def worst(states: Sequence[State]) -> State:
    """BUSY > UNKNOWN > READY; READY for nothing at all."""
    return max(states, key=_RANK.__getitem__, default=State.READY)


def state_name(state: int) -> str:
    """FUNCTION_STATE_BUSY -> 'BUSY'."""
    return report_pb2.FunctionState.Name(state).removeprefix("FUNCTION_STATE_")  # type: ignore[arg-type]


def build_report(inventory: Inventory, verdicts: Sequence[FunctionVerdict]) -> report_pb2.Report:
    """The Report for the functions that have a verdict, in inventory order."""
    by_addr = {v.address: v for v in verdicts}
    mount_points = _mount_points(inventory)
    report = report_pb2.Report(
        hostname=_w(inventory.hostname),
        kernel=_w(inventory.kernel),
        agent_version=unplugd.__version__,
        from_capture=not inventory.live,
    )
    report.generated_at.GetCurrentTime()
    for f in inventory.functions:
        v = by_addr.get(f.address)
        if v is not None:
            _add_function(report.functions.add(), inventory, f, v, mount_points)
    _add_slots(report, inventory, by_addr)
    for p in inventory.problems:
        report.problems.add(object=_w(p.object), detail=_w(p.detail))
    return report


def keep_functions(report: report_pb2.Report, addresses: Collection[str]) -> report_pb2.Report:
    """A copy with only the given functions (guest BDFs) and the slots they sit in.

    Slots stay whole: their function list and state still cover every sibling,
    because unplugging one function takes its whole slot.
    """
    out = report_pb2.Report()
    out.CopyFrom(report)
    del out.functions[:]
    del out.slots[:]
    out.functions.extend(f for f in report.functions if f.address in addresses)
    slots = {f.slot for f in out.functions}
    out.slots.extend(s for s in report.slots if s.address in slots)
    return out


@functools.cache
def _json_kwargs() -> dict[str, bool]:
    # Fields at their default (blocking: false, admin_up: false) must still be
    # printed. protobuf 3.21 (Debian 12) calls that including_default_value_fields;
    # 5.26 renamed it always_print_fields_with_no_presence and 6.x dropped the old name.
    import inspect

    from google.protobuf import json_format

    params = inspect.signature(json_format.MessageToJson).parameters
    if "always_print_fields_with_no_presence" in params:
        return {"always_print_fields_with_no_presence": True}
    return {"including_default_value_fields": True}


def to_json(report: report_pb2.Report, *, indent: int = 2) -> str:
    """The canonical JSON mapping (lowerCamelCase names, enum names as strings)."""
    from google.protobuf import json_format

    kwargs: Any = _json_kwargs()
    return json_format.MessageToJson(report, indent=indent, **kwargs)


def report_from_json(text: str) -> report_pb2.Report:
    """Parse what to_json wrote (tests and recorded verdicts use it)."""
    from google.protobuf import json_format

    report = report_pb2.Report()
    json_format.Parse(text, report)
    return report


# --------------------------------------------------------------------------- pieces


def _add_function(
    msg: report_pb2.PciFunction,
    inventory: Inventory,
    f: PciFunction,
    v: FunctionVerdict,
    mount_points: dict[tuple[int, int], list[str]],
) -> None:
    msg.address = str(f.address)
    msg.pci_path = str(f.path)
    msg.state = _PB_STATE[v.state]
    for r in v.reasons:
        _add_reason(msg.reasons.add(), r)
    msg.slot = f.address.slot_key
    msg.slot_path = f.path.slot_path
    msg.vendor_id = f"{f.vendor_id:04x}"
    msg.device_id = f"{f.device_id:04x}"
    msg.class_code = f"{f.class_code:06x}"
    msg.vendor_name = _w(f.vendor_name or "")
    msg.device_name = _w(f.device_name or "")
    msg.class_name = _w(f.class_name or "")
    msg.driver = _w(f.driver or "")
    msg.is_bridge = f.is_bridge
    msg.hotplug_slot = _w(f.hotplug_slot or "")
    for name in v.block_devices or f.block_devices:
        bd = inventory.block_devices.get(name)
        if bd is not None:
            _add_block(msg.block_devices.add(), bd, mount_points)
    for name in f.net_interfaces:
        iface = inventory.interfaces.get(name)
        if iface is not None:
            _add_interface(msg.net_interfaces.add(), iface)
    for node in f.device_nodes:
        _add_node(msg.device_nodes.add(), node)


def _add_reason(msg: report_pb2.Reason, r: Reason) -> None:
    msg.code = code_value(r.code.value)
    msg.detail = _w(r.detail)
    msg.blocking = r.blocking
    msg.object = _w(r.object)
    msg.chain.extend(map(_w, r.chain))
    msg.mount_point = _w(r.mount_point)
    for p in r.processes:
        msg.processes.add(pid=p.pid, command=_w(p.command), fds=list(p.fds))
    msg.addresses.extend(map(_w, r.addresses))


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


def _add_block(msg: report_pb2.BlockDevice, bd: BlockDevice, mount_points: dict[tuple[int, int], list[str]]) -> None:
    msg.name = _w(bd.name)
    msg.kind = bd.kind
    msg.devno = format_devno(bd.devno)
    msg.size_bytes = max(bd.size_bytes, 0)
    msg.parent = _w(bd.parent or "")
    msg.holders.extend(map(_w, bd.holders))
    if bd.devno[0] != 0:
        msg.mount_points.extend(map(_w, mount_points.get(bd.devno, ())))


def _add_interface(msg: report_pb2.NetInterface, iface: NetInterface) -> None:
    msg.name = _w(iface.name)
    msg.ifindex = iface.ifindex
    msg.admin_up = iface.admin_up
    msg.operstate = _w(iface.operstate)
    msg.carrier = bool(iface.carrier)
    msg.addresses.extend(str(a) for a in iface.addresses)
    msg.master = _w(iface.master or "")
    msg.mac = _w(iface.mac)


def _add_node(msg: report_pb2.DeviceNode, node: DeviceNode) -> None:
    msg.path = _w(node.path)
    msg.devno = format_devno(node.devno)
    msg.type = node.kind


def _add_slots(report: report_pb2.Report, inventory: Inventory, by_addr: Mapping[PciAddress, FunctionVerdict]) -> None:
    slots: dict[str, report_pb2.Slot] = {}
    for f in inventory.functions:
        if f.address not in by_addr:
            continue
        key = f.address.slot_key
        slot = slots.get(key)
        if slot is None:
            slot = report.slots.add(address=key, slot_path=f.path.slot_path, state=_PB_STATE[State.READY])
            slots[key] = slot
        slot.functions.append(str(f.address))
        if f.hotplug_slot and not slot.hotplug_slot:
            slot.hotplug_slot = _w(f.hotplug_slot)
        state = _PB_STATE[by_addr[f.address].state]
        if _PB_RANK[state] > _PB_RANK[slot.state]:
            slot.state = state
