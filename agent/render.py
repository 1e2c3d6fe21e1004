"""How `unplugd inspect` shows a report to a person: a line per function, its first reason, colour on a terminal.

Pure: the report's data (reportdata.Data, the dict `inspect --json` prints, so the
table needs no protobuf) in, lines out; cli.py prints them. Every text from the
guest goes through display_text before any colour is added, so the only escape
sequences in a line are ours.

What is shown without --all / -v:
- Bridges, root ports and functions of the bridge class (host bridge, ISA
  bridge) fold into one line: they carry devices, each shown in its own slot.
- Each function's first reason, with the codes of the others. The first is the
  one only this function has: a reason that repeats a problem listed under
  "could not read" (UNREADABLE of the same object), or NO_HOTPLUG_DRIVER (about
  the slot, not the device), comes first only when nothing else does.
- NO_HOTPLUG_DRIVER on every function shown is said once, below the table.
With -v every reason of every function, as a tree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from unplugd.agent.reportdata import REASON_PREFIX, STATE_PREFIX, Data
from unplugd.text import display_text, paint

__all__ = ["function_objects", "is_infrastructure", "reason_text", "table_lines"]

_NO_HOTPLUG = REASON_PREFIX + "NO_HOTPLUG_DRIVER"
_UNREADABLE = REASON_PREFIX + "UNREADABLE"
_COLOURS: Mapping[str, str] = {"READY": "32", "BUSY": "31", "UNKNOWN": "33"}  # SGR green, red, yellow
_BRIDGE_CLASS = "06"  # PCI base class "bridge": host, ISA, PCI-to-PCI, other
_HEAD = ("SLOT", "FUNCTION", "PCI PATH", "DEVICE", "OBJECTS", "STATE")


def is_infrastructure(f: Data) -> bool:
    """A bridge or root port, or a function of the bridge class (host bridge, ISA bridge): what
    carries the devices, not a device anyone would unplug."""
    return bool(f.get("is_bridge")) or str(f.get("class_code", "")).lower().removeprefix("0x").startswith(_BRIDGE_CLASS)


def function_objects(f: Data) -> str:
    """Its disks and interfaces, else its device nodes: `vda`, `eth0`, `vfio/3`."""
    names = [b["name"] for b in f.get("block_devices", ())] + [n["name"] for n in f.get("net_interfaces", ())]
    if not names:
        names = [n["path"].removeprefix("/dev/") for n in f.get("device_nodes", ())]
    return ",".join(names) or "-"


def _what(f: Data) -> str:
    kind = f.get("class_name") or f"class {f.get('class_code', '')}"
    name = f.get("device_name") or ""
    text = f"{kind}: {name}" if name else kind
    driver = f.get("driver") or ""
    return f"{text} [{driver}]" if driver else text


def _state(f: Data) -> str:
    return str(f.get("state", "")).removeprefix(STATE_PREFIX) or "UNSPECIFIED"


def _code(r: Data) -> str:
    return display_text(r.get("code", "").removeprefix(REASON_PREFIX))


def reason_text(r: Data) -> str:
    """`MOUNTED: vdb1 is mounted on /data (ext4)`, `LINK_UP (warning): ...`: one reason, escaped."""
    warning = "" if r.get("blocking") else " (warning)"
    return f"{_code(r)}{warning}: {display_text(r.get('detail', ''))}"


def _said_elsewhere(r: Data, listed: set[str], machine_wide_no_hotplug: bool) -> bool:
    code = r.get("code")
    if code == _UNREADABLE:
        return r.get("detail", "") in listed
    return code == _NO_HOTPLUG and machine_wide_no_hotplug


def _first_reason(f: Data, listed: set[str], machine_wide_no_hotplug: bool) -> tuple[Data | None, list[str]]:
    """The reason to show, and the codes of the others the function has that no other line says."""
    reasons: Sequence[Data] = f.get("reasons", ())
    own = [r for r in reasons if not _said_elsewhere(r, listed, machine_wide_no_hotplug)]
    if not own:
        return (reasons[0] if reasons else None), []
    # A slot's NO_HOTPLUG_DRIVER, when not machine-wide, still yields to what uses the device.
    first, *others = sorted(own, key=lambda r: (not r.get("blocking"), r.get("code") == _NO_HOTPLUG))
    codes = dict.fromkeys(_code(r) for r in others)
    return first, list(codes)


def _more(codes: Sequence[str]) -> str:
    """What the other reasons are about, by code (`-v` says each): `(+ HAS_ADDRESS, DEFAULT_ROUTE: -v)`."""
    return f" (+ {', '.join(codes)}: -v)" if codes else ""


def table_lines(data: Data, *, show_all: bool = False, verbose: bool = False, colour: bool = False) -> list[str]:
    """`unplugd inspect`: a line per function grouped by slot, its first reason (every one with `verbose`)."""
    functions = [f for f in data.get("functions", ()) if show_all or not is_infrastructure(f)]
    folded = len(data.get("functions", ())) - len(functions)
    problems: Sequence[Data] = data.get("problems", ())
    listed = {f"{p.get('object', '')}: {p.get('detail', '')}" for p in problems}
    no_hotplug = bool(functions) and all(
        any(r.get("code") == _NO_HOTPLUG for r in f.get("reasons", ())) for f in functions
    )

    rows: list[tuple[list[str], Data]] = []
    last_slot = None
    for f in functions:
        slot = f.get("slot", "")
        cells = [slot if slot != last_slot else "", f.get("address", ""), f.get("pci_path", ""), _what(f)]
        rows.append(([display_text(c) for c in cells] + [display_text(function_objects(f)), _state(f)], f))
        last_slot = slot
    widths = [max([len(_HEAD[c])] + [len(cells[c]) for cells, _ in rows]) for c in range(len(_HEAD))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths, strict=False)]
        return "  ".join([*padded, cells[-1]]).rstrip()

    where = display_text(data.get("hostname", "")) or "this system"
    if data.get("from_capture"):
        where += " (captured tree)"
    lines = [f"{where}, kernel {display_text(data.get('kernel', '')) or '?'}"]
    lines.append(line(list(_HEAD)) if rows else "no PCI functions found")
    indent = " " * (widths[0] + 2)
    for cells, f in rows:
        lines.append(line([*cells[:-1], paint(_COLOURS.get(cells[-1], "0"), cells[-1], colour)]))
        reasons: Sequence[Data] = f.get("reasons", ())
        if verbose:
            lines.extend(
                f"{indent}{'└─' if n == len(reasons) - 1 else '├─'} {reason_text(r)}" for n, r in enumerate(reasons)
            )
            continue
        first, more = _first_reason(f, listed, no_hotplug)
        if first is not None:
            lines.append(f"{indent}└─ {reason_text(first)}{_more(more)}")
    if folded:
        lines.append(f"+ {folded} bridge(s), root port(s) and host/ISA bridge function(s) not shown: --all shows them")
    if no_hotplug and not verbose:
        lines.append(
            "NO_HOTPLUG_DRIVER on every function shown: no hotplug slot (acpiphp/pciehp/shpchp) drives them in "
            "this guest, so a hot-unplug request from the host would never complete"
        )
    if problems:
        lines.append("")
        lines.append("could not read (functions they touch are UNKNOWN unless busy):")
        lines.extend(f"  {display_text(p.get('object', ''))}: {display_text(p.get('detail', ''))}" for p in problems)
    return lines
