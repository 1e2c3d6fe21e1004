"""libvirtd restarted (or gone) while unplugctl waits for a device to leave: a real libvirtd of our own.

The domain has no guest OS, so the unplug of a disk on a pciehp root port
stays pending: exactly the waiting state. libvirtd is stopped during it;
restarted, the orchestrator connects again and keeps waiting (the unplug is
still pending: PENDING at the timeout, not a crash, not "lost"); not
restarted, it gives up after the backend's timeout: HYPERVISOR_LOST, exit 9.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.integration.private_libvirtd import PrivateLibvirtd, private_libvirtd
from unplugd.host.backends.libvirt import LibvirtBackend
from unplugd.host.cli import EXIT_HYPERVISOR_LOST, EXIT_PENDING, unplug_exit
from unplugd.host.orchestrator import Orchestrator, Outcome, Progress, UnplugResult

RECONNECT_TIMEOUT_S = 10.0  # the backend's timeout: how long reconnect() waits for libvirtd


@pytest.fixture(scope="module")
def daemon() -> Iterator[PrivateLibvirtd]:
    with private_libvirtd() as d:
        yield d


def _unplug_with_libvirtd_stopped(
    daemon: PrivateLibvirtd, name: str, *, restart: bool
) -> tuple[UnplugResult, list[Progress]]:
    async def go() -> tuple[UnplugResult, list[Progress]]:
        seen: list[Progress] = []
        waiting = asyncio.Event()

        def progress(p: Progress) -> None:
            seen.append(p)
            if p.event == "requested":
                waiting.set()

        async with LibvirtBackend(name, uri=daemon.uri, timeout=RECONNECT_TIMEOUT_S) as be:
            task = asyncio.ensure_future(
                Orchestrator(be, None).unplug("vdb", force=True, timeout=15, progress=progress)
            )
            await asyncio.wait_for(waiting.wait(), 60)
            await asyncio.to_thread(daemon.restart if restart else daemon.stop)
            return await asyncio.wait_for(task, 120), seen

    return asyncio.run(go())


def test_libvirtd_restarted_during_the_wait(daemon: PrivateLibvirtd) -> None:
    with daemon.domain("q35") as name:
        res, seen = _unplug_with_libvirtd_stopped(daemon, name, restart=True)
    notes = [p.detail for p in seen if p.event == "note"]
    assert any("closed while waiting" in n for n in notes), notes
    assert any("connected to libvirt again" in n for n in notes), notes
    # Still pending after the restart (no guest to eject it): the honest answer, per function.
    assert res.outcome is Outcome.PENDING, res.message
    assert [(f.name, f.removed) for f in res.functions] == [("virtio-disk1", False)]
    assert unplug_exit(res) == EXIT_PENDING


def test_libvirtd_gone_during_the_wait(daemon: PrivateLibvirtd) -> None:
    with daemon.domain("q35") as name:
        res, _seen = _unplug_with_libvirtd_stopped(daemon, name, restart=False)
    assert res.outcome is Outcome.HYPERVISOR_LOST, res.message
    assert "closed while waiting" in res.message and "cannot connect" in res.message
    assert [(f.name, f.removed) for f in res.functions] == [("virtio-disk1", False)]
    assert unplug_exit(res) == EXIT_HYPERVISOR_LOST
