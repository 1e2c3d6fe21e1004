"""group_slots(): how both backends turn functions on buses into slots (host/topology.py)."""

from __future__ import annotations

from tests.unit.host_fakes import ROOT_Q35, func, port
from unplugd.host.topology import group_slots


def test_functions_group_by_bus_and_slot_in_pci_path_order() -> None:
    rp = port("0000:00/02.0", "rp1")
    placed = [
        (rp, func(rp, 0, 1, qemu_id="mf-net")),
        (ROOT_Q35, func(ROOT_Q35, 3, qemu_id="late")),
        (ROOT_Q35, func(ROOT_Q35, 2, 1, qemu_id="rp2", is_bridge=True)),
        (rp, func(rp, 0, 0, qemu_id="mf-disk")),
        (ROOT_Q35, func(ROOT_Q35, 2, 0, qemu_id="rp1", is_bridge=True)),
    ]
    slots = group_slots(placed, "pc-q35-7.2")
    # the root port's slot 02 comes before the slot behind it (02.0/00), which comes before 03
    assert [s.path for s in slots] == ["0000:00/02", "0000:00/02.0/00", "0000:00/03"]
    assert [[f.qemu_id for f in s.functions] for s in slots] == [["rp1", "rp2"], ["mf-disk", "mf-net"], ["late"]]
    assert [s.bus for s in slots] == [ROOT_Q35, rp, ROOT_Q35]
    assert {s.machine for s in slots} == {"pc-q35-7.2"}


def test_the_same_slot_number_on_two_buses_is_two_slots() -> None:
    rp1, rp2 = port("0000:00/02.0", "rp1"), port("0000:00/02.1", "rp2")
    slots = group_slots([(rp2, func(rp2, 0, qemu_id="b")), (rp1, func(rp1, 0, qemu_id="a"))])
    assert [(s.bus.name, s.number, s.functions[0].qemu_id) for s in slots] == [("rp1", 0, "a"), ("rp2", 0, "b")]
