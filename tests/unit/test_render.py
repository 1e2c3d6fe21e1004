"""host/render.py: which slots `unplugctl status` folds, how a device is named, reasons, colour."""

from __future__ import annotations

import dataclasses
import io

import pytest

from tests.unit.host_fakes import ROOT_PC, ROOT_Q35, func, gfunc, port, report, topology
from unplugd.host import render
from unplugd.host.planner import FunctionPlan, GuestView, Plan, SlotPlan, plan
from unplugd.host.topology import BusKind, Function

RP1, RP2, RP3 = port("0000:00/02.0", "rp1"), port("0000:00/02.1", "rp2"), port("0000:00/02.2", "rp3")
BR = port("0000:00/05.0", "br", kind=BusKind.PCI_BRIDGE)
NO_SLOT = ("NO_HOTPLUG_DRIVER", "no hotplug slot drives it", True)
PORT_DRIVER = ("DRIVER_BOUND_UNKNOWN_CLASS", "driver pcieport is bound", False)


def chipset(slot: int, fn: int, model: str, class_code: int) -> Function:
    f = func(ROOT_Q35, slot, fn, model=model, hotpluggable=False)
    return dataclasses.replace(f, class_code=class_code, qom_path=f"/machine/q35/pcie.0/child[{slot}{fn}]")


def q35_plan() -> Plan:
    """A q35 guest as `status` meets it: host bridge, three root ports (one empty), the ICH9
    functions, a disk and a NIC behind ports, and a disk integrated on pcie.0."""
    ports = [func(ROOT_Q35, 2, i, qemu_id=f"rp{i + 1}", model="pcie-root-port", is_bridge=True) for i in range(3)]
    topo = topology(
        (ROOT_Q35, 0, [chipset(0, 0, "mch", 0x0600)]),
        (ROOT_Q35, 2, ports),
        (ROOT_Q35, 3, [func(ROOT_Q35, 3, qemu_id="onboard", targets=("vdc",))]),
        (ROOT_Q35, 0x1F, [chipset(0x1F, 0, "ICH9-LPC", 0x0601), chipset(0x1F, 2, "ich9-ahci", 0x0106)]),
        (RP1, 0, [func(RP1, 0, qemu_id="virtio-disk1", alias="virtio-disk1", targets=("vdb",))]),
        (RP2, 0, [func(RP2, 0, qemu_id="net1", model="virtio-net-pci")]),
    )
    guest = report(
        *(gfunc(f"0000:00:02.{i}", f"0000:00/02.{i}", "BUSY", reasons=[NO_SLOT, PORT_DRIVER]) for i in range(3)),
        gfunc("0000:00:00.0", "0000:00/00.0", "BUSY", reasons=[NO_SLOT]),
        gfunc("0000:00:03.0", "0000:00/03.0", "BUSY", reasons=[NO_SLOT], blocks=("vda",)),
        gfunc("0000:00:1f.0", "0000:00/1f.0", "BUSY", reasons=[NO_SLOT]),
        gfunc("0000:00:1f.2", "0000:00/1f.2", "BUSY", reasons=[NO_SLOT]),
        gfunc("0000:01:00.0", "0000:00/02.0/00.0", "BUSY", reasons=[("MOUNTED", "vda1 on /srv", True)],
              blocks=("vda", "vda1")),
        gfunc("0000:02:00.0", "0000:00/02.1/00.0", ifaces=("enp2s0",)),
    )  # fmt: skip
    return plan(topo, GuestView.from_report(guest))


def slot(p: Plan, path: str) -> SlotPlan:
    sp = p.slot(path)
    assert sp is not None, path
    return sp


@pytest.mark.parametrize(
    ("path", "folded", "kind"),
    [
        ("0000:00/00", True, "host bridge"),  # the root complex
        ("0000:00/02", True, "root port"),  # ports on pcie.0: their devices have slots of their own
        ("0000:00/1f", True, "built-in"),  # ICH9: no id, no name, not hotpluggable
        ("0000:00/03", False, None),  # someone added it, though it cannot be unplugged
        ("0000:00/02.0/00", False, None),  # vdb behind rp1
        ("0000:00/02.1/00", False, None),  # net1 behind rp2
    ],
)
def test_q35_folding(path: str, folded: bool, kind: str | None) -> None:
    sp = slot(q35_plan(), path)
    assert render.is_infrastructure(sp) is folded
    if kind is not None:
        assert render.folded_kind(sp) == kind


def test_a_hotpluggable_bridge_carrying_devices_is_shown_an_empty_one_folded() -> None:
    bridge = func(ROOT_PC, 5, qemu_id="br", model="pci-bridge", is_bridge=True)
    pc = "pc-i440fx-7.2"
    carrying = plan(topology((ROOT_PC, 5, [bridge]), (BR, 1, [func(BR, 1, qemu_id="d")]), machine=pc), None)
    empty = plan(topology((ROOT_PC, 5, [bridge]), machine=pc), None)
    assert not render.is_infrastructure(slot(carrying, "0000:00/05"))
    assert render.is_infrastructure(slot(empty, "0000:00/05"))


def test_a_slot_only_the_guest_reports_is_shown() -> None:
    p = plan(topology(), GuestView.from_report(report(gfunc("0000:00:09.0", "0000:00/09.0"))))
    assert not render.is_infrastructure(slot(p, "0000:00/09"))


def _fp(p: Plan, path: str) -> FunctionPlan:
    return next(fp for sp in p.slots for fp in sp.functions if str(fp.path) == path)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("0000:00/02.0/00.0", "vdb (guest vda)"),  # libvirt's target and the guest's disk, partitions left out
        ("0000:00/02.1/00.0", "net1 (guest enp2s0)"),
        ("0000:00/1f.2", "/machine/q35/pcie.0/child[312]"),  # nothing better than its QOM path
    ],
)
def test_device_name(path: str, name: str) -> None:
    assert render.device_name(_fp(q35_plan(), path)) == name


def test_device_name_says_a_shared_name_once_and_names_guest_only_functions() -> None:
    f = func(RP1, 0, qemu_id="d", targets=("vda",))
    p = plan(topology((RP1, 0, [f])), GuestView.from_report(report(gfunc("0000:01:00.0", "0000:00/02.0/00.0",
                                                                         blocks=("vda",)))))  # fmt: skip
    assert render.device_name(_fp(p, "0000:00/02.0/00.0")) == "vda"
    only = plan(topology(), GuestView.from_report(report(gfunc("0000:00:09.0", "0000:00/09.0", ifaces=("eth9",)))))
    assert render.device_name(_fp(only, "0000:00/09.0")) == "eth9"


def test_a_reason_the_slots_verdict_says_is_not_repeated() -> None:
    p = q35_plan()
    onboard = slot(p, "0000:00/03")  # NOT_HOTPLUGGABLE: "no hotplug driver" follows from it
    assert [r.code for r in render.shown_reasons(onboard, onboard.functions[0])] == []
    disk = slot(p, "0000:00/02.0/00")  # BLOCKED_BY_GUEST: every reason stays
    assert [r.code for r in render.shown_reasons(disk, disk.functions[0])] == ["MOUNTED"]
    hotpluggable = plan(
        topology((RP1, 0, [func(RP1, 0, qemu_id="d")])),
        GuestView.from_report(report(gfunc("0000:01:00.0", "0000:00/02.0/00.0", "BUSY", reasons=[NO_SLOT]))),
    )
    sp = slot(hotpluggable, "0000:00/02.0/00")  # a hotpluggable slot the guest drives no hotplug for: news
    assert [r.code for r in render.shown_reasons(sp, sp.functions[0])] == ["NO_HOTPLUG_DRIVER"]


def test_status_shows_the_devices_and_one_line_for_the_rest() -> None:
    lines = render.plan_lines(q35_plan(), "vm")
    text = "\n".join(lines)
    shown = [line.split()[0] for line in lines[2:] if line.startswith("0000:")]
    assert shown == ["0000:00/02.0/00.0", "0000:00/02.1/00.0", "0000:00/03.0"]  # the tree's order
    assert "vdb (guest vda)" in text and "BLOCKED_BY_GUEST" in text
    assert lines[-1].startswith("+ 3 infrastructure slot(s) not shown (1 built-in, 1 host bridge, 1 root port;")
    assert "NO_HOTPLUG_DRIVER" not in text and "DRIVER_BOUND_UNKNOWN_CLASS" not in text
    # one line per device, then its first reason only
    disk = lines.index(next(line for line in lines if line.startswith("0000:00/02.0/00.0")))
    assert lines[disk + 1].strip().startswith("virtio-disk1 (0000:01:00.0) is busy in the guest: vda1 on /srv")


def test_status_all_shows_everything_and_verbose_every_reason() -> None:
    p = q35_plan()
    every = render.plan_lines(p, "vm", show_all=True)
    assert not any(line.startswith("+ ") for line in every)
    assert sum(line.startswith("0000:") for line in every) == len(p.slots)
    verbose = "\n".join(render.plan_lines(p, "vm", show_all=True, verbose=True))
    assert "(warning) DRIVER_BOUND_UNKNOWN_CLASS: driver pcieport is bound" in verbose
    # implied by the NOT_HOTPLUGGABLE verdict of every slot on pcie.0: said by the slot, once each
    assert "NO_HOTPLUG_DRIVER" not in verbose
    assert verbose.count("integrated endpoint on the PCIe root complex") == 4


def test_colour_only_around_the_verdict_and_guest_text_escaped() -> None:
    f = func(RP1, 0, qemu_id="d")
    evil = gfunc("0000:01:00.0", "0000:00/02.0/00.0", "BUSY", reasons=[("MOUNTED", "\x1b[2J on /\nx", True)],
                 blocks=("vd\x1b]0;owned\x07a",))  # fmt: skip
    p = plan(topology((RP1, 0, [f])), GuestView.from_report(report(evil)))
    plain = render.plan_lines(p, "vm")
    assert not any("\x1b" in line or "\x07" in line for line in plain)
    assert any("\\033[2J on /\\012x" in line for line in plain)
    painted = "\n".join(render.plan_lines(p, "vm", colour=True))
    assert painted.count("\x1b[") == 2  # ours: red on, reset
    assert "\x1b[31mBLOCKED_BY_GUEST" in painted


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "environ", "want"),
    [
        (_Tty(), {}, True),
        (_Tty(), {"NO_COLOR": "1"}, False),
        (_Tty(), {"NO_COLOR": ""}, True),  # no-color.org: set and not empty
        (io.StringIO(), {}, False),  # a pipe or a file
    ],
)
def test_wants_colour(stream: io.StringIO, environ: dict[str, str], want: bool) -> None:
    assert render.wants_colour(stream, environ) is want


def test_the_check_view_says_every_finding_once_and_the_steps() -> None:
    sp = slot(q35_plan(), "0000:00/02.0/00")
    lines = render.slot_lines(sp, verbose=True, steps=True)
    assert sp.findings
    for f in sp.findings:
        assert sum(f.detail in line for line in lines) == 1, f.detail
    assert [line.split(":")[0].strip() for line in lines if line.lstrip().startswith("step ")] == [
        f"step {i}" for i in range(1, len(sp.steps) + 1)
    ]
