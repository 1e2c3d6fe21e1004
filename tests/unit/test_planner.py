"""Planner tables: every verdict, bridges and renumbered buses, 8-function slots."""

from __future__ import annotations

import pytest

from tests.unit.host_fakes import ROOT_PC, ROOT_Q35, func, gfunc, port, report, topology
from unplugd.host.errors import AmbiguousDevice, DeviceNotFound
from unplugd.host.planner import GuestView, StepKind, Verdict, plan, plan_slot, resolve
from unplugd.host.topology import BusKind, Topology
from unplugd.pci import PciPath
from unplugd.v1 import report_pb2

RP1 = port("0000:00/02.0", "rp1")
RP2 = port("0000:00/02.1", "rp2")
RP_OFF = port("0000:00/04.0", "rp-off", hotplug=False)


def q35() -> Topology:
    """Root ports in 02.0/02.1, a disk behind rp1, a two-function device behind rp2,
    an integrated NIC at 06.0, a NIC behind a hotplug='off' port."""
    return topology(
        (
            ROOT_Q35,
            2,
            [
                func(ROOT_Q35, 2, 0, qemu_id="rp1", is_bridge=True, hotpluggable=False),
                func(ROOT_Q35, 2, 1, qemu_id="rp2", is_bridge=True, hotpluggable=False),
            ],
        ),
        (ROOT_Q35, 4, [func(ROOT_Q35, 4, qemu_id="rp-off", is_bridge=True, hotpluggable=False)]),
        (ROOT_Q35, 6, [func(ROOT_Q35, 6, qemu_id="int-net", hotpluggable=False)]),
        (RP1, 0, [func(RP1, 0, qemu_id="disk1", bus_number=1, targets=("vdb",))]),
        (RP2, 0, [func(RP2, 0, 0, qemu_id="mf-disk", bus_number=2), func(RP2, 0, 1, qemu_id="mf-net", bus_number=2)]),
        (RP_OFF, 0, [func(RP_OFF, 0, qemu_id="off-net", bus_number=3)]),
    )


def ready_guest() -> GuestView:
    return GuestView.from_report(
        report(
            gfunc("0000:00:02.0", "0000:00/02.0"),
            gfunc("0000:00:02.1", "0000:00/02.1"),
            gfunc("0000:00:04.0", "0000:00/04.0"),
            gfunc("0000:00:06.0", "0000:00/06.0", ifaces=("enp0s6",)),
            gfunc("0000:01:00.0", "0000:00/02.0/00.0", blocks=("vdb",)),
            gfunc("0000:02:00.0", "0000:00/02.1/00.0", blocks=("vdc",)),
            gfunc("0000:02:00.1", "0000:00/02.1/00.1", ifaces=("enp2s0f1",)),
            gfunc("0000:03:00.0", "0000:00/04.0/00.0", ifaces=("enp3s0",)),
        )
    )


def with_state(guest: GuestView, path: str, state: str, reasons=()) -> GuestView:  # type: ignore[no-untyped-def]
    fns = []
    for g in guest.functions:
        if str(g.path) == path:
            fns.append(gfunc(g.address, path, state, reasons=reasons))
        else:
            fns.append(gfunc(g.address, str(g.path), g.state, blocks=g.block_devices, ifaces=g.net_interfaces))
    return GuestView.from_report(report(*fns))


# ------------------------------------------------------------------ verdict table


@pytest.mark.parametrize(
    ("slot", "requested", "mutate", "verdict", "needle"),
    [
        ("0000:00/02.0/00", (), None, Verdict.UNPLUGGABLE, ""),
        (
            "0000:00/02.0/00",
            (),
            ("0000:00/02.0/00.0", "BUSY", [("MOUNTED", "vdb1 is mounted on /data", True)]),
            Verdict.BLOCKED_BY_GUEST,
            "mounted on /data",
        ),
        (
            "0000:00/02.0/00",
            (),
            ("0000:00/02.0/00.0", "UNKNOWN", [("UNREADABLE", "/proc/77/fd unreadable", True)]),
            Verdict.GUEST_UNREACHABLE,
            "unreadable",
        ),
        # a warning (non-blocking reason) on a READY function does not block
        ("0000:00/02.0/00", (), ("0000:00/02.0/00.0", "READY", [("LEASED", "leased", False)]), Verdict.UNPLUGGABLE, ""),
        ("0000:00/06", (), None, Verdict.NOT_HOTPLUGGABLE, "root complex"),
        ("0000:00/04.0/00", (), None, Verdict.NOT_HOTPLUGGABLE, "hotplug='off'"),
        ("0000:00/02", (), None, Verdict.NOT_HOTPLUGGABLE, "root complex"),
        ("0000:00/02.1/00", ("0000:00/02.1/00.1",), None, Verdict.NEEDS_COMPANIONS, "mf-disk"),
        ("0000:00/02.1/00", (), None, Verdict.UNPLUGGABLE, ""),
        # the companion's guest state counts: it leaves too
        (
            "0000:00/02.1/00",
            ("0000:00/02.1/00.1",),
            ("0000:00/02.1/00.0", "BUSY", [("SWAP", "vdc is swap", True)]),
            Verdict.BLOCKED_BY_GUEST,
            "vdc is swap",
        ),
    ],
)
def test_verdicts(slot: str, requested: tuple[str, ...], mutate, verdict: Verdict, needle: str) -> None:  # type: ignore[no-untyped-def]
    guest = ready_guest() if mutate is None else with_state(ready_guest(), *mutate)
    sp = plan_slot(slot, q35(), guest, requested=frozenset(PciPath.parse(p) for p in requested))
    assert sp.verdict is verdict, sp.findings
    assert needle in " ".join(f.detail for f in sp.findings)
    if verdict is Verdict.UNPLUGGABLE:
        assert sp.findings == ()
        assert sp.overrides(force=False, with_companions=False) == ()


def test_guest_unreachable_without_report() -> None:
    sp = plan_slot("0000:00/02.0/00", q35(), None, guest_error="connection refused")
    assert sp.verdict is Verdict.GUEST_UNREACHABLE
    assert "connection refused" in sp.findings[0].detail
    assert [s.kind for s in sp.steps] == [StepKind.UNPLUG, StepKind.WAIT_DELETED]  # nothing to confirm with


def test_a_reason_code_from_a_newer_agent_still_blocks() -> None:
    rep = report(
        gfunc("0000:01:00.0", "0000:00/02.0/00.0", "BUSY", reasons=[("MOUNTED", "held by something new", True)])
    )
    rep.functions[0].reasons[0].code = report_pb2.ReasonCode.ValueType(9999)  # a code this host does not know
    sp = plan_slot("0000:00/02.0/00", q35(), GuestView.from_report(rep))
    assert sp.verdict is Verdict.BLOCKED_BY_GUEST
    guest = sp.functions[0].guest
    assert guest is not None
    assert [(r.code, r.detail, r.blocking) for r in guest.reasons] == [("CODE_9999", "held by something new", True)]


def test_function_the_guest_does_not_report_is_not_ready() -> None:
    guest = GuestView.from_report(report(gfunc("0000:00:02.0", "0000:00/02.0")))
    sp = plan_slot("0000:00/02.0/00", q35(), guest)
    assert sp.verdict is Verdict.GUEST_UNREACHABLE
    assert sp.functions[0].guest_state == "ABSENT"
    assert "does not report" in sp.findings[0].detail


def test_precedence_keeps_every_finding_and_force_overrides_them() -> None:
    guest = with_state(ready_guest(), "0000:00/04.0/00.0", "BUSY", [("LINK_UP", "enp3s0 is up", True)])
    sp = plan_slot("0000:00/04.0/00", q35(), guest)
    assert sp.verdict is Verdict.NOT_HOTPLUGGABLE
    assert {f.verdict for f in sp.findings} == {Verdict.NOT_HOTPLUGGABLE, Verdict.BLOCKED_BY_GUEST}
    assert sp.overrides(force=False, with_companions=False) is None
    assert {f.verdict for f in sp.overrides(force=True, with_companions=False) or ()} == {
        Verdict.NOT_HOTPLUGGABLE,
        Verdict.BLOCKED_BY_GUEST,
    }


def test_companions_need_consent_even_with_force() -> None:
    sp = plan_slot("0000:00/02.1/00", q35(), ready_guest(), requested=frozenset({PciPath.parse("0000:00/02.1/00.1")}))
    assert sp.overrides(force=True, with_companions=False) is None
    assert sp.overrides(force=False, with_companions=True) == ()
    assert [c.name for c in sp.companions] == ["mf-disk"]


def test_steps_unplug_function0_and_wait_for_every_function() -> None:
    sp = plan_slot("0000:00/02.1/00", q35(), ready_guest(), prepare=True)
    kinds = [s.kind for s in sp.steps]
    assert kinds == [StepKind.PREPARE, StepKind.UNPLUG, StepKind.WAIT_DELETED, StepKind.CONFIRM_GONE, StepKind.RELEASE]
    assert sp.unplug_target is not None and sp.unplug_target.qemu_id == "mf-disk"
    wait = sp.steps[2]
    assert {str(p) for p in wait.paths} == {"0000:00/02.1/00.0", "0000:00/02.1/00.1"}
    assert sp.guest_devices() == ("0000:02:00.0", "0000:02:00.1")
    assert not sp.steps[1].via_monitor


def test_libvirt_multifunction_goes_through_the_monitor() -> None:
    t = q35()
    lv = Topology("libvirt", "dom", t.machine, t.slots)
    sp = plan_slot("0000:00/02.1/00", lv, ready_guest())
    step = next(s for s in sp.steps if s.kind is StepKind.UNPLUG)
    assert step.via_monitor and "tainted" in step.detail
    single = plan_slot("0000:00/02.0/00", lv, ready_guest())
    assert not next(s for s in single.steps if s.kind is StepKind.UNPLUG).via_monitor


# ------------------------------------------------------------------ i440fx and bridges


def pc_with_bridge() -> Topology:
    br = port("0000:00/03.0", "br1", kind=BusKind.PCI_BRIDGE)
    br2 = port("0000:00/03.0/07.0", "br2", kind=BusKind.PCI_BRIDGE)
    return topology(
        (ROOT_PC, 0, [func(ROOT_PC, 0, model="i440FX", hotpluggable=False)]),
        (
            ROOT_PC,
            1,
            [
                func(ROOT_PC, 1, 0, model="PIIX3", hotpluggable=False),
                func(ROOT_PC, 1, 1, model="piix3-ide", hotpluggable=False),
            ],
        ),
        (ROOT_PC, 3, [func(ROOT_PC, 3, qemu_id="br1", is_bridge=True)]),
        (ROOT_PC, 5, [func(ROOT_PC, 5, qemu_id="net0", model="virtio-net-pci", hotpluggable=False)]),
        (br, 5, [func(br, 5, qemu_id="br-disk", bus_number=1)]),
        (br, 7, [func(br, 7, qemu_id="br2", is_bridge=True, bus_number=1)]),
        (br2, 1, [func(br2, 1, qemu_id="br2-net", bus_number=2)]),
        machine="pc-i440fx-7.2",
    )


@pytest.mark.parametrize(
    ("slot", "needle"),
    [
        ("0000:00/00", "host bridge"),
        ("0000:00/01", "PIIX"),
        ("0000:00/05", "does not support hot-unplug: net0"),
    ],
)
def test_i440fx_rules(slot: str, needle: str) -> None:
    sp = plan_slot(slot, pc_with_bridge(), None)
    assert sp.verdict is Verdict.NOT_HOTPLUGGABLE
    assert needle in sp.hotplug.reason


def renumbered_guest(*busy: str) -> GuestView:
    """The guest numbered the bridges' buses 5 and 9, not 1 and 2 as the host's firmware view says."""
    rows = [
        ("0000:00:03.0", "0000:00/03.0", ()),
        ("0000:05:05.0", "0000:00/03.0/05.0", ("vdb",)),
        ("0000:05:07.0", "0000:00/03.0/07.0", ()),
        ("0000:09:01.0", "0000:00/03.0/07.0/01.0", ()),
    ]
    return GuestView.from_report(
        report(
            *(
                gfunc(
                    a,
                    p,
                    "BUSY" if p in busy else "READY",
                    reasons=[("MOUNTED", f"{a} mounted", True)] if p in busy else (),
                    blocks=b,
                )
                for a, p, b in rows
            )
        )
    )


def test_bridge_slot_takes_everything_behind_it() -> None:
    sp = plan_slot("0000:00/03", pc_with_bridge(), renumbered_guest())
    assert sp.verdict is Verdict.NEEDS_COMPANIONS
    assert {str(c.path) for c in sp.companions} == {"0000:00/03.0/05.0", "0000:00/03.0/07.0", "0000:00/03.0/07.0/01.0"}
    assert all(c.behind_bridge for c in sp.companions)
    wait = next(s for s in sp.steps if s.kind is StepKind.WAIT_DELETED)
    assert len(wait.paths) == 4
    # a busy device two bridges down blocks the bridge
    busy = plan_slot("0000:00/03", pc_with_bridge(), renumbered_guest("0000:00/03.0/07.0/01.0"))
    assert busy.verdict is Verdict.BLOCKED_BY_GUEST
    assert "0000:09:01.0" in " ".join(f.detail for f in busy.findings)


def test_join_by_path_not_bus_number() -> None:
    guest = renumbered_guest("0000:00/03.0/05.0")
    sp = plan_slot("0000:00/03.0/05", pc_with_bridge(), guest)
    assert sp.verdict is Verdict.BLOCKED_BY_GUEST
    (fp,) = sp.functions
    assert fp.host is not None and fp.host.qemu_id == "br-disk"
    assert fp.guest is not None and fp.guest.address == "0000:05:05.0"
    assert str(fp.host.guest_address) == "0000:01:05.0"  # what firmware said; not used for the join


# ------------------------------------------------------------------ 8-function slots


def eight() -> tuple[Topology, GuestView]:
    rp = port("0000:00/02.0", "rp1")
    t = topology((rp, 0, [func(rp, 0, f, qemu_id=f"f{f}", bus_number=1) for f in range(8)]))
    g = GuestView.from_report(report(*(gfunc(f"0000:01:00.{f}", f"0000:00/02.0/00.{f}") for f in range(8))))
    return t, g


def test_eight_function_slot_all_ready() -> None:
    t, g = eight()
    sp = plan_slot("0000:00/02.0/00", t, g)
    assert sp.verdict is Verdict.UNPLUGGABLE and len(sp.functions) == 8
    assert sp.unplug_target is not None and sp.unplug_target.qemu_id == "f0"
    assert len(next(s for s in sp.steps if s.kind is StepKind.WAIT_DELETED).paths) == 8


def test_eight_function_slot_one_busy_one_requested() -> None:
    t, g = eight()
    g = with_state(g, "0000:00/02.0/00.7", "BUSY", [("OPEN_BY_PROCESS", "fio (pid 9) holds /dev/vdh", True)])
    sp = plan_slot("0000:00/02.0/00", t, g, requested=frozenset({PciPath.parse("0000:00/02.0/00.3")}))
    assert sp.verdict is Verdict.BLOCKED_BY_GUEST
    assert len(sp.companions) == 7
    assert "fio (pid 9)" in " ".join(f.detail for f in sp.findings)
    assert {f.verdict for f in sp.findings} == {Verdict.BLOCKED_BY_GUEST, Verdict.NEEDS_COMPANIONS}


# ------------------------------------------------------------------ whole-VM plan and mismatches


def test_plan_reports_functions_only_one_side_knows() -> None:
    guest = GuestView.from_report(
        report(
            *(gfunc(g.address, str(g.path), g.state) for g in ready_guest().functions if str(g.path) != "0000:00/06.0"),
            gfunc("0000:00:1d.0", "0000:00/1d.0"),
            gfunc("0000:00:1e.0", "garbage"),
        )
    )
    p = plan(q35(), guest)
    assert [str(g.path) for g in p.guest_only] == ["0000:00/1d.0"]
    assert [f.qemu_id for f in p.host_only] == ["int-net"]
    assert any("garbage" in pr for pr in p.guest_problems)
    guest_slot = p.slot("0000:00/1d")
    assert guest_slot is not None and guest_slot.verdict is Verdict.NOT_HOTPLUGGABLE
    assert [s.slot_path for s in p.slots][:3] == ["0000:00/02", "0000:00/02.0/00", "0000:00/02.1/00"]


def test_guest_view_states() -> None:

    r = report(gfunc("0000:00:02.0", "0000:00/02.0"))
    r.functions.add(address="0000:00:03.0", pci_path="0000:00/03.0")  # state UNSPECIFIED
    g = GuestView.from_report(r)
    assert [f.state for f in g.functions] == ["READY", "UNKNOWN"]
    assert report_pb2.FUNCTION_STATE_UNSPECIFIED == 0


# ------------------------------------------------------------------ resolving DEVICE


@pytest.mark.parametrize(
    ("selector", "slot", "paths"),
    [
        ("disk1", "0000:00/02.0/00", {"0000:00/02.0/00.0"}),
        ("vdb", "0000:00/02.0/00", {"0000:00/02.0/00.0"}),  # libvirt-style target
        ("/machine/peripheral/mf-net", "0000:00/02.1/00", {"0000:00/02.1/00.1"}),
        ("0000:00/02.1/00.1", "0000:00/02.1/00", {"0000:00/02.1/00.1"}),
        ("0000:00/02.1/00", "0000:00/02.1/00", set()),
        ("0000:02:00.1", "0000:00/02.1/00", {"0000:00/02.1/00.1"}),
        ("enp3s0", "0000:00/04.0/00", {"0000:00/04.0/00.0"}),  # guest interface name
    ],
)
def test_resolve(selector: str, slot: str, paths: set[str]) -> None:
    sel = resolve(selector, q35(), ready_guest())
    assert sel.slot_path == slot
    assert {str(p) for p in sel.paths} == paths


def test_resolve_guest_address_uses_the_guests_numbering() -> None:
    sel = resolve("0000:09:01.0", pc_with_bridge(), renumbered_guest())
    assert sel.slot_path == "0000:00/03.0/07.0/01"
    # without a report, the firmware numbering from the hypervisor is the fallback
    assert resolve("0000:02:01.0", pc_with_bridge(), None).slot_path == "0000:00/03.0/07.0/01"


@pytest.mark.parametrize("selector", ["nope", "0000:00/1f.0", "0000:00/1f", "0000:07:00.0", "../../etc/shadow"])
def test_resolve_not_found(selector: str) -> None:
    with pytest.raises(DeviceNotFound):
        resolve(selector, q35(), ready_guest())


def test_resolve_ambiguous() -> None:
    t = q35()
    dup = topology(
        *(
            (
                s.bus,
                s.number,
                [f if f.qemu_id != "off-net" else func(s.bus, 0, qemu_id="x", targets=("vdb",)) for f in s.functions],
            )
            for s in t.slots
        )
    )
    with pytest.raises(AmbiguousDevice):
        resolve("vdb", dup, None)
