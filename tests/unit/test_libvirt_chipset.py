"""The machine type's built-in PCI functions that libvirt's live XML never lists (found on a real
q35 domain: the guest reported 00:00.0, 00:1f.0 and 00:1f.3 as unknown to the hypervisor)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unplugd.host.backends.libvirt import parse_domain_xml
from unplugd.host.topology import Topology

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "libvirt"


def load(name: str) -> str:
    return (FIXTURES / f"{name}-live.xml").read_text()


def chipset(t: Topology) -> dict[str, str]:
    return {str(f.path): f.model for f in t.functions() if f.model.startswith("chipset ")}


def test_q35_host_bridge_lpc_and_smbus() -> None:
    t = parse_domain_xml(load("q35"), "q35").topology
    assert chipset(t) == {
        "0000:00/00.0": "chipset host bridge (q35 MCH)",
        "0000:00/1f.0": "chipset ISA bridge (ICH9 LPC)",
        "0000:00/1f.3": "chipset SMBus (ICH9)",
    }
    lpc_slot = t.slot("0000:00/1f")
    assert lpc_slot is not None and not lpc_slot.hotplug
    # libvirt's own SATA controller at 1f.2 stays what libvirt says it is
    assert [f.alias for f in lpc_slot.functions] == [None, "ide", None]
    assert all(f.hotpluggable is False for f in lpc_slot.functions)
    host_bridge = next(f for f in t.functions() if str(f.path) == "0000:00/00.0")
    assert str(host_bridge.guest_address) == "0000:00:00.0"


@pytest.mark.parametrize(("acpi", "expected"), [(True, ["00.0", "01.0", "01.3"]), (False, ["00.0", "01.0"])])
def test_i440fx_piix_functions(acpi: bool, expected: list[str]) -> None:
    xml = load("pc") if acpi else load("pc").replace("<acpi/>", "")
    t = parse_domain_xml(xml, "pc").topology
    assert sorted(p.rsplit("/", 1)[1] for p in chipset(t)) == expected
    s1 = t.slot("0000:00/01")
    assert s1 is not None and not s1.hotplug


def test_a_listed_device_at_a_chipset_address_wins() -> None:
    # Not a real layout; the parser must keep what libvirt says and not invent a duplicate.
    xml = load("q35").replace(
        "<memballoon model='none'/>",
        "<memballoon model='none'/><watchdog model='i6300esb' action='reset'><alias name='watchdog0'/>"
        "<address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x3'/></watchdog>",
    )
    t = parse_domain_xml(xml, "q35").topology
    f = next(f for f in t.functions() if str(f.path) == "0000:00/1f.3")
    assert f.alias == "watchdog0"


def test_other_machines_get_no_assumed_functions() -> None:
    xml = load("q35").replace("machine='pc-q35-7.2'", "machine='virt'")
    assert chipset(parse_domain_xml(xml, "virt").topology) == {}
