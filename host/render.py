"""How unplugctl shows plans to a person: which slots matter, a line each, colour on a terminal.

Pure: plans in, lines out; host/cli.py prints them. Every piece that came from
the guest or the hypervisor is escaped here (display_text) before any colour is
added, so the only escape sequences in a line are ours.

The folding rule (`status` without --all): a slot is shown when it holds a
device someone added, or is a hotpluggable bridge carrying such devices.
Everything else is infrastructure and folds into one summary line: bridges and
root ports (their devices are shown in their own slots), functions of a bridge
class (host bridge, ISA bridge), and built-in functions: no id, no alias, no
name in host or guest, on a slot that cannot be unplugged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from unplugd.host.planner import FunctionPlan, GuestReason, Plan, SlotPlan, Verdict
from unplugd.text import display_text, paint, wants_colour

__all__ = [
    "device_name",
    "folded_kind",
    "is_infrastructure",
    "plan_lines",
    "shown_reasons",
    "slot_lines",
    "wants_colour",
]

# SGR codes: green, red, yellow, yellow, dim.
_COLOURS: Mapping[Verdict, str] = {
    Verdict.UNPLUGGABLE: "32",
    Verdict.BLOCKED_BY_GUEST: "31",
    Verdict.NEEDS_COMPANIONS: "33",
    Verdict.GUEST_UNREACHABLE: "33",
    Verdict.NOT_HOTPLUGGABLE: "2",
}
_BRIDGE_CLASS = 0x06  # PCI base class "bridge": host, ISA, PCI-to-PCI, other
# A reason that says again what the slot's verdict already said, per code: no hotplug driver
# in the guest follows from a slot the hardware cannot hot-unplug.
_IMPLIED_BY: Mapping[str, Verdict] = {"NO_HOTPLUG_DRIVER": Verdict.NOT_HOTPLUGGABLE}


def _paint(verdict: Verdict, text: str, colour: bool) -> str:
    return paint(_COLOURS[verdict], text, colour)


def _is_bridge(fp: FunctionPlan) -> bool:
    if fp.host is not None:
        return fp.host.is_bridge or (fp.host.class_code is not None and fp.host.class_code >> 8 == _BRIDGE_CLASS)
    return fp.guest is not None and fp.guest.is_bridge


def _named(fp: FunctionPlan) -> bool:
    """Did someone give it a name: an id, an alias, a target, or a disk / interface in the guest."""
    h, g = fp.host, fp.guest
    return bool((h is not None and (h.qemu_id or h.alias or h.targets)) or (g is not None and g.names))


def _infrastructure_function(fp: FunctionPlan, hotpluggable: bool) -> bool:
    return _is_bridge(fp) or (not hotpluggable and not _named(fp))


def is_infrastructure(sp: SlotPlan) -> bool:
    """Folded by default: the slot holds no device someone added and is no pluggable bridge carrying one."""
    if sp.slot is None:
        return False  # only the guest reports it: worth a look
    hot = bool(sp.hotplug)
    own = [fp for fp in sp.functions if not fp.behind_bridge]
    if any(not _infrastructure_function(fp, hot) for fp in own):
        return False
    below = [fp for fp in sp.functions if fp.behind_bridge]
    return not (hot and any(not _is_bridge(fp) for fp in below))


def folded_kind(sp: SlotPlan) -> str:
    """What a folded slot is, for the summary line."""
    own = [fp for fp in sp.functions if not fp.behind_bridge]
    models = " ".join((fp.host.model if fp.host else "").lower() for fp in own)
    if any(fp.host is not None and fp.host.class_code == 0x0600 for fp in own) or "host" in models:
        return "host bridge"
    if "root-port" in models or "ioh3420" in models:
        return "root port"
    if any(fp.host.is_bridge if fp.host else _is_bridge(fp) for fp in own):
        return "bridge"
    return "built-in"  # chipset functions (an ISA bridge among them), no id, fixed


def device_name(fp: FunctionPlan) -> str:
    """What people call it: the host's name and the guest's as one, `vdb (guest vda)`."""
    h, g = fp.host, fp.guest
    host = (h.targets[0] if h.targets else h.name) if h is not None else ""
    guest = [n for n in _whole_devices(g.names if g else ()) if n != host]
    if not host:
        return ",".join(guest) or (g.address if g else str(fp.path))
    return f"{host} (guest {','.join(guest)})" if guest else host


def _whole_devices(names: Sequence[str]) -> list[str]:
    """Disks and interfaces without their partitions: `vda`, not `vda, vda1, vda2` (a partition's
    name is its disk's name and a number, `p` and a number for nvme0n1p1)."""
    out: list[str] = []
    for n in names:
        if not any(n.startswith(d) and n[len(d) :].lstrip("p").isdigit() for d in out):
            out.append(n)
    return out


def shown_reasons(sp: SlotPlan, fp: FunctionPlan) -> tuple[GuestReason, ...]:
    """The function's reasons, without those the slot's verdict already says."""
    if fp.guest is None:
        return ()
    return tuple(r for r in fp.guest.reasons if _IMPLIED_BY.get(r.code) is not sp.verdict)


def _function_line(sp: SlotPlan, fp: FunctionPlan, verdict: str) -> str:
    """`verdict`: the cell, already padded (and painted): colour codes must not count as width."""
    model = fp.host.model if fp.host else "-"
    guest = fp.guest.address if fp.guest else "-"
    state = fp.guest_state if sp.guest_reachable else "?"
    mark = "" if fp.requested else "  [leaves with the slot]"
    name, model, guest = (display_text(x) for x in (device_name(fp), model, guest))
    return f"{fp.path!s:<22} {verdict} {name:<28} {model:<20} {guest:<13} {state}{mark}"


def slot_lines(sp: SlotPlan, *, verbose: bool = False, colour: bool = False, steps: bool = False) -> list[str]:
    """One slot: a line per function (the verdict on the first), then its first reason, or all with `verbose`."""
    verdict = _paint(sp.verdict, f"{sp.verdict.value:<17}", colour)
    shown = [fp for fp in sp.functions if steps or not fp.behind_bridge]
    lines: list[str] = []
    if len(shown) == 1:
        lines.append(_function_line(sp, shown[0], verdict))
    else:
        bus = f"{sp.slot.bus.kind.value} {sp.slot.bus.name}" if sp.slot else "(guest only)"
        lines.append(f"{display_text(sp.slot_path):<22} {verdict} {display_text(bus)}, {len(shown)} functions")
        lines.extend("  " + _function_line(sp, fp, " " * 15) for fp in shown)
    if verbose:
        for fp in shown:
            for r in shown_reasons(sp, fp):
                warn = "" if r.blocking else "(warning) "
                lines.append(f"      {fp.path}: {warn}{display_text(r.code)}: {display_text(r.detail)}")
        lines.extend(f"    {display_text(f.verdict.value)}: {display_text(f.detail)}" for f in sp.findings)
    elif sp.findings:
        more = f" (+{len(sp.findings) - 1} more: -v)" if len(sp.findings) > 1 else ""
        lines.append(f"    {display_text(sp.findings[0].detail)}{more}")
    hidden = len(sp.functions) - len(shown)
    if hidden:
        lines.append(f"    + {hidden} function(s) behind its bridges leave with it (see `check`)")
    if steps:
        lines.extend(f"    step {i}: {s.kind.value}: {display_text(s.detail)}" for i, s in enumerate(sp.steps, 1))
    return lines


def _folded_line(folded: Sequence[SlotPlan]) -> str:
    kinds = Counter(folded_kind(sp) for sp in folded)
    what = ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in sorted(kinds.items()))
    return f"+ {len(folded)} infrastructure slot(s) not shown ({what}; nothing to unplug there): --all shows them"


def plan_lines(p: Plan, vm: str, *, show_all: bool = False, verbose: bool = False, colour: bool = False) -> list[str]:
    """`unplugctl status`: the devices someone added, infrastructure folded into one line unless `show_all`."""
    state = "reachable" if p.guest_reachable else f"UNREACHABLE ({p.guest_error})"
    lines = [display_text(f"VM {vm}: guest agent {state}")]
    lines.append(f"{'PCI PATH':<22} {'VERDICT':<17} {'DEVICE':<28} {'MODEL':<20} {'GUEST':<13} STATE")
    folded = [] if show_all else [sp for sp in p.slots if is_infrastructure(sp)]
    hidden = {id(sp) for sp in folded}
    for sp in p.slots:
        if id(sp) not in hidden:
            lines.extend(slot_lines(sp, verbose=verbose, colour=colour))
    if folded:
        lines.append(_folded_line(folded))
    for g in p.guest_only:
        lines.append(display_text(f"guest reports {g.address} ({g.path}) which the hypervisor does not know"))
    for f in p.host_only:
        lines.append(display_text(f"hypervisor has {f.name} ({f.path}) which the guest does not report"))
    lines.extend(display_text(f"guest could not read: {pr}") for pr in p.guest_problems)
    return lines
