"""unplugctl plug under a real libvirtd: device XML attached live at the planned address, with a user alias.

The domain runs firmware only (no guest OS), so the agent is a stand-in that reports every function the
hypervisor has (what a guest that takes everything at once would say): what is tested is libvirt's side.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from tests.integration.libvirtd import URI, ensure_libvirtd, transient_domain
from unplugd.host.backends.libvirt import LibvirtBackend
from unplugd.host.devicespec import DeviceSpec, SlotRequest
from unplugd.host.plugging import PlugOutcome, PlugResult, plug
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import report_pb2

NIC = "<interface type='user'><model type='virtio'/></interface>"


class MirrorAgent:
    """Reports each function the hypervisor has at its PCI path, with a driver and an interface."""

    def __init__(self, backend: LibvirtBackend) -> None:
        self.backend = backend

    async def get_report(self, devices: Sequence[str] = (), *, timeout: float | None = None) -> report_pb2.Report:
        r = report_pb2.Report(hostname="mirror")
        for n, f in enumerate((await self.backend.topology()).functions()):
            g = r.functions.add(address=f"0000:99:00.{n % 8}", pci_path=str(f.path), driver="virtio-pci",
                                state=report_pb2.FUNCTION_STATE_READY)  # fmt: skip
            g.net_interfaces.add(name=f"eth{n}")
        return r

    async def watch_report(
        self, devices: Sequence[str] = (), *, timeout: float | None = None
    ) -> AsyncIterator[pb.WatchReportResponse]:
        while True:
            yield pb.WatchReportResponse(report=await self.get_report())
            await asyncio.sleep(0.2)  # a stand-in's stream; the real one is driven by udev


@pytest.fixture
def q35() -> Iterator[tuple[str, Path]]:
    ensure_libvirtd()
    with transient_domain("q35") as dom:
        yield dom


def _plug(name: str, req: SlotRequest, *, persistent: bool = False) -> tuple[PlugResult, str]:
    async def go() -> tuple[PlugResult, str]:
        async with LibvirtBackend(name, uri=URI, timeout=20) as be:
            r = await plug(be, MirrorAgent(be), [req], timeout=20, persistent=persistent)
            return r, str(be._dom.XMLDesc(0))

    return asyncio.run(go())


def test_a_nic_is_attached_live_in_the_empty_root_port(q35: tuple[str, Path]) -> None:
    name, _ = q35
    r, xml = _plug(name, SlotRequest((DeviceSpec("libvirt-device", (), NIC),)))
    assert r.outcome is PlugOutcome.PLUGGED, r.message
    (sp,) = r.slots
    assert (sp.bus.name, sp.slot, sp.chosen) == ("pci.11", 0, True)  # the one empty port
    (a,) = r.arrivals
    assert a.planned.qemu_id == "ua-up-pci-11-00-0" and str(a.planned.path) == "0000:80/01.0/00.0"
    assert "<alias name='ua-up-pci-11-00-0'/>" in xml
    assert "<address type='pci' domain='0x0000' bus='0x0b' slot='0x00' function='0x0'/>" in xml


def test_libvirt_rejects_a_config_change_of_a_transient_domain_and_nothing_stays(q35: tuple[str, Path]) -> None:
    name, _ = q35
    r, xml = _plug(name, SlotRequest((DeviceSpec("libvirt-device", (), NIC),)), persistent=True)
    assert r.outcome is PlugOutcome.REJECTED and "nothing had been added" in r.message, r.message
    assert "ua-up-" not in xml
