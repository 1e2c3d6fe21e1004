"""The libvirt backend's topology from live domain XML captured from a real libvirtd (tests/fixtures/libvirt/)."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from unplugd.host.backends.libvirt import LibvirtBackend, classify_detach_error, parse_domain_xml
from unplugd.host.errors import DeviceGone, HotplugUnsupported, MultifunctionRefused, TopologyError, UnplugRefused
from unplugd.host.topology import BusKind, Topology
from unplugd.pci import PciPath

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "libvirt"


def load(name: str) -> str:
    return (FIXTURES / f"{name}-live.xml").read_text()


@pytest.fixture(scope="module")
def q35() -> Topology:
    return parse_domain_xml(load("q35"), "q35").topology


def aliases(t: Topology) -> dict[str, str]:
    return {f.alias: str(f.path) for f in t.functions() if f.alias}


def test_q35_paths_from_the_controller_chain(q35: Topology) -> None:
    a = aliases(q35)
    assert a["virtio-disk1"] == "0000:00/02.0/00.0"
    assert a["virtio-disk2"] == "0000:00/02.1/00.0" and a["net0"] == "0000:00/02.1/00.1"
    assert a["net1"] == "0000:00/02.2/00.0"
    assert a["virtio-disk3"] == "0000:00/02.3/00.0/00.0/00.0"  # root port -> switch up -> down
    assert a["virtio-disk4"] == "0000:00/1e.0/01.0/03.0"  # dmi-to-pci -> pci-bridge
    assert a["net2"] == "0000:80/00.0/00.0"  # expander busNr 128 -> root port
    vdb = next(f for f in q35.functions() if "vdb" in f.targets)
    assert vdb.alias == vdb.qemu_id == "virtio-disk1"


def test_q35_hotplug_facts(q35: Topology) -> None:
    def slot(p: str):  # type: ignore[no-untyped-def]
        s = q35.slot(p)
        assert s is not None, p
        return s

    assert slot("0000:00/02.0/00").hotplug
    assert slot("0000:00/02.1/00").multifunction and slot("0000:00/02.1/00").hotplug
    off = slot("0000:00/02.2/00")
    assert not off.hotplug and "hotplug='off'" in off.hotplug.reason
    assert not slot("0000:00/02").hotplug  # root ports: integrated on pcie.0
    assert slot("0000:00/02.3/00.0/00.0/00").bus.kind is BusKind.PCIE_SWITCH_DOWNSTREAM_PORT
    assert slot("0000:00/1e.0/01.0/03").hotplug
    assert not slot("0000:00/1e.0/01").hotplug  # directly on the dmi-to-pci bridge
    exp = slot("0000:80/00")
    assert exp.bus.kind is BusKind.PCIE_EXPANDER and not exp.hotplug
    # libvirt cannot detach a virtio-serial controller
    vser = next(f for f in q35.functions() if f.alias == "virtio-serial0")
    assert vser.hotpluggable is False and str(vser.path) == "0000:00/1d.0"


def test_agent_channel_path() -> None:
    layout = parse_domain_xml(load("q35"), "q35")
    assert layout.agent_channel is not None and layout.agent_channel.endswith("/org.unplugd.agent.0")
    assert layout.topology.agent_channel == layout.agent_channel
    assert "<target dev='vdb'" in layout.device_xml["virtio-disk1"] or 'dev="vdb"' in layout.device_xml["virtio-disk1"]


def test_pc_layout() -> None:
    t = parse_domain_xml(load("pc"), "pc").topology
    a = aliases(t)
    assert a["virtio-disk1"] == "0000:00/03.0/05.0"
    assert a["virtio-disk4"] == "0000:40/00.0"  # pci-expander-bus busNr 64 is its own root bus
    s6 = t.slot("0000:00/06")
    assert s6 is not None and s6.multifunction and s6.hotplug and s6.bus.mechanism == "acpi"
    s1 = t.slot("0000:00/01")
    assert s1 is not None and not s1.hotplug and "PIIX" in s1.hotplug.reason
    exp = t.slot("0000:40/00")
    assert exp is not None and not exp.hotplug


def test_no_acpi_means_no_root_bus_hotplug() -> None:
    xml = load("pc").replace("<acpi/>", "")
    t = parse_domain_xml(xml).topology
    s7 = t.slot("0000:00/07")
    assert s7 is not None and not s7.hotplug and "ACPI" in s7.hotplug.reason


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda x: x[: len(x) // 2], "does not parse"),
        (lambda x: x.replace("<devices>", "<nodevices>").replace("</devices>", "</nodevices>"), "no <devices>"),
        (lambda x: x.replace("bus='0x01' slot='0x05'", "bus='0x1f' slot='0x05'"), "no pci controller"),
        (lambda x: x.replace("slot='0x05'", "slot='0x25'"), "impossible"),
        (lambda x: x.replace("slot='0x05'", "slot='five'"), "bad slot"),
        (lambda x: x.replace("<target busNr='64'/>", ""), "busNr"),
        (lambda x: x.replace("slot='0x07' function='0x0'", "slot='0x06' function='0x1'"), "two devices"),
    ],
)
def test_malformed_xml_is_a_clear_error(mutate, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TopologyError, match=needle):
        parse_domain_xml(mutate(load("pc")))


def test_controller_loop_is_an_error() -> None:
    xml = load("pc").replace(
        "<address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>",
        "<address type='pci' domain='0x0000' bus='0x01' slot='0x03' function='0x0'/>",
        1,
    )
    with pytest.raises(TopologyError, match="loop"):
        parse_domain_xml(xml)


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (
            "operation failed: cannot hot unplug disk device with multifunction PCI guest address: 0000:02:00.0",
            MultifunctionRefused,
        ),
        (
            "operation failed: cannot hot unplug interface device with PCI guest address: 0000:03:00.0 - not allowed "
            "by controller",
            HotplugUnsupported,
        ),
        ("operation failed: matching device was not found", DeviceGone),
        (
            "internal error: unable to execute QEMU command 'device_del': Bus 'pcie.0' does not support hotplugging",
            HotplugUnsupported,
        ),
        ("something else", UnplugRefused),
    ],
)
def test_classify_detach_error(message: str, kind: type[UnplugRefused]) -> None:
    assert type(classify_detach_error("dev", message)) is kind


def test_guest_address_known_only_on_root_buses(q35: Topology) -> None:
    f = q35.function(PciPath.parse("0000:00/02.1"))
    assert f is not None and str(f.guest_address) == "0000:00:02.1"
    behind = q35.function(PciPath.parse("0000:00/02.1/00.0"))
    assert behind is not None and behind.guest_address is None  # libvirt does not know firmware numbering


class _CountingDomain:
    """Stands in for a libvirt.virDomain: the live XML of a real domain, and how often it was asked."""

    def __init__(self, xml: str) -> None:
        self.xml = xml
        self.dumps = 0

    def XMLDesc(self, flags: int) -> str:
        self.dumps += 1
        return self.xml


def test_channel_then_topology_reads_the_domain_once() -> None:
    dom = _CountingDomain(load("q35"))
    be = LibvirtBackend("q35")
    be._dom = dom

    async def go() -> tuple[str | None, Topology, Topology]:
        channel = await be.agent_channel()
        first = await be.topology()  # takes over the layout read for the channel
        again = await be.topology()  # a later read is fresh
        return channel, first, again

    channel, first, again = asyncio.run(go())
    assert channel is not None and channel.endswith("/org.unplugd.agent.0")
    assert first == again
    assert dom.dumps == 2


def test_device_xml_is_each_device_element() -> None:
    layout = parse_domain_xml(load("q35"), "q35")
    aliased = {f.alias for f in layout.topology.functions() if f.alias}
    assert set(layout.device_xml) == aliased and len(layout.device_xml) == len(aliased)
    for alias in aliased:
        el = ET.fromstring(layout.device_xml[alias])
        found = el.find("alias")
        assert found is not None and found.get("name") == alias
    with pytest.raises(KeyError):
        layout.device_xml["no-such-alias"]
    assert layout.device_xml.get("no-such-alias") is None
