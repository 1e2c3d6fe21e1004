"""The QMP backend against real QEMU processes (TCG, firmware only, no guest OS).

What QEMU really answers: buses without hotplug, an ACPI or pciehp unplug that
stays pending with no guest to eject the slot ("already in the process of
unplug" for a second request), and real DEVICE_DELETED events for devices
hot-added to an empty, powered-off pciehp port (QEMU removes those at once).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from tests.integration.qemu import have_qemu, run_qemu
from unplugd.host.backends.qmp import QmpBackend
from unplugd.host.cli import EXIT_HYPERVISOR_LOST, unplug_exit
from unplugd.host.errors import DeviceGone, DomainNotFound, HotplugUnsupported, UnplugInProgress
from unplugd.host.orchestrator import Orchestrator, Outcome, Progress
from unplugd.host.planner import Verdict
from unplugd.host.topology import Function, Topology
from unplugd.pci import PciPath

pytestmark = pytest.mark.skipif(not have_qemu(), reason="qemu-system-x86_64 not installed")

T = TypeVar("T")
# Two empty root ports behind the expander: native pciehp, powered off until a guest powers them on.
EMPTY_PORTS = [
    "-device",
    "pcie-root-port,id=rpx2,chassis=51,bus=pxb1,addr=0x1",
    "-device",
    "pcie-root-port,id=rpx3,chassis=52,bus=pxb1,addr=0x2",
]


def with_backend(qmp: str, body: Callable[[QmpBackend], Awaitable[T]]) -> T:
    async def go() -> T:
        async with QmpBackend(qmp, timeout=10) as be:
            return await body(be)

    return asyncio.run(go())


def by_id(t: Topology, qemu_id: str) -> Function:
    return next(f for f in t.functions() if f.qemu_id == qemu_id)


@pytest.mark.parametrize("enumerate", [True, False], ids=["firmware-numbered", "unnumbered"])
def test_q35_topology_live(enumerate: bool) -> None:
    with run_qemu("q35", enumerate=enumerate) as vm:
        t = with_backend(vm.qmp, lambda be: be.topology())
    paths = {f.qemu_id: str(f.path) for f in t.functions() if f.qemu_id}
    assert paths["sw-disk"] == "0000:00/02.2/00.0/00.0/00.0"
    assert paths["pb-disk"] == "0000:00/1e.0/01.0/03.0"
    assert paths["pxb-net"] == "0000:80/00.0/00.0"
    rp_slot = t.slot("0000:00/02")
    assert rp_slot is not None and len(rp_slot.functions) == 8
    off = t.slot("0000:00/04.0/00")
    assert off is not None and not off.hotplug
    on = t.slot("0000:00/02.1/00")
    assert on is not None and on.hotplug and on.multifunction


def test_hotplug_off_port_under_native_hotplug() -> None:
    """With ACPI hotplug off (the guest drives ports with pciehp), QEMU still names the port as its bus's
    hotplug handler when the port has hotplug=off: the port's own property says no."""
    native = ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
    with run_qemu("q35", extra=native) as vm:
        t = with_backend(vm.qmp, lambda be: be.topology())
    off = t.slot("0000:00/04.0/00")
    assert off is not None and not off.hotplug and "hotplug='off'" in off.hotplug.reason
    on = t.slot("0000:00/02.1/00")
    assert on is not None and on.hotplug and on.bus.mechanism == "pciehp"


def test_pc_topology_live() -> None:
    with run_qemu("pc") as vm:
        t = with_backend(vm.qmp, lambda be: be.topology())
    assert t.machine.startswith("pc-i440fx")
    assert str(by_id(t, "br2-net").path) == "0000:00/03.0/07.0/01.0"
    assert str(by_id(t, "br2-net").guest_address) == "0000:02:01.0"
    piix = t.slot("0000:00/01")
    assert piix is not None and not piix.hotplug


def test_no_such_socket() -> None:
    async def go() -> None:
        async with QmpBackend("/nonexistent/qmp.sock", timeout=2):
            pass

    with pytest.raises(DomainNotFound):
        asyncio.run(go())


def test_refusals_are_typed() -> None:
    with run_qemu("q35") as vm:

        async def body(be: QmpBackend) -> list[Exception]:
            t = await be.topology()
            errors: list[Exception] = []
            ich9 = next(f for f in t.functions() if f.model == "ich9-ahci")  # anonymous: by QOM path
            ghost = Function(PciPath.parse("0000:00/07.0"), "virtio-net-pci", qemu_id="ghost")
            for fn in (by_id(t, "int-net"), by_id(t, "off-net"), ich9, ghost):
                try:
                    await be.request_unplug(fn)
                except Exception as e:
                    errors.append(e)
            return errors

        errors = with_backend(vm.qmp, body)
    assert [type(e) for e in errors] == [HotplugUnsupported, HotplugUnsupported, HotplugUnsupported, DeviceGone]
    assert "Bus 'pcie.0' does not support hotplugging" in str(errors[0])
    assert "Bus 'rp-off' does not support hotplugging" in str(errors[1])


def test_pending_unplug_without_a_guest() -> None:
    """No OS: the pciehp port's attention button is pushed and nobody answers."""
    with run_qemu("q35") as vm:

        async def body(be: QmpBackend) -> tuple[object, Exception | None, object]:
            orch = Orchestrator(be, None)
            res = await orch.unplug("pxb-net", force=True, timeout=1.0)
            again: Exception | None = None
            try:
                await be.request_unplug(by_id(await be.topology(), "pxb-net"))
            except UnplugInProgress as e:
                again = e
            acpi = await orch.unplug("rp-disk", force=True, timeout=0.5)  # ACPI: the GPE goes unanswered
            return res, again, acpi

        res, again, acpi = with_backend(vm.qmp, body)
    assert res.outcome is Outcome.PENDING  # type: ignore[attr-defined]
    assert [f.verdict for f in res.overridden] == [Verdict.GUEST_UNREACHABLE]  # type: ignore[attr-defined]
    assert again is not None and "already in the process of unplug" in str(again)
    assert acpi.outcome is Outcome.PENDING  # type: ignore[attr-defined]


def test_qemu_killed_while_waiting_for_device_deleted() -> None:
    """The pending unplug is the waiting state: SIGKILL QEMU there. The wait ends at once, not at the timeout."""
    with run_qemu("q35") as vm:

        async def body(be: QmpBackend) -> tuple[object, float, float]:
            waiting = asyncio.Event()

            def progress(p: Progress) -> None:
                if p.event == "requested":
                    waiting.set()

            unplug = asyncio.ensure_future(
                Orchestrator(be, None).unplug("pxb-net", force=True, timeout=60, progress=progress)
            )
            await asyncio.wait_for(waiting.wait(), 30)
            vm.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            res = await asyncio.wait_for(unplug, 60)
            return res, killed, time.monotonic()

        res, killed, ended = with_backend(vm.qmp, body)
    assert res.outcome is Outcome.HYPERVISOR_LOST, res.message  # type: ignore[attr-defined]
    assert "QMP connection lost" in res.message  # type: ignore[attr-defined]
    assert [(f.name, f.removed) for f in res.functions] == [("pxb-net", False)]  # type: ignore[attr-defined]
    assert unplug_exit(res) == EXIT_HYPERVISOR_LOST  # type: ignore[arg-type]
    # (without the detection: PENDING after 60 s, the topology read failing; figures belong in the bench)
    assert ended > killed


def test_device_deleted_for_a_hot_added_device() -> None:
    with run_qemu("q35", extra=EMPTY_PORTS) as vm:

        async def body(be: QmpBackend) -> tuple[object, Topology, Topology, float]:
            await be.execute("blockdev-add", {"driver": "null-co", "node-name": "hot"})
            await be.execute("device_add", {"driver": "virtio-blk-pci", "id": "hot", "bus": "rpx2", "drive": "hot"})
            before = await be.topology()
            t0 = time.monotonic()
            res = await Orchestrator(be, None).unplug("hot", force=True, timeout=10)
            took = time.monotonic() - t0
            return res, before, await be.topology(), took

        res, before, after, took = with_backend(vm.qmp, body)
    assert str(by_id(before, "hot").path) == "0000:80/01.0/00.0"
    assert res.outcome is Outcome.UNPLUGGED_UNCONFIRMED  # type: ignore[attr-defined]  # no agent to confirm
    assert [f.removed for f in res.functions] == [True]  # type: ignore[attr-defined]
    assert not any(f.qemu_id == "hot" for f in after.functions())
    assert took < 5  # event-driven: no fixed sleeps


def test_multifunction_slot_leaves_whole() -> None:
    """device_del of function 0 takes function 1 with it; both DEVICE_DELETED arrive."""
    with run_qemu("q35", extra=EMPTY_PORTS) as vm:

        async def body(be: QmpBackend) -> tuple[object, object, Topology]:
            for n in ("f0", "f1"):
                await be.execute("blockdev-add", {"driver": "null-co", "node-name": n})
            await be.execute(
                "device_add", {"driver": "virtio-blk-pci", "id": "f1", "bus": "rpx3", "addr": "0.1", "drive": "f1"}
            )
            await be.execute(
                "device_add",
                {
                    "driver": "virtio-blk-pci",
                    "id": "f0",
                    "bus": "rpx3",
                    "addr": "0.0",
                    "multifunction": True,
                    "drive": "f0",
                },
            )
            orch = Orchestrator(be, None)
            refused = await orch.unplug("f1", force=True, timeout=5)
            done = await orch.unplug("f1", force=True, with_companions=True, timeout=10)
            return refused, done, await be.topology()

        refused, done, after = with_backend(vm.qmp, body)
    assert refused.outcome is Outcome.REFUSED and "--with-companions" in refused.message  # type: ignore[attr-defined]
    assert done.outcome is Outcome.UNPLUGGED_UNCONFIRMED  # type: ignore[attr-defined]
    assert done.plan.unplug_target.qemu_id == "f0"  # type: ignore[attr-defined]
    assert sorted((f.name, f.removed) for f in done.functions) == [("f0", True), ("f1", True)]  # type: ignore[attr-defined]
    assert after.slot("0000:80/02.0/00") is None


# An anonymous NIC among named ones of its type, and a lone function 0 with multifunction=on:
# the cases where the batched QOM read cannot take query-pci's word and must ask QEMU.
ODD_DEVICES = [
    "-netdev",
    "user,id=nd-anon,restrict=on",
    "-device",
    "virtio-net-pci,netdev=nd-anon,addr=0x9",
    "-drive",
    "if=none,id=drv-lone,file=null-co://,format=raw",
    "-device",
    "virtio-blk-pci,id=lone-mf,drive=drv-lone,addr=0xa,multifunction=on",
    "-netdev",
    "user,id=nd-anon2,restrict=on",
    "-device",
    "virtio-net-pci,netdev=nd-anon2,bus=br2,addr=0x2",
]


@pytest.mark.parametrize(
    ("name", "enumerate", "extra"),
    [("pc", True, ODD_DEVICES), ("pc", False, ODD_DEVICES), ("q35", True, []), ("q35", False, [])],
    ids=["pc", "pc-unnumbered", "q35", "q35-unnumbered"],
)
def test_every_qom_fact_is_what_qemu_says_of_the_device(name: str, enumerate: bool, extra: list[str]) -> None:
    """The topology read asks QEMU as little as it can; each fact must still be the device's own answer."""
    with run_qemu(name, enumerate=enumerate, extra=extra) as vm:

        async def body(be: QmpBackend) -> tuple[Topology, list[tuple[str, dict[str, object]]]]:
            t = await be.topology()
            direct = []
            for f in t.functions():
                if f.qom_path:
                    props = {
                        p: await be.execute("qom-get", {"path": f.qom_path, "property": p})
                        for p in ("type", "addr", "hotpluggable", "multifunction")
                    }
                    direct.append((f.qom_path, props))
            return t, direct

        t, direct = with_backend(vm.qmp, body)
    by_qom = {f.qom_path: f for f in t.functions() if f.qom_path}
    assert len(direct) == len(list(t.functions()))  # every function was found in QOM
    for path, props in direct:
        f = by_qom[path]
        assert f.model == props["type"], path
        slot, function = f.path.hops[-1]
        assert slot << 3 | function == props["addr"], path
        assert f.hotpluggable is props["hotpluggable"], path
        if f.multifunction is None:  # not read: only for a function > 0 that shares its slot
            s = t.slot_of(f.path)
            assert function > 0 and s is not None and len(s.functions) > 1, path
        else:
            assert f.multifunction is props["multifunction"], path
    if name == "pc":
        anon = t.function(PciPath.parse("0000:00/09.0"))
        assert anon is not None and anon.qemu_id is None and anon.model == "virtio-net-pci"
        assert anon.qom_path is not None and anon.qom_path.startswith("/machine/peripheral-anon/")
        behind = t.function(PciPath.parse("0000:00/03.0/07.0/02.0"))
        assert (
            behind is not None
            and behind.qom_path is not None
            and behind.qom_path.startswith("/machine/peripheral-anon/")
        )
        lone = t.slot("0000:00/0a")
        assert lone is not None and len(lone.functions) == 1 and lone.multifunction
        net0 = t.slot("0000:00/07")
        assert net0 is not None and not net0.multifunction
