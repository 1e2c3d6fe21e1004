"""`multifunction` from one HMP `info qtree` (host/backends/qtree.py) and when the topology read asks for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_topology_qmp import replay
from unplugd.host.backends import qmp
from unplugd.host.backends.qtree import multifunction_by_slot
from unplugd.host.topology import Topology

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "qmp"

# The shape QEMU 7.2 prints (trimmed from the bench VM's 538 KiB answer): a bridge's properties
# come before its child bus; a virtio proxy has a virtio-bus of its own below it.
QTREE = """\
bus: main-system-bus
  type System
  dev: i440FX-pcihost, id ""
    pci-hole64-size = 2147483648 (2 GiB)
    bus: pci.0
      type PCI
      dev: pci-bridge, id "br7"
        chassis_nr = 7 (0x7)
        addr = 1f.0
        romfile = ""
        multifunction = false
        bus: br7
          type PCI
          dev: virtio-blk-pci, id "fn-07-15-0"
            addr = 15.0
            multifunction = true
            bus: virtio-bus
              type virtio-pci-bus
              dev: virtio-blk-device, id ""
                serial = "x"
          dev: virtio-net-pci, id "fn-07-14-0"
            addr = 14.0
            romfile = "a
            multifunction = true"
            multifunction = false
      dev: PIIX3, id ""
        addr = 01.0
        multifunction = true
"""


def test_qtree_gives_each_device_by_bus_and_devfn() -> None:
    assert multifunction_by_slot(QTREE) == {
        ("pci.0", 0x1F << 3): False,
        ("br7", 0x15 << 3): True,
        ("br7", 0x14 << 3): False,  # the line inside romfile's value is not at the property depth
        ("pci.0", 0x01 << 3): True,  # back on the root bus after the bridge's
    }


def test_qtree_leaves_out_what_it_cannot_tell() -> None:
    twice = 'bus: pci.0\n  dev: a, id ""\n    addr = 03.0\n    multifunction = true\n'
    twice += '  dev: b, id ""\n    addr = 03.0\n    multifunction = false\n'
    assert multifunction_by_slot(twice) == {}
    no_flag = 'bus: pci.0\n  dev: e1000, id ""\n    addr = 03.0\n'
    bad_addr = 'bus: pci.0\n  dev: e1000, id ""\n    addr = 3\n    multifunction = true\n'
    assert multifunction_by_slot(no_flag) == {} and multifunction_by_slot(bad_addr) == {}


def _qtree_of(topo: Topology, flip: str) -> str:
    """An `info qtree` for a topology: each function with its multifunction, `flip`'s inverted."""
    lines: list[str] = []
    for slot in topo.slots:
        lines.append(f"bus: {slot.bus.name}")
        for f in slot.functions:
            mf = bool(f.multifunction) != (f.qemu_id == flip)
            lines += [f'  dev: {f.model}, id ""', f"    addr = {slot.number:02x}.{f.path.function}"]
            lines.append(f"    multifunction = {'true' if mf else 'false'}")
    return "\n".join(lines) + "\n"


QTREE_KEY = json.dumps(["human-monitor-command", {"command-line": "info qtree"}], sort_keys=True)


def test_many_lone_functions_read_multifunction_from_one_qtree(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = json.loads((FIXTURES / "pc.json").read_text())["answers"]
    plain = replay(answers, asked=[])
    lone = [s.functions[0] for s in plain.slots if len(s.functions) == 1 and s.functions[0].qemu_id]
    flip = lone[0].qemu_id
    assert flip is not None
    monkeypatch.setattr(qmp, "_QTREE_MIN_READS", 1)  # the fixture's 8 lone functions count as many
    asked: list[str] = []
    topo = replay({**answers, QTREE_KEY: {"return": _qtree_of(plain, flip)}}, asked=asked)
    assert QTREE_KEY in asked
    assert not [k for k in asked if '"multifunction"' in k]  # no qom-get of it left
    by_id = {f.qemu_id: f for f in topo.functions()}
    assert by_id[flip].multifunction is not lone[0].multifunction  # the qtree's answer, not QOM's
    same = [f for f in topo.functions() if f.qemu_id != flip]
    assert [f.multifunction for f in same] == [f.multifunction for f in plain.functions() if f.qemu_id != flip]


def test_a_function_the_qtree_does_not_name_is_asked_of_qom(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = json.loads((FIXTURES / "pc.json").read_text())["answers"]
    plain = replay(answers, asked=[])
    monkeypatch.setattr(qmp, "_QTREE_MIN_READS", 1)
    for qtree in ({"error": "HMP disabled"}, {"return": "bus: main-system-bus\n"}):
        asked: list[str] = []
        topo = replay({**answers, QTREE_KEY: qtree}, asked=asked)
        assert QTREE_KEY in asked and [k for k in asked if '"multifunction"' in k]
        assert [f.multifunction for f in topo.functions()] == [f.multifunction for f in plain.functions()]


@pytest.mark.parametrize("name", ["pc", "q35", "pc-unnumbered", "q35-unnumbered"])
def test_few_lone_functions_are_read_one_by_one(name: str) -> None:
    """A small VM's few qom-gets ride along with the walk; a qtree would cost QEMU more than they do."""
    asked: list[str] = []
    replay(json.loads((FIXTURES / f"{name}.json").read_text())["answers"], asked=asked)
    assert QTREE_KEY not in asked and [k for k in asked if '"multifunction"' in k]
