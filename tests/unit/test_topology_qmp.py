"""The QMP backend's topology, replayed from real QEMU answers (tests/fixtures/qmp/, capture.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from unplugd.host.backends.qmp import (
    QmpCommandError,
    build_topology,
    classify_unplug_error,
    parse_query_pci,
    removal_from_event,
)
from unplugd.host.errors import (
    DeviceGone,
    GuestBusy,
    HotplugUnsupported,
    TopologyError,
    UnplugInProgress,
    UnplugRefused,
)
from unplugd.host.topology import BusKind, Removal, Topology
from unplugd.pci import PciAddress, PciPath

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "qmp"


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return doc


def replay(answers: Mapping[str, Any], *, drop: str = "", asked: list[str] | None = None) -> Topology:
    """The topology read against recorded answers; `asked` collects every command as it is sent."""

    async def execute(command: str, arguments: Mapping[str, Any] | None) -> Any:
        key = json.dumps([command, arguments or {}], sort_keys=True)
        if asked is not None:
            asked.append(key)
        if drop and (drop in key or key not in answers):
            raise QmpCommandError(command, "dropped by the test")
        answer = answers[key]
        if "error" in answer:
            raise QmpCommandError(command, answer["error"])
        return answer["return"]

    return asyncio.run(build_topology(execute, "vm"))


@pytest.fixture(scope="module")
def q35() -> Topology:
    return replay(load("q35")["answers"])


@pytest.fixture(scope="module")
def pc() -> Topology:
    return replay(load("pc")["answers"])


def fn(topo: Topology, path: str):  # type: ignore[no-untyped-def]
    f = topo.function(PciPath.parse(path))
    assert f is not None, path
    return f


def test_fixtures_are_real_captures() -> None:
    for name in ("pc", "pc-unnumbered", "q35", "q35-unnumbered"):
        doc = load(name)
        assert doc["qemu"].startswith("QEMU emulator version")
        assert any(k.startswith('["query-pci"') for k in doc["answers"])


def test_q35_paths_follow_the_bridge_chain(q35: Topology) -> None:
    assert q35.machine.startswith("pc-q35")
    ids = {f.qemu_id: str(f.path) for f in q35.functions() if f.qemu_id}
    assert ids["rp-disk"] == "0000:00/02.0/00.0"
    assert ids["mf-disk"] == "0000:00/02.1/00.0"
    assert ids["mf-net"] == "0000:00/02.1/00.1"
    assert ids["sw-disk"] == "0000:00/02.2/00.0/00.0/00.0"  # root port -> upstream -> downstream
    assert ids["pb-disk"] == "0000:00/1e.0/01.0/03.0"  # dmi-to-pci -> pci-bridge
    assert ids["pxb-net"] == "0000:80/00.0/00.0"  # expander root bus 0x80 -> root port
    # firmware numbers are kept for people, but the path does not depend on them
    assert fn(q35, "0000:00/02.2/00.0/00.0/00.0").guest_address == PciAddress.parse("0000:05:00.0")


def test_q35_hotplug_facts(q35: Topology) -> None:
    rp_slot = q35.slot("0000:00/02")
    assert rp_slot is not None and len(rp_slot.functions) == 8 and rp_slot.multifunction
    assert not rp_slot.hotplug and "root complex" in rp_slot.hotplug.reason
    integrated = q35.slot("0000:00/06")
    assert integrated is not None and not integrated.hotplug
    assert integrated.bus.kind is BusKind.PCIE_ROOT
    off = q35.slot("0000:00/04.0/00")
    assert off is not None and off.bus.kind is BusKind.PCIE_ROOT_PORT
    assert off.bus.hotplug is False and "hotplug='off'" in off.hotplug.reason
    on = q35.slot("0000:00/02.0/00")
    assert on is not None and on.hotplug and on.bus.mechanism == "acpi"
    mf = q35.slot("0000:00/02.1/00")
    assert mf is not None and mf.hotplug and mf.multifunction and mf.function0 is not None
    assert mf.function0.qemu_id == "mf-disk"
    sw = q35.slot("0000:00/02.2/00.0/00.0/00")
    assert sw is not None and sw.bus.kind is BusKind.PCIE_SWITCH_DOWNSTREAM_PORT and sw.hotplug
    dp = q35.slot("0000:00/02.2/00.0/00")
    assert dp is not None and not dp.hotplug  # downstream ports stay with their switch
    pxb_port = q35.slot("0000:80/00.0/00")
    assert pxb_port is not None and pxb_port.hotplug and pxb_port.bus.mechanism == "pciehp"
    pxb_root = q35.slot("0000:80/00")
    assert pxb_root is not None and pxb_root.bus.kind is BusKind.PCIE_EXPANDER and not pxb_root.hotplug


def test_pc_i440fx_rules_and_nested_bridges(pc: Topology) -> None:
    assert pc.machine.startswith("pc-i440fx")
    host, piix = pc.slot("0000:00/00"), pc.slot("0000:00/01")
    assert host is not None and not host.hotplug and "host bridge" in host.hotplug.reason
    assert piix is not None and not piix.hotplug and "PIIX" in piix.hotplug.reason
    assert fn(pc, "0000:00/03.0/07.0/01.0").qemu_id == "br2-net"
    nested = pc.slot("0000:00/03.0/07.0/01")
    assert nested is not None and nested.hotplug and nested.bus.kind is BusKind.PCI_BRIDGE
    mf = pc.slot("0000:00/06")
    assert mf is not None and mf.multifunction and mf.hotplug
    behind = {s.path for s in pc.behind(PciPath.parse("0000:00/03.0"))}
    assert behind == {"0000:00/03.0/05", "0000:00/03.0/07", "0000:00/03.0/07.0/01"}


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_unnumbered_buses_give_the_same_topology(machine: str) -> None:
    """Before firmware runs, query-pci shows nothing behind bridges; QOM fills in the same paths."""
    numbered = replay(load(machine)["answers"])
    raw = load(f"{machine}-unnumbered")["answers"]
    qp = next(v["return"] for k, v in raw.items() if k.startswith('["query-pci"'))
    assert all(not d.get("pci_bridge", {}).get("devices") for bus in qp for d in bus["devices"])
    unnumbered = replay(raw)

    def facts(t: Topology) -> set[tuple[str, str | None, bool, str]]:
        return {(str(f.path), f.qemu_id, s.hotplug.supported, s.bus.kind.value) for s in t.slots for f in s.functions}

    assert facts(numbered) == facts(unnumbered)


def test_unreadable_qom_fails_closed() -> None:
    """Without hotplug-handler answers nothing may look hotpluggable."""
    topo = replay(load("q35")["answers"], drop="hotplug-handler")
    assert not any(s.hotplug for s in topo.slots)
    slot = topo.slot("0000:00/02.0/00")
    assert slot is not None and "did not say" in slot.hotplug.reason


def test_missing_qom_devices_fail_closed() -> None:
    topo = replay(load("pc")["answers"], drop="qom-list")
    # QOM unreadable: paths still come from query-pci, but no slot is declared hotpluggable
    assert topo.function(PciPath.parse("0000:00/03.0/05.0")) is not None
    assert not any(s.hotplug for s in topo.slots)


@pytest.mark.parametrize(
    "data",
    [
        {},
        [{"bus": 0}],
        [{"bus": 0, "devices": ["x"]}],
        [{"bus": 0, "devices": [{"slot": 40, "function": 0, "bus": 0, "class_info": {"class": 1}, "id": {}}]}],
        [{"bus": 0, "devices": [{"slot": 1, "function": 0, "bus": 0, "class_info": {}, "id": {}}]}],
        [{"bus": "0", "devices": []}],
        [
            {
                "bus": 0,
                "devices": [
                    {
                        "slot": 1,
                        "function": 0,
                        "bus": 0,
                        "class_info": {"class": 1540},
                        "id": {"vendor": 1, "device": 2},
                        "pci_bridge": {"devices": "nope"},
                    }
                ],
            }
        ],
    ],
)
def test_parse_query_pci_rejects_malformed(data: Any) -> None:
    with pytest.raises(TopologyError):
        parse_query_pci(data)


def test_parse_query_pci_nesting() -> None:
    qp = next(v["return"] for k, v in load("pc")["answers"].items() if k.startswith('["query-pci"'))
    roots = parse_query_pci(qp)
    assert [r for r, _ in roots] == [0]
    br1 = next(n for n in roots[0][1] if n.slot == 3)
    assert br1.is_bridge and br1.secondary == 1
    br2 = next(n for n in br1.children if n.slot == 7)
    assert br2.children[0].hops == ((3, 0), (7, 0), (1, 0))


@pytest.mark.parametrize(
    ("desc", "kind"),
    [
        ("Device mf-disk is already in the process of unplug", UnplugInProgress),
        ("Hot-unplug failed: guest is busy (power indicator blinking)", GuestBusy),
        ("Bus 'pcie.0' does not support hotplugging", HotplugUnsupported),
        ("Device 'PIIX3' does not support hotplugging", HotplugUnsupported),
        ("Hot-unplug failed: unsupported by the port device 'rp-off'", HotplugUnsupported),
        ("Device 'nope' not found", DeviceGone),
        ("something new", UnplugRefused),
    ],
)
def test_classify_unplug_error(desc: str, kind: type[UnplugRefused]) -> None:
    err = classify_unplug_error("dev", desc)
    assert type(err) is kind
    assert err.hypervisor_message == desc


def test_removal_from_event() -> None:
    named = removal_from_event({"device": "mf-disk", "path": "/machine/peripheral/mf-disk"})
    anon = removal_from_event({"path": "/machine/peripheral-anon/device[3]"})
    assert named == Removal("mf-disk", "/machine/peripheral/mf-disk")
    assert anon.device is None
    q35 = replay(load("q35")["answers"])
    mf_disk = next(f for f in q35.functions() if f.qemu_id == "mf-disk")
    mf_net = next(f for f in q35.functions() if f.qemu_id == "mf-net")
    assert named.matches(mf_disk) and not named.matches(mf_net)
    # the virtio backend below a device has its own DEVICE_DELETED: it is not the device
    assert not Removal(None, "/machine/peripheral/mf-disk/virtio-backend").matches(mf_disk)


@pytest.mark.parametrize("name", ["pc", "q35", "pc-unnumbered", "q35-unnumbered"])
def test_each_fact_is_asked_once_and_ids_spare_the_per_device_reads(name: str) -> None:
    """QEMU answers one QMP command at a time: the read must not ask what it knows or already asked."""
    asked: list[str] = []
    topo = replay(load(name)["answers"], asked=asked)
    assert len(asked) == len(set(asked))
    gets = [json.loads(k)[1] for k in asked if json.loads(k)[0] == "qom-get"]
    named = {f.qom_path for f in topo.functions() if f.qemu_id and f.qom_path}
    assert named
    # /machine/peripheral gave their type; query-pci their devfn, once firmware has numbered the buses
    # (before that it lists nothing behind a bridge)
    assert not [g for g in gets if g["path"] in named and g["property"] == "type"]
    if load(name)["enumerated"]:
        assert not [g for g in gets if g["path"] in named and g["property"] == "addr"]
    # `hotpluggable` belongs to the type and the bus: at most one read for each pair, fewer where a true
    # answer proved a type's half and a bus's elsewhere; the answer QEMU gave wherever it was recorded
    pairs = {(s.bus.key, f.model) for s in topo.slots for f in s.functions if f.qom_path in named}
    hot_reads = [g for g in gets if g["path"] in named and g["property"] == "hotpluggable"]
    assert len(hot_reads) < len(pairs)
    answers = load(name)["answers"]
    for f in topo.functions():
        recorded = answers.get(json.dumps(["qom-get", {"path": f.qom_path, "property": "hotpluggable"}]))
        if recorded is not None and "return" in recorded:
            assert f.hotpluggable is recorded["return"], f.qom_path


@pytest.mark.parametrize("name", ["pc", "q35", "pc-unnumbered", "q35-unnumbered"])
def test_a_bus_listed_by_its_parent_has_its_type_from_the_listing(name: str) -> None:
    """qom-list names each child link `child<TYPE>`: a bus found so is not asked its `type` again."""
    answers = load(name)["answers"]
    asked: list[str] = []
    topo = replay(answers, asked=asked)
    listed: dict[str, str] = {}  # bus path -> the type its parent's listing gave
    for key in asked:
        command, args = json.loads(key)
        if command == "qom-list":
            for p in answers[key].get("return", []):
                if p["type"] in ("child<PCI>", "child<PCIE>"):
                    listed[f"{args['path']}/{p['name']}"] = p["type"][6:-1]
    walked = {json.loads(k)[1]["path"] for k in asked if json.loads(k)[0] == "qom-list"} & set(listed)
    assert len(walked) >= 2  # the root bus and a bridge's at least
    type_reads = [json.loads(k)[1]["path"] for k in asked if json.loads(k)[0] == "qom-get" and '"type"' in k]
    assert not walked & set(type_reads)
    # and the listing's type is the one a read gives: the recorded answer, where the capture asked it
    for path in walked:
        recorded = answers.get(json.dumps(["qom-get", {"path": path, "property": "type"}], sort_keys=True))
        if recorded is not None:
            assert recorded["return"] == listed[path]
    assert {s.bus.kind for s in topo.slots} - {BusKind.UNKNOWN}
