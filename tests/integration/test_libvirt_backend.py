"""The libvirt backend against a real libvirtd with transient domains (TCG, firmware only, no guest OS)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.integration.libvirtd import SETUP_LOCK, URI, ensure_libvirtd, transient_domain
from unplugd.host.backends.libvirt import LibvirtBackend
from unplugd.host.errors import DomainNotFound, HotplugUnsupported, MultifunctionRefused
from unplugd.host.orchestrator import Orchestrator, Outcome
from unplugd.host.topology import Function, Topology

T = TypeVar("T")


@pytest.fixture(scope="module")
def libvirtd() -> None:
    ensure_libvirtd()


@pytest.fixture
def q35(libvirtd: None) -> Iterator[tuple[str, Path]]:
    with transient_domain("q35") as dom:
        yield dom


def with_backend(name: str, body: Callable[[LibvirtBackend], Awaitable[T]]) -> T:
    async def go() -> T:
        async with LibvirtBackend(name, uri=URI, timeout=20) as be:
            return await body(be)

    return asyncio.run(go())


def alias(t: Topology, name: str) -> Function:
    return next(f for f in t.functions() if f.alias == name)


def test_the_setup_leaves_no_daemon_holding_its_lock(libvirtd: None) -> None:
    # A daemon started with the lock's descriptor open held the lock while it ran, and every later
    # setup (the other test worker's, the next module's) waited on it until its timeout.
    holders = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            holders += [fd_dir.parent.name for fd in fd_dir.iterdir() if os.readlink(fd) == SETUP_LOCK]
    assert holders == []
    ensure_libvirtd()


def test_topology_and_channel(q35: tuple[str, Path]) -> None:
    name, _ = q35

    async def body(be: LibvirtBackend) -> tuple[Topology, str | None]:
        return await be.topology(), await be.agent_channel()

    t, channel = with_backend(name, body)
    assert str(alias(t, "virtio-disk3").path) == "0000:00/02.3/00.0/00.0/00.0"
    assert str(alias(t, "net2").path) == "0000:80/00.0/00.0"
    assert channel is not None and channel.endswith("org.unplugd.agent.0") and Path(channel).is_socket()


def test_unknown_domain(libvirtd: None) -> None:
    with pytest.raises(DomainNotFound):
        with_backend("unplugd-test-no-such-domain", lambda be: be.topology())


def test_libvirt_refusals(q35: tuple[str, Path]) -> None:
    name, _ = q35

    async def body(be: LibvirtBackend) -> list[Exception]:
        t = await be.topology()
        errors: list[Exception] = []
        for a in ("virtio-disk2", "net1"):
            try:
                await be.request_unplug(alias(t, a))
            except Exception as e:
                errors.append(e)
        return errors

    mf, off = with_backend(name, body)
    assert isinstance(mf, MultifunctionRefused) and "multifunction" in str(mf)
    assert isinstance(off, HotplugUnsupported) and "not allowed by controller" in str(off)


def test_detach_waits_for_device_removed_event(q35: tuple[str, Path]) -> None:
    """A disk hot-added to the empty expander root port (powered off: no guest) leaves at once."""
    import libvirt

    name, workdir = q35
    img = workdir / "hot.img"
    img.write_bytes(b"\0" * 4096)
    xml = (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{img}'/>"
        "<target dev='vdz' bus='virtio'/><address type='pci' domain='0x0000' bus='0x0b' slot='0x00' function='0x0'/>"
        "</disk>"
    )

    async def body(be: LibvirtBackend) -> tuple[object, Topology, Topology, float]:
        conn = libvirt.open(URI)
        try:
            conn.lookupByName(name).attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        finally:
            conn.close()
        before = await be.topology()
        t0 = time.monotonic()
        res = await Orchestrator(be, None).unplug("vdz", force=True, timeout=10)
        return res, before, await be.topology(), time.monotonic() - t0

    res, before, after, took = with_backend(name, body)
    hot = next(f for f in before.functions() if "vdz" in f.targets)
    assert str(hot.path) == "0000:80/01.0/00.0"
    assert res.outcome is Outcome.UNPLUGGED_UNCONFIRMED, res.message  # type: ignore[attr-defined]
    assert [f.removed for f in res.functions] == [True]  # type: ignore[attr-defined]
    assert not any("vdz" in f.targets for f in after.functions())
    assert took < 8


def test_multifunction_through_the_monitor_taints(q35: tuple[str, Path]) -> None:
    """libvirt refuses; the opt-in path reaches QEMU (pending here: no guest to eject) and taints the domain."""
    name, _ = q35

    async def body(be: LibvirtBackend) -> object:
        return await Orchestrator(be, None).unplug("vdc", force=True, with_companions=True, timeout=1)

    res = with_backend(name, body)
    assert res.outcome is Outcome.PENDING  # type: ignore[attr-defined]
    step = next(s for s in res.plan.steps if s.kind.value == "unplug")  # type: ignore[attr-defined]
    assert step.via_monitor and "tainted" in step.detail
    log = Path(f"/var/log/libvirt/qemu/{name}.log").read_text()
    assert "tainted" in log and "custom-monitor" in log
