"""Hot-add: room per bus and the plug plan on real QEMU topologies (tests/fixtures/qmp), the spec parsers,
the arrival judgement, and plug's sequence, confirmation and rollback against a fake QEMU and agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from tests.unit.host_fakes import FakeAgent, gfunc, report
from tests.unit.test_topology_qmp import load, replay
from unplugd.host.devicespec import (
    SlotRequest,
    SpecError,
    parse_blockdev,
    parse_device,
    parse_keyval,
    parse_spec_file,
    request_from_args,
)
from unplugd.host.errors import AddRejected, BackendError
from unplugd.host.exitcodes import Exit
from unplugd.host.placement import (
    Arrival,
    NoRoom,
    PlannedFunction,
    arrival,
    find_slot,
    plan_plug,
    room,
)
from unplugd.host.planner import GuestView
from unplugd.host.plugging import PlugOutcome, libvirt_device, plug
from unplugd.host.topology import Function, Removal, Slot, Topology
from unplugd.pci import PciPath


@pytest.fixture(scope="module")
def q35() -> Topology:
    return replay(load("q35")["answers"])


@pytest.fixture(scope="module")
def pc() -> Topology:
    return replay(load("pc")["answers"])


# ---------------------------------------------------------------- room


def test_q35_room_names_free_ports_and_why_the_rest_cannot(q35: Topology) -> None:
    rooms = {r.bus.name: r for r in room(q35)}
    assert "integrated endpoint" in rooms["pcie.0"].hotplug.reason and rooms["pcie.0"].free == ()
    assert {n for n, r in rooms.items() if r.free == (0,)} == {"rp4", "rp5", "rp6", "rp7", "rp8"}
    assert all(rooms[n].whole_slot for n in ("rp4", "rp8"))
    assert rooms["rp-off"].free == () and "hotplug='off'" in rooms["rp-off"].hotplug.reason
    assert [s.functions[0].name for s in rooms["rp1"].occupied] == ["rp-disk"]
    assert [f.name for f in rooms["rp2"].occupied[0].functions] == ["mf-disk", "mf-net"]
    assert rooms["up1"].free == () and "fixed parts of the switch" in rooms["up1"].hotplug.reason
    assert rooms["dp1"].occupied and rooms["dp1"].free == ()


def test_pc_room_counts_every_free_slot(pc: Topology) -> None:
    rooms = {r.bus.name: r for r in room(pc)}
    taken = {s.number for s in rooms["pci.0"].occupied}
    assert {0, 1, 3, 6, 7, 8} <= taken
    assert set(rooms["pci.0"].free) == set(range(32)) - taken
    assert rooms["br1"].free == tuple(n for n in range(1, 32) if n not in (5, 7))  # slot 0: SHPC's reserve
    assert rooms["br2"].free == tuple(range(2, 32))


# ---------------------------------------------------------------- where and in what order


def _req(*devices: str, slot: str | None = None) -> SlotRequest:
    return request_from_args(devices, slot=slot)


def test_a_multifunction_slot_goes_in_function_0_last_with_multifunction_on(pc: Topology) -> None:
    (sp,) = plan_plug(pc, [_req("virtio-blk-pci,drive=d0", "virtio-net-pci,netdev=n1,id=nic1", "e1000,netdev=n2",
                                "virtio-blk-pci,drive=d3", slot="br1:0x9")])  # fmt: skip
    assert [pf.function for pf in sp.order] == [1, 2, 3, 0]
    assert [str(pf.path) for pf in sp.functions] == [f"0000:00/03.0/09.{n}" for n in range(4)]
    assert sp.device_add(sp.functions[0]) == {"driver": "virtio-blk-pci", "drive": "d0", "id": "up-br1-09-0",
                                              "bus": "br1", "addr": "0x9.0", "multifunction": "on"}  # fmt: skip
    assert sp.device_add(sp.functions[1])["id"] == "nic1" and "multifunction" not in sp.device_add(sp.functions[1])
    assert [pf.expects for pf in sp.functions] == ["block device", "interface", "interface", "block device"]
    (single,) = plan_plug(pc, [_req("virtio-net-pci,netdev=n", slot="pci.0:0x9")])
    assert "multifunction" not in single.device_add(single.functions[0])


def test_free_slots_are_chosen_in_order_and_never_twice(q35: Topology) -> None:
    a, b = plan_plug(q35, [_req("virtio-net-pci"), _req("virtio-net-pci")])
    assert (a.bus.name, b.bus.name, a.chosen) == ("rp4", "rp5", True)
    free = sum(len(r.free) for r in room(q35))  # five ports and the pci-bridge behind the DMI bridge
    assert len({sp.slot_path for sp in plan_plug(q35, [_req("e1000") for _ in range(free)])}) == free
    with pytest.raises(NoRoom, match="no free hotpluggable slot"):
        plan_plug(q35, [_req("virtio-net-pci") for _ in range(free + 1)])


@pytest.mark.parametrize(
    ("slot", "error"),
    [
        ("rp-off", "hotplug='off'"),
        ("rp1", "occupied by rp-disk"),
        ("rp4:0x3", "does not exist: a PCIe link has one device number"),
        ("pcie.0:0x9", "integrated endpoint"),
        ("up1:0x5", "fixed parts of the switch"),
    ],
)
def test_places_that_cannot_take_a_device_say_why(q35: Topology, slot: str, error: str) -> None:
    with pytest.raises(NoRoom, match=error):
        plan_plug(q35, [_req("virtio-net-pci", slot=slot)])


def test_slot_forms(pc: Topology, q35: Topology) -> None:
    assert [(b.name, n) for b, n in (find_slot("br1:0x9", pc), find_slot("0000:00/03.0/09", pc),
                                    find_slot("br1:9", pc))] == [("br1", 9)] * 3  # fmt: skip
    bus, n = find_slot("rp5", q35)
    assert (bus.name, n) == ("rp5", 0)
    for bad, why in (("nobus:1", "no bus named"), ("pci.0", "several slots"), ("br1:zz", "not a slot number")):
        with pytest.raises(SpecError, match=why):
            find_slot(bad, pc)


def test_ids_the_vm_or_another_spec_has_are_refused(pc: Topology) -> None:
    with pytest.raises(SpecError, match="'br-disk' is taken"):
        plan_plug(pc, [_req("virtio-net-pci,id=br-disk")])
    with pytest.raises(SpecError, match="'x' is taken"):
        plan_plug(pc, [_req("virtio-net-pci,id=x"), _req("e1000,id=x")])


# ---------------------------------------------------------------- the specs


def test_keyval_follows_qemu() -> None:
    assert parse_keyval("virtio-net-pci,netdev=n1,romfile=a,,b", implied="driver") == [
        ("driver", "virtio-net-pci"), ("netdev", "n1"), ("romfile", "a,b")]  # fmt: skip
    for bad in ("a,b", "a,=1", "a,x=1,x=2"):
        with pytest.raises(SpecError):
            parse_keyval(bad, implied="driver")


def test_device_specs_leave_the_place_to_unplugctl() -> None:
    assert parse_device("driver=e1000,mac=52:54:00:00:00:01").driver == "e1000"
    for bad, why in (("virtio-net-pci,bus=pci.0", "bus decides where"), ("e1000,addr=0x3", "addr decides where"),
                     ("e1000,bus=br1,addr=0x3", "addr, bus decide where"),
                     ("e1000,id=9x", "not a QEMU id"), ("id=x", "no driver")):  # fmt: skip
        with pytest.raises(SpecError, match=why):
            parse_device(bad)


def test_blockdev_keyval_nests_and_json_keeps_types() -> None:
    assert parse_blockdev("driver=qcow2,node-name=d0,file.driver=file,file.filename=/x.qcow2") == {
        "driver": "qcow2", "node-name": "d0", "file": {"driver": "file", "filename": "/x.qcow2"}}  # fmt: skip
    typed = parse_blockdev('{"driver": "raw", "node-name": "r", "read-only": true, "file": {"driver": "null-co"}}')
    assert typed["read-only"] is True
    with pytest.raises(SpecError, match="node-name"):
        parse_blockdev("driver=raw,file.driver=null-co")


def test_spec_files_in_toml_and_json_say_the_same() -> None:
    toml = """
[[slots]]
slot = "br1:0x9"
netdevs = ["user,id=n1,restrict=on"]
devices = ["virtio-net-pci,netdev=n1", "virtio-blk-pci,drive=d1"]
blockdevs = [{driver = "qcow2", node-name = "d1", file = {driver = "file", filename = "/d1.qcow2"}}]

[[slots]]
devices = ["e1000"]
"""
    doc = {"slots": [{"slot": "br1:0x9", "netdevs": ["user,id=n1,restrict=on"],
                      "devices": ["virtio-net-pci,netdev=n1", "virtio-blk-pci,drive=d1"],
                      "blockdevs": ["driver=qcow2,node-name=d1,file.driver=file,file.filename=/d1.qcow2"]},
                     {"devices": ["e1000"]}]}  # fmt: skip
    assert parse_spec_file(toml, toml=True) == parse_spec_file(json.dumps(doc), toml=False)
    for bad, why in (('{"slots": [{"devices": ["e1000"], "bus": 1}]}', "unknown keys"),
                     ('{"slots": []}', "no slots"), ('{"slot": []}', "one key"),
                     ('{"slots": [{"devices": []}]}', "1 to 8 devices")):  # fmt: skip
        with pytest.raises(SpecError, match=why):
            parse_spec_file(bad, toml=False)


# ---------------------------------------------------------------- arrival


def _pf(driver: str, path: str = "0000:00/09.0") -> PlannedFunction:
    from unplugd.host.placement import expected_objects

    return PlannedFunction(parse_device(driver), 0, "x", PciPath.parse(path), expected_objects(driver))


@pytest.mark.parametrize(
    ("driver", "guest", "want"),
    [
        ("virtio-net-pci", None, Arrival.MISSING),
        ("virtio-net-pci", {"driver": ""}, Arrival.NO_DRIVER),
        ("virtio-net-pci", {"driver": "virtio-pci"}, Arrival.NO_DRIVER),  # bound, but no interface yet
        ("virtio-net-pci", {"driver": "virtio-pci", "ifaces": ["ens9"]}, Arrival.PRESENT),
        ("virtio-blk-pci", {"driver": "virtio-pci", "ifaces": ["ens9"]}, Arrival.NO_DRIVER),  # wrong kind
        ("virtio-blk-pci", {"driver": "virtio-pci", "blocks": ["vdb"]}, Arrival.PRESENT),
        ("pci-testdev", {"driver": ""}, Arrival.NO_DRIVER),
        ("pci-testdev", {"driver": "some"}, Arrival.PRESENT),  # no object promised: the driver is the proof
    ],
)
def test_arrival(driver: str, guest: dict[str, Any] | None, want: Arrival) -> None:
    view = None
    if guest is not None:
        g = gfunc("0000:00:09.0", "0000:00/09.0", ifaces=guest.get("ifaces", ()), blocks=guest.get("blocks", ()))
        g.driver = guest["driver"]
        view = GuestView.from_report(report(g))
    assert arrival(_pf(driver), view).arrival is want


# ---------------------------------------------------------------- plug against a fake QEMU


class FakeQemu:
    """QEMU as plug sees it: device_add puts a function into topology(), device_del of function 0
    removes its whole slot (of one without function 0: that function), each with DEVICE_DELETED."""

    source = "qmp"

    def __init__(self, topo: Topology, *, reject: str = "", deaf: bool = False) -> None:
        self.base = topo
        self.reject = reject  # a device id device_add refuses
        self.deaf = deaf  # device_del accepted, nothing ever leaves (a guest that never ejects)
        self.calls: list[str] = []
        self.added: dict[str, tuple[str, int, int, str]] = {}  # id -> (bus, slot, function, driver)
        self.queues: list[asyncio.Queue[Removal]] = []

    async def topology(self) -> Topology:
        slots = list(self.base.slots)
        buses = {b.name: b for b in self.base.buses}
        by_slot: dict[tuple[str, int], list[Function]] = {}
        for qid, (bus, slot, fn, driver) in self.added.items():
            by_slot.setdefault((bus, slot), []).append(Function(buses[bus].path_of(slot, fn), driver, qemu_id=qid))
        slots += [Slot(buses[b], n, tuple(sorted(fs, key=lambda f: f.path.function)), self.base.machine)
                  for (b, n), fs in by_slot.items()]  # fmt: skip
        return Topology("qmp", "vm", self.base.machine, tuple(slots), self.base.buses)

    @contextlib.asynccontextmanager
    async def removals(self) -> AsyncIterator[AsyncIterator[Removal]]:
        q: asyncio.Queue[Removal] = asyncio.Queue()
        self.queues.append(q)

        async def events() -> AsyncIterator[Removal]:
            while True:
                yield await q.get()

        try:
            yield events()
        finally:
            self.queues.remove(q)

    async def device_add(self, arguments: Mapping[str, str]) -> None:
        mf = " mf" if "multifunction" in arguments else ""
        self.calls.append(f"device_add {arguments['id']} {arguments['addr']}{mf}")
        if arguments["id"] == self.reject:
            raise AddRejected(f"device_add {arguments['id']}", "Property 'netdev' can't find value")
        slot, fn = arguments["addr"].split(".")
        self.added[arguments["id"]] = (arguments["bus"], int(slot, 16), int(fn), arguments["driver"])

    async def device_del(self, qemu_id: str) -> None:
        self.calls.append(f"device_del {qemu_id}")
        if self.deaf:
            return
        bus, slot, fn, _ = self.added[qemu_id]
        gone = [i for i, (b, s, f, _) in self.added.items() if (b, s) == (bus, slot) and (fn == 0 or f == fn)]
        for i in gone:
            del self.added[i]
            for q in self.queues:
                q.put_nowait(Removal(i))

    async def netdev_add(self, spec: str) -> None:
        self.calls.append(f"netdev_add {spec}")

    async def netdev_del(self, qemu_id: str) -> None:
        self.calls.append(f"netdev_del {qemu_id}")

    async def blockdev_add(self, arguments: Mapping[str, Any]) -> None:
        self.calls.append(f"blockdev_add {arguments['node-name']}")

    async def blockdev_del(self, node_name: str) -> None:
        self.calls.append(f"blockdev_del {node_name}")


def _guest_with(*paths_ifaces: tuple[str, str]) -> Any:
    fs = []
    for n, (path, iface) in enumerate(paths_ifaces):
        g = gfunc(f"0000:02:09.{n}", path, ifaces=[iface] if iface else ())
        g.driver = "virtio-pci"
        fs.append(g)
    return report(*fs)


TWO = request_from_args(["virtio-net-pci,netdev=n0,id=f0", "virtio-net-pci,netdev=n1,id=f1"],
                        netdevs=["user,id=n0,restrict=on", "user,id=n1,restrict=on"],
                        blockdevs=["driver=raw,node-name=b0,file.driver=null-co"], slot="br1:0x9")  # fmt: skip


def test_plug_adds_backends_then_functions_1_to_0_and_waits_for_the_guest(pc: Topology) -> None:
    qemu, agent = FakeQemu(pc), FakeAgent(report())
    agent.watch_reports = [_guest_with(("0000:00/03.0/09.1", "")),  # function 1 first, no interface yet
                           _guest_with(("0000:00/03.0/09.0", "ens9f0"), ("0000:00/03.0/09.1", "ens9f1"))]  # fmt: skip
    events: list[str] = []
    r = asyncio.run(plug(qemu, agent, [TWO], timeout=5, progress=lambda p: events.append(p.detail)))
    assert r.outcome is PlugOutcome.PLUGGED, r.message
    assert qemu.calls == ["netdev_add user,id=n0,restrict=on", "netdev_add user,id=n1,restrict=on",
                          "blockdev_add b0", "device_add f1 0x9.1", "device_add f0 0x9.0 mf"]  # fmt: skip
    assert [(a.planned.qemu_id, a.arrival, a.objects) for a in r.arrivals] == [
        ("f0", Arrival.PRESENT, ("ens9f0",)), ("f1", Arrival.PRESENT, ("ens9f1",))]  # fmt: skip
    assert "0/2 present in the guest" in events and "2/2 present in the guest" in events


def test_a_rejected_spec_takes_back_what_was_added_and_nothing_else(pc: Topology) -> None:
    three = request_from_args(["e1000,id=g0", "e1000,id=g1", "e1000,id=g2"], netdevs=["user,id=m,restrict=on"],
                              slot="br1:0x9")  # fmt: skip
    qemu, agent = FakeQemu(pc, reject="g2"), FakeAgent(report())
    r = asyncio.run(plug(qemu, agent, [three], timeout=2))
    assert r.outcome is PlugOutcome.REJECTED and r.rolled_back and not r.leftovers, r.message
    # function 0 never went in: function 1, the only one added, is removed by itself; then its backend
    assert qemu.calls[-3:] == ["device_add g2 0x9.2", "device_del g1", "netdev_del m"]
    assert qemu.added == {}


def test_a_function_that_never_arrives_is_rolled_back_with_its_slot(pc: Topology) -> None:
    # the guest: before, at the deadline (function 1 only), after the rollback
    qemu, agent = FakeQemu(pc), FakeAgent(report(), _guest_with(("0000:00/03.0/09.1", "ens9f1")), report())
    r = asyncio.run(plug(qemu, agent, [TWO], timeout=0.2))
    assert r.outcome is PlugOutcome.NOT_CONFIRMED and r.rolled_back and not r.leftovers, r.message
    assert {a.planned.qemu_id: a.arrival for a in r.arrivals} == {"f0": Arrival.MISSING, "f1": Arrival.PRESENT}
    dels = [c for c in qemu.calls if c.startswith(("device_del", "netdev_del", "blockdev_del"))]
    assert dels == ["device_del f0", "netdev_del n0", "netdev_del n1", "blockdev_del b0"]  # f0 takes the slot


def test_an_interrupted_plug_says_what_it_leaves(pc: Topology) -> None:
    """Ctrl-C or SIGTERM while waiting for the guest: what was added stays, and the last line says so."""
    qemu, agent = FakeQemu(pc), FakeAgent(report())
    seen: list[str] = []

    async def interrupted() -> None:
        task = asyncio.ensure_future(plug(qemu, agent, [TWO], timeout=60, progress=lambda p: seen.append(p.detail)))
        while not seen or not seen[-1].startswith("f0 "):  # function 0 goes in last: then the wait
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    assert seen[-1] == "interrupted: left in place, not confirmed by the guest and not rolled back: f1, f0"
    assert set(qemu.added) >= {"f0", "f1"}


def test_keep_partial_keeps(pc: Topology) -> None:
    qemu, agent = FakeQemu(pc), FakeAgent(report())
    r = asyncio.run(plug(qemu, agent, [TWO], timeout=0.1, keep_partial=True))
    assert r.outcome is PlugOutcome.NOT_CONFIRMED and r.kept_partial and not r.rolled_back
    assert not any("_del" in c for c in qemu.calls) and set(qemu.added) == {"f0", "f1"}


def test_a_rollback_that_leaves_something_says_what(pc: Topology) -> None:
    qemu, agent = FakeQemu(pc, deaf=True), FakeAgent(report())
    r = asyncio.run(plug(qemu, agent, [TWO], timeout=0.1))
    assert r.outcome is PlugOutcome.ROLLBACK_INCOMPLETE
    assert r.leftovers == ("f0 still at 0000:00/03.0/09.0 (hypervisor)", "f1 still at 0000:00/03.0/09.1 (hypervisor)")


def test_nothing_is_added_without_an_agent_or_without_room(pc: Topology) -> None:
    qemu, agent = FakeQemu(pc), FakeAgent(report())
    agent.dead = True
    assert asyncio.run(plug(qemu, agent, [TWO])).outcome is PlugOutcome.GUEST_UNREACHABLE
    r = asyncio.run(plug(qemu, FakeAgent(report()), [request_from_args(["e1000"], slot="br1:0x5")]))
    assert r.outcome is PlugOutcome.REFUSED and "occupied by br-disk" in r.message
    assert qemu.calls == []


# ---------------------------------------------------------------- libvirt


class FakeLibvirt:
    source = "libvirt"

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.attached: list[tuple[str, bool]] = []

    async def topology(self) -> Topology:
        return self.topo

    @contextlib.asynccontextmanager
    async def removals(self) -> AsyncIterator[AsyncIterator[Removal]]:
        async def events() -> AsyncIterator[Removal]:
            raise BackendError("no events here")
            yield Removal(None)

        yield events()

    async def attach_xml(self, xml: str, *, persistent: bool = False) -> None:
        self.attached.append((xml, persistent))

    async def detach_xml(self, xml: str, *, persistent: bool = False) -> None:
        self.attached.remove((xml, persistent))


def _libvirt_topology(pc: Topology) -> Topology:
    """The pc capture with libvirt's bus names (controller aliases pci.N)."""
    from dataclasses import replace

    names = {"pci.0": "pci.0", "br1": "pci.1", "br2": "pci.2", "br-shpc": "pci.3"}
    buses = {b.name: replace(b, name=names[b.name]) for b in pc.buses}
    slots = tuple(replace(s, bus=buses[s.bus.name]) for s in pc.slots)
    return Topology("libvirt", "vm", pc.machine, slots, tuple(buses.values()))


NIC_XML = "<interface type='network'><source network='default'/><model type='virtio'/></interface>"


def test_libvirt_refuses_a_multifunction_slot_and_says_how(pc: Topology) -> None:
    lv = FakeLibvirt(_libvirt_topology(pc))
    from unplugd.host.devicespec import DeviceSpec

    req = SlotRequest((DeviceSpec("libvirt-device", (), NIC_XML), DeviceSpec("libvirt-device", (), NIC_XML)))
    r = asyncio.run(plug(lv, FakeAgent(report()), [req]))
    assert r.outcome is PlugOutcome.REFUSED and "--qmp" in r.message and "behind its back" in r.message
    assert lv.attached == []


def test_libvirt_attaches_one_device_at_the_planned_address(pc: Topology) -> None:
    from unplugd.host.devicespec import DeviceSpec

    lv = FakeLibvirt(_libvirt_topology(pc))
    agent = FakeAgent(report())
    agent.watch_reports = [_guest_with(("0000:00/03.0/09.0", "enp1s9"))]
    req = SlotRequest((DeviceSpec("libvirt-device", (), NIC_XML),), slot="pci.1:0x9")
    r = asyncio.run(plug(lv, agent, [req], timeout=5, persistent=True))
    assert r.outcome is PlugOutcome.PLUGGED, r.message
    ((xml, persistent),) = lv.attached
    assert persistent and '<address type="pci" domain="0x0000" bus="0x01" slot="0x09" function="0x0" />' in xml
    assert '<alias name="ua-up-pci-1-09-0" />' in xml
    (sp,) = r.slots
    assert libvirt_device(NIC_XML, sp, sp.functions[0])[2] == "interface"


def test_libvirt_topologies_list_empty_controllers_as_room() -> None:
    """A controller no device sits on yet is a bus too: libvirt's q35 capture has one empty root port."""
    from pathlib import Path

    from unplugd.host.backends.libvirt import parse_domain_xml

    xml = (Path(__file__).resolve().parents[1] / "fixtures" / "libvirt" / "q35-live.xml").read_text()
    rooms = {r.bus.name: r for r in room(parse_domain_xml(xml).topology)}
    assert {n for n, r in rooms.items() if r.free} == {"pci.8", "pci.11"}
    assert rooms["pci.11"].free == (0,) and rooms["pci.11"].whole_slot
    assert "hotplug='off'" in rooms["pci.3"].hotplug.reason and rooms["pci.3"].occupied


def test_a_backend_that_cannot_add_is_refused(pc: Topology) -> None:
    from tests.unit.host_fakes import FakeBackend

    r = asyncio.run(plug(FakeBackend(pc), FakeAgent(report()), [request_from_args(["e1000"])]))
    assert r.outcome is PlugOutcome.REFUSED and "cannot hot-add" in r.message


# ---------------------------------------------------------------- the command line


@pytest.fixture
def cli_session(monkeypatch: pytest.MonkeyPatch, pc: Topology) -> dict[str, Any]:
    from unplugd.host import cli

    state: dict[str, Any] = {"backend": FakeQemu(pc), "agent": FakeAgent(report())}

    @contextlib.asynccontextmanager
    async def fake(args: Any) -> AsyncIterator[Any]:
        yield cli.Session(state["backend"], state["agent"], "vm")

    monkeypatch.setattr(cli, "open_session", fake)
    return state


def _main(*argv: str) -> int:
    from unplugd.host import cli

    return cli.main(list(argv))


def test_slots_prints_the_table_and_json(cli_session: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert _main("slots", "--qmp", "/q") == 0
    table = capsys.readouterr().out.splitlines()
    assert any(line.startswith("br1 ") and "0x01-0x04,0x06,0x08-0x1f yes" in line for line in table), table
    assert "    occupied: 0x05 (br-disk), 0x07 (br2)" in table
    assert _main("slots", "--qmp", "/q", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    br2 = next(b for b in doc["buses"] if b["bus"] == "br2")
    assert br2["free"][0] == "0000:00/03.0/07.0/02" and br2["wholeSlot"]


@pytest.mark.parametrize(
    ("backend", "agent_dead", "specs", "argv", "code", "outcome"),
    [
        ({}, False, ["e1000"], ["--slot", "br1:0x5"], Exit.NOT_HOTPLUGGABLE, "REFUSED"),
        ({}, True, ["e1000"], [], Exit.GUEST_UNREACHABLE, "GUEST_UNREACHABLE"),
        ({"reject": "up-br1-09-1"}, False, ["e1000", "e1000"], ["--slot", "br1:9"], Exit.REJECTED, "REJECTED"),
        ({}, False, ["e1000"], ["--timeout", "0.05"], Exit.NOT_CONFIRMED, "NOT_CONFIRMED"),
        ({"deaf": True}, False, ["e1000"], ["--timeout", "0.05"], Exit.ROLLBACK_INCOMPLETE, "ROLLBACK_INCOMPLETE"),
        ({}, False, ["e1000"], ["--dry-run"], Exit.OK, "DRY_RUN"),
    ],
)
def test_plug_exit_codes(
    cli_session: dict[str, Any],
    pc: Topology,
    capsys: pytest.CaptureFixture[str],
    backend: dict[str, Any],
    agent_dead: bool,
    specs: list[str],
    argv: list[str],
    code: int,
    outcome: str,
) -> None:
    cli_session["backend"] = FakeQemu(pc, **backend)
    cli_session["agent"].dead = agent_dead
    assert _main("plug", "--qmp", "/q", *specs, *argv, "--json") == code
    assert json.loads(capsys.readouterr().out)["outcome"] == outcome


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plug", "--qmp", "/q"], "DEVICE-SPECs or --file"),
        (["plug", "--qmp", "/q", "e1000,bus=pci.0"], "give the place with --slot"),
        (["plug", "--qmp", "/q", "e1000", "--slot", "nope:1"], "no bus named 'nope'"),
        (["plug", "--qmp", "/q", "e1000", "--blockdev", "driver=raw"], "node-name"),
    ],
)
def test_plug_usage_errors_exit_2(
    cli_session: dict[str, Any], capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert _main(*argv) == 2
    assert message in capsys.readouterr().err
    assert cli_session["backend"].calls == []


def test_a_watch_that_fails_is_subscribed_again_until_the_deadline(pc: Topology) -> None:
    """A busy agent's first WatchReport may time out; plug asks again instead of giving up early."""
    from unplugd.host.client import AgentUnreachable

    class Flaky(FakeAgent):
        watches = 0

        async def watch_report(self, devices: Any = (), *, timeout: float | None = None) -> AsyncIterator[Any]:
            self.watches += 1
            if self.watches == 1:
                raise AgentUnreachable("unix:/fake", "WatchReport sent nothing within 5s")
            async for msg in super().watch_report(devices, timeout=timeout):
                yield msg

    agent = Flaky(report())
    agent.watch_reports = [_guest_with(("0000:00/03.0/09.0", "ens9f0"), ("0000:00/03.0/09.1", "ens9f1"))]
    events: list[str] = []
    r = asyncio.run(plug(FakeQemu(pc), agent, [TWO], timeout=10, progress=lambda p: events.append(p.detail)))
    assert r.outcome is PlugOutcome.PLUGGED and agent.watches == 2, r.message
    assert any("asking again" in e for e in events)


def test_libvirt_xml_that_does_not_parse_stops_before_anything_is_attached(pc: Topology) -> None:
    from unplugd.host.devicespec import DeviceSpec

    lv = FakeLibvirt(_libvirt_topology(pc))
    good, bad = DeviceSpec("libvirt-device", (), NIC_XML), DeviceSpec("libvirt-device", (), "<interface")
    with pytest.raises(SpecError, match="does not parse"):
        asyncio.run(plug(lv, FakeAgent(report()), [SlotRequest((good,)), SlotRequest((bad,))]))
    assert lv.attached == []
