"""unplugctl slots / plug: their arguments, output and exit codes (the library is placement + plugging)."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from unplugd.host.devicespec import DeviceSpec, SlotRequest, SpecError, parse_spec_file, request_from_args
from unplugd.host.exitcodes import Exit
from unplugd.host.output import print_line, progress_line

# Like cli.py: parsing the arguments (split_plug_target) imports nothing heavy; the orchestrator,
# grpc and protobuf come with the command that runs.
if TYPE_CHECKING:
    from unplugd.host.orchestrator import Orchestrator
    from unplugd.host.placement import BusRoom, FunctionArrival, SlotPlug
    from unplugd.host.plugging import PlugOutcome, PlugResult
    from unplugd.host.topology import Function

__all__ = ["plug_exit", "plug_json", "print_room", "run_hot_add", "slots_json", "split_plug_target"]


@functools.cache
def _plug_exit() -> dict[PlugOutcome, Exit]:
    from unplugd.host.plugging import PlugOutcome

    return {
        PlugOutcome.PLUGGED: Exit.OK,
        PlugOutcome.DRY_RUN: Exit.OK,
        PlugOutcome.REFUSED: Exit.NOT_HOTPLUGGABLE,
        PlugOutcome.GUEST_UNREACHABLE: Exit.GUEST_UNREACHABLE,
        PlugOutcome.NOT_CONFIRMED: Exit.NOT_CONFIRMED,
        PlugOutcome.REJECTED: Exit.REJECTED,
        PlugOutcome.ROLLBACK_INCOMPLETE: Exit.ROLLBACK_INCOMPLETE,
        PlugOutcome.HYPERVISOR_LOST: Exit.HYPERVISOR_LOST,
    }


def plug_exit(r: PlugResult) -> Exit:
    return _plug_exit()[r.outcome]


def split_plug_target(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """plug: with --qmp every positional is a spec (VM omitted); otherwise the first is the VM."""
    t: list[str] = args.target
    if args.qmp:
        args.vm, args.specs = None, t
    elif t:
        args.vm, args.specs = t[0], t[1:]
    else:
        p.error("plug takes VM DEVICE-SPEC... (VM omitted with --qmp)")
    if bool(args.specs) == bool(args.file):
        p.error("plug takes DEVICE-SPECs or --file SPECFILE (one of them)")
    if args.file and (args.slot or args.netdev or args.blockdev):
        p.error("--slot, --netdev and --blockdev describe the command line's one slot; a spec file says its own")
    args.device = None


def requests(args: argparse.Namespace, *, libvirt: bool) -> tuple[SlotRequest, ...]:
    if args.file:
        path: Path = args.file
        try:
            text = path.read_text()
        except OSError as e:
            raise SpecError(f"cannot read {path}: {e}") from e
        return parse_spec_file(text, toml=path.suffix.lower() == ".toml")
    if libvirt:
        # libvirt device XML: inline, or @FILE. The XML travels as the spec's text (placement adds the address).
        xmls = [_read_at(s) for s in args.specs]
        if args.netdev or args.blockdev:
            raise SpecError("under libvirt a device's XML carries its backend: --netdev and --blockdev are for --qmp")
        return (SlotRequest(tuple(_xml_spec(x) for x in xmls), slot=args.slot),)
    return (request_from_args(args.specs, netdevs=args.netdev, blockdevs=args.blockdev, slot=args.slot),)


def _read_at(spec: str) -> str:
    if spec.startswith("@"):
        try:
            return Path(spec[1:]).read_text()
        except OSError as e:
            raise SpecError(f"cannot read {spec[1:]}: {e}") from e
    return spec


def _xml_spec(xml: str) -> DeviceSpec:
    if not xml.lstrip().startswith("<"):
        raise SpecError(
            f"under libvirt a device is given as device XML (inline or @FILE), not {xml[:40]!r}; QEMU -device "
            "specs are for --qmp"
        )
    return DeviceSpec("libvirt-device", (), xml)  # the XML is the spec; libvirt_device() places it


# ------------------------------------------------------------------ output


def slots_json(rooms: tuple[BusRoom, ...], vm: str) -> dict[str, Any]:
    return {
        "vm": vm,
        "buses": [
            {
                "bus": r.bus.name,
                "kind": r.bus.kind.value,
                "key": r.bus.key,
                "mechanism": r.bus.mechanism,
                "hotplug": r.hotplug.supported,
                "reason": r.hotplug.reason,
                "free": [r.bus.path_of(n, 0).slot_path for n in r.free],
                "freeSlots": list(r.free),
                "wholeSlot": r.whole_slot,
                "occupied": [
                    {"slot": s.number, "slotPath": s.path, "functions": [f.name for f in s.functions]}
                    for s in r.occupied
                ],
                "refused": [{"slot": n, "reason": why} for n, why in r.refused],
                "note": r.note,
            }
            for r in rooms
        ],
    }


def _ranges(numbers: tuple[int, ...]) -> str:
    out: list[str] = []
    start = prev = None
    for n in (*numbers, None):
        if n is not None and prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None and prev is not None:
            out.append(f"{start:#04x}" if start == prev else f"{start:#04x}-{prev:#04x}")
        start = prev = n
    return ",".join(out)


def _who(f: Function) -> str:
    """A short name: the id or alias, else the model (chipset functions have only a QOM path)."""
    return f.alias or f.qemu_id or f.model or str(f.path)


def print_room(rooms: tuple[BusRoom, ...], vm: str, out: TextIO) -> None:
    print_line(f"VM {vm}: where a device can be hot-added", out)
    wide = max([len(r.bus.key) for r in rooms] + [4])
    print_line(f"{'BUS':<16} {'KIND':<28} {'PATH':<{wide}} {'FREE SLOTS':<20} {'8 FN':<4} WHY NOT / TAKEN", out)
    for r in rooms:
        free = _ranges(r.free) or "-"
        whole = "yes" if r.whole_slot else "no"
        taken = ", ".join(f"{s.number:#04x} ({'+'.join(_who(f) for f in s.functions)})" for s in r.occupied)
        why = r.hotplug.reason if not r.hotplug else f"occupied: {taken}" if taken and not r.free else ""
        print_line(f"{r.bus.name:<16} {r.bus.kind.value:<28} {r.bus.key:<{wide}} {free:<20} {whole:<4} {why}", out)
        if taken and r.free:
            print_line(f"    occupied: {taken}", out)
        for n, reason in r.refused:
            print_line(f"    slot {n:#04x}: {reason}", out)


def _arrival_json(a: FunctionArrival) -> dict[str, Any]:
    return {
        "id": a.planned.qemu_id,
        "function": a.planned.function,
        "pciPath": str(a.planned.path),
        "arrival": a.arrival.value,
        "detail": a.detail,
        "address": a.address,
        "driver": a.driver,
        "objects": list(a.objects),
    }


def _slot_plug_json(sp: SlotPlug) -> dict[str, Any]:
    return {
        "slotPath": sp.slot_path,
        "bus": sp.bus.name,
        "slot": sp.slot,
        "chosen": sp.chosen,
        "order": [pf.qemu_id for pf in sp.order],
        "functions": [
            {"id": pf.qemu_id, "function": pf.function, "driver": pf.spec.driver, "pciPath": str(pf.path),
             "expects": pf.expects}
            for pf in sp.functions
        ],
    }  # fmt: skip


def plug_json(r: PlugResult) -> dict[str, Any]:
    return {
        "outcome": r.outcome.value,
        "message": r.message,
        "slots": [_slot_plug_json(sp) for sp in r.slots],
        "functions": [_arrival_json(a) for a in r.arrivals],
        "rolledBack": r.rolled_back,
        "keptPartial": r.kept_partial,
        "leftovers": list(r.leftovers),
        "notes": list(r.notes),
        "timings": r.timings,
    }


def print_plug(r: PlugResult, out: TextIO) -> None:
    for sp in r.slots:
        order = " then ".join(pf.qemu_id for pf in sp.order)
        print_line(f"slot {sp.slot_path} ({sp.bus.name} {sp.slot:#04x}){' chosen' if sp.chosen else ''}: {order}", out)
    for a in r.arrivals:
        where = f" {a.address}" if a.address else ""
        print_line(f"  {a.planned.qemu_id:<16} {a.planned.path!s:<22}{where} {a.arrival.value}: {a.detail}", out)
    for left in r.leftovers:
        print_line(f"  LEFT BEHIND: {left}", out)
    print_line(f"{r.outcome.value}: {r.message}", out)


# ------------------------------------------------------------------ commands


async def run_hot_add(
    args: argparse.Namespace, orch: Orchestrator, vm: str, *, print_json: Callable[[dict[str, Any]], None]
) -> int:
    if args.command == "slots":
        rooms = await orch.slots()
        if args.json:
            print_json(slots_json(rooms, vm))
        else:
            print_room(rooms, vm, sys.stdout)
        return Exit.OK
    reqs = requests(args, libvirt=orch.backend.source == "libvirt")
    r = await orch.plug(
        reqs,
        timeout=args.timeout,
        keep_partial=args.keep_partial,
        persistent=args.persistent,
        dry_run=args.dry_run,
        progress=progress_line,
    )
    if args.json:
        print_json(plug_json(r))
    else:
        print_plug(r, sys.stdout)
    return plug_exit(r)
