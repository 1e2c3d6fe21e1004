"""The orchestrator against a fake hypervisor and a fake agent: order of steps, refusals, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from tests.unit.host_fakes import (
    ROOT_Q35,
    FakeAgent,
    FakeBackend,
    claim_conflict,
    func,
    gfunc,
    port,
    report,
    topology,
)
from unplugd.host.cli import EXIT, EXIT_HYPERVISOR_LOST, EXIT_UNCONFIRMED, unplug_exit
from unplugd.host.errors import DomainNotFound, GuestBusy, UnplugInProgress
from unplugd.host.orchestrator import Orchestrator, Outcome, Progress
from unplugd.host.planner import Verdict
from unplugd.host.topology import Function, Removal, Topology

_T = TypeVar("_T")

RP1 = port("0000:00/02.0", "rp1")
RP2 = port("0000:00/02.1", "rp2")


def topo() -> Topology:
    return topology(
        (
            ROOT_Q35,
            2,
            [
                func(ROOT_Q35, 2, 0, qemu_id="rp1", is_bridge=True, hotpluggable=False),
                func(ROOT_Q35, 2, 1, qemu_id="rp2", is_bridge=True, hotpluggable=False),
            ],
        ),
        (RP1, 0, [func(RP1, 0, qemu_id="disk1", bus_number=1, targets=("vdb",))]),
        (RP2, 0, [func(RP2, 0, 0, qemu_id="mf-disk", bus_number=2), func(RP2, 0, 1, qemu_id="mf-net", bus_number=2)]),
    )


ROOTS = [gfunc("0000:00:02.0", "0000:00/02.0"), gfunc("0000:00:02.1", "0000:00/02.1")]
DISK1 = gfunc("0000:01:00.0", "0000:00/02.0/00.0", blocks=("vdb",))
MF = [gfunc("0000:02:00.0", "0000:00/02.1/00.0", blocks=("vdc",)), gfunc("0000:02:00.1", "0000:00/02.1/00.1")]
BEFORE = report(*ROOTS, DISK1, *MF)
AFTER_MF = report(*ROOTS, DISK1)
AFTER_DISK1 = report(*ROOTS, *MF)
BUSY_DISK1 = report(
    *ROOTS,
    gfunc("0000:01:00.0", "0000:00/02.0/00.0", "BUSY", reasons=[("MOUNTED", "vdb1 is mounted on /data", True)]),
    *MF,
)


def slot_of(fn: Function) -> list[Removal]:
    """QEMU's behaviour: unplugging function 0 removes every function of the slot."""
    t = topo()
    slot = t.slot_of(fn.path)
    assert slot is not None
    return [Removal(f.qemu_id, f.qom_path) for f in slot.functions]


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def test_unplug_whole_slot_in_order() -> None:
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BEFORE, BEFORE, AFTER_MF)
    seen: list[Progress] = []
    res = run(Orchestrator(be, agent).unplug("mf-disk", with_companions=True, prepare=True, progress=seen.append))
    assert res.outcome is Outcome.UNPLUGGED, res.message
    # check, prepare, check again (only LEASED is new), unplug, confirm, release
    assert agent.calls == [
        "get_report",
        "prepare 0000:02:00.0,0000:02:00.1",
        "get_report",
        "get_functions",  # the confirmation asks only which functions the guest still has
        "release lease-1",
    ]
    assert [c for c in be.calls if c.startswith("unplug")] == ["unplug mf-disk"]
    assert all(f.removed and f.guest_gone for f in res.functions)
    assert res.lease_released is True
    events = [p.event for p in seen]
    assert events.index("prepared") < events.index("requested") < events.index("deleted") < events.index("released")
    assert [p.event for p in seen].count("deleted") == 2
    assert "to_request" in res.timings and "after_last_removal" in res.timings


def test_companions_need_consent() -> None:
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BEFORE)
    res = run(Orchestrator(be, agent).unplug("mf-net", force=True))
    assert res.outcome is Outcome.REFUSED
    assert res.plan is not None and res.plan.verdict is Verdict.NEEDS_COMPANIONS
    assert "--with-companions" in res.message and "mf-disk" in res.message
    assert not [c for c in be.calls if c.startswith("unplug")]


def test_blocked_by_guest_is_refused_without_force() -> None:
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BUSY_DISK1)
    res = run(Orchestrator(be, agent).unplug("vdb"))
    assert res.outcome is Outcome.REFUSED and "mounted on /data" in res.message and "--force" in res.message
    assert not [c for c in be.calls if c.startswith("unplug")]


def test_force_says_what_it_overrides() -> None:
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BUSY_DISK1, AFTER_DISK1)
    notes: list[Progress] = []
    res = run(Orchestrator(be, agent).unplug("vdb", force=True, progress=notes.append))
    assert res.outcome is Outcome.UNPLUGGED
    assert [f.verdict for f in res.overridden] == [Verdict.BLOCKED_BY_GUEST]
    assert any("overrides BLOCKED_BY_GUEST" in p.detail for p in notes)


def test_unreachable_guest_is_refused_and_can_be_forced() -> None:
    be = FakeBackend(topo(), slot_of)
    res = run(Orchestrator(be, None).unplug("disk1"))
    assert res.outcome is Outcome.REFUSED and res.plan is not None
    assert res.plan.verdict is Verdict.GUEST_UNREACHABLE
    forced = run(Orchestrator(be, None).unplug("disk1", force=True))
    assert forced.outcome is Outcome.UNPLUGGED_UNCONFIRMED  # nobody to confirm with
    assert all(f.removed for f in forced.functions)


def test_dry_run_changes_nothing() -> None:
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BEFORE)
    res = run(Orchestrator(be, agent).unplug("disk1", prepare=True, dry_run=True))
    assert res.outcome is Outcome.DRY_RUN and res.ok
    assert agent.calls == ["get_report"]
    assert not [c for c in be.calls if c.startswith("unplug")]


@pytest.mark.parametrize(
    "error",
    [
        UnplugInProgress("disk1", "Device disk1 is already in the process of unplug"),
        GuestBusy("disk1", "Hot-unplug failed: guest is busy (power indicator blinking)"),
    ],
)
def test_hypervisor_refusal_releases_the_lease(error: Exception) -> None:
    def refuse(fn: Function) -> list[Removal]:
        raise error

    be, agent = FakeBackend(topo(), refuse), FakeAgent(BEFORE)
    res = run(Orchestrator(be, agent).unplug("disk1", prepare=True))
    assert res.outcome is Outcome.HYPERVISOR_REFUSED
    assert str(error) in res.message
    assert agent.calls[-1] == "release lease-1" and res.lease_released is True
    assert not any(f.removed for f in res.functions)


def test_pending_unplug_times_out_with_lease_released() -> None:
    be, agent = FakeBackend(topo(), lambda fn: []), FakeAgent(BEFORE)
    t0 = time.monotonic()
    res = run(Orchestrator(be, agent).unplug("disk1", prepare=True, timeout=0.3))
    assert time.monotonic() - t0 < 2
    assert res.outcome is Outcome.PENDING and "pending" in res.message
    assert res.lease_released is True and agent.calls[-1] == "release lease-1"
    assert be.calls[-1] == "topology"  # one fresh read after the deadline, no polling


def test_interrupted_wait_says_the_unplug_is_pending_and_releases_the_lease() -> None:
    """Ctrl-C (or SIGTERM, cli.py) while waiting for the guest: the device_del stands, so say so."""
    be, agent = FakeBackend(topo(), lambda fn: []), FakeAgent(BEFORE)
    seen: list[Progress] = []

    async def interrupted() -> None:
        task = asyncio.ensure_future(
            Orchestrator(be, agent).unplug("disk1", prepare=True, timeout=60, progress=seen.append)
        )
        while not any(p.event == "requested" for p in seen):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(interrupted())
    notes = [p.detail for p in seen if p.event == "note"]
    assert notes == [
        "interrupted: the unplug of disk1 was requested and 0 of 1 function(s) had left; the hypervisor keeps "
        "the rest pending and may still complete it"
    ]
    assert seen[-1].event == "released" and agent.calls[-1] == "release lease-1"


def test_missed_event_is_caught_by_the_final_topology_read() -> None:
    class Silent(FakeBackend):
        async def request_unplug(self, fn: Function, *, via_monitor: bool = False) -> None:
            self.calls.append(f"unplug {fn.name}")
            self.gone.add(fn.qemu_id or "")  # gone, but no event

    be, agent = Silent(topo()), FakeAgent(BEFORE, AFTER_DISK1)
    res = run(Orchestrator(be, agent).unplug("disk1", timeout=0.2))
    assert res.outcome is Outcome.UNPLUGGED


def test_agent_dies_mid_unplug() -> None:
    """Unreachable once the hypervisor has the request: removed, unconfirmed, the lease left to the kernel."""

    def die(fn: Function) -> list[Removal]:
        agent.dead = True
        return slot_of(fn)

    be, agent = FakeBackend(topo(), die), FakeAgent(BEFORE)
    t0 = time.monotonic()
    res = run(Orchestrator(be, agent, agent_timeout=0.5).unplug("disk1", prepare=True, timeout=5))
    assert time.monotonic() - t0 < 3
    assert res.outcome is Outcome.UNPLUGGED_UNCONFIRMED
    assert all(f.removed and f.guest_gone is None for f in res.functions)
    assert res.lease_released is False
    assert any("kernel dropped its claims" in n for n in res.notes)
    assert unplug_exit(res) == EXIT_UNCONFIRMED


def test_agent_unreachable_right_after_prepare_unplugs_nothing() -> None:
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BEFORE)
    agent.die_after_prepare = True
    res = run(Orchestrator(be, agent, agent_timeout=0.5).unplug("disk1", prepare=True, timeout=5))
    assert res.outcome is Outcome.GUEST_CHANGED and "did not answer after the lease" in res.message
    assert not [c for c in be.calls if c.startswith("unplug")]
    assert res.lease_released is False and agent.calls[-1] == "release lease-1"
    assert res.plan is not None and res.plan.verdict is Verdict.GUEST_UNREACHABLE
    assert unplug_exit(res) == EXIT[Verdict.GUEST_UNREACHABLE]


def test_a_use_that_appears_after_the_lease_releases_it_and_refuses() -> None:
    """The check said READY; by the time the lease is held a mount won the race: nothing is unplugged."""
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BEFORE, BUSY_DISK1)
    res = run(Orchestrator(be, agent).unplug("disk1", prepare=True))
    assert res.outcome is Outcome.GUEST_CHANGED and "vdb1 is mounted on /data" in res.message
    assert "LEASED" not in res.message and "lease 0123abcd" not in res.message
    assert not [c for c in be.calls if c.startswith("unplug")]
    assert res.lease_released is True and agent.calls[-1] == "release lease-1"
    assert unplug_exit(res) == EXIT[Verdict.BLOCKED_BY_GUEST]


def test_force_covers_only_what_the_check_showed() -> None:
    unknown = report(
        *ROOTS,
        gfunc(
            "0000:01:00.0",
            "0000:00/02.0/00.0",
            "UNKNOWN",
            reasons=[("UNREADABLE", "/proc/42/fd: permission denied", False)],
        ),
        *MF,
    )
    # Still UNKNOWN after the lease: what --force accepted; the unplug goes ahead.
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(unknown, unknown, AFTER_DISK1)
    res = run(Orchestrator(be, agent).unplug("disk1", prepare=True, force=True))
    assert res.outcome is Outcome.UNPLUGGED, res.message
    # BUSY after the lease is new: --force did not see it.
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(unknown, BUSY_DISK1)
    res = run(Orchestrator(be, agent).unplug("disk1", prepare=True, force=True))
    assert res.outcome is Outcome.GUEST_CHANGED and "mounted on /data" in res.message
    assert not [c for c in be.calls if c.startswith("unplug")]


def test_the_lease_outlasts_the_wait() -> None:
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BEFORE, BEFORE, AFTER_DISK1)
    res = run(Orchestrator(be, agent, agent_timeout=1, confirm_timeout=10).unplug("disk1", prepare=True, timeout=600))
    assert agent.lease_seconds >= 600 + 10 + 2
    assert not any("granted the lease for" in n for n in res.notes)
    # An agent that grants less (its max_lease_seconds) is said to, up front.
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BEFORE, BEFORE, AFTER_DISK1)
    agent.max_lease_seconds = 60
    res = run(Orchestrator(be, agent).unplug("disk1", prepare=True, timeout=600))
    assert any("granted the lease for 60 s" in n for n in res.notes), res.notes


def test_hypervisor_gone_while_waiting() -> None:
    """QEMU exits mid-wait: at once (not at the timeout) HYPERVISOR_LOST, per function, lease released, exit 9."""
    be, agent = FakeBackend(topo(), lambda fn: []), FakeAgent(BEFORE)
    be.lose_connection = True
    be.reconnect_error = DomainNotFound("cannot connect to QMP socket: connection refused")
    res = run(Orchestrator(be, agent).unplug("disk1", prepare=True, timeout=30))
    assert res.outcome is Outcome.HYPERVISOR_LOST and "connection refused" in res.message
    assert [(f.name, f.removed, f.guest_gone) for f in res.functions] == [("disk1", False, None)]
    assert res.lease_released is True and agent.calls[-1] == "release lease-1"
    assert be.calls[-1] == "reconnect"
    assert unplug_exit(res) == EXIT_HYPERVISOR_LOST


def test_hypervisor_back_while_waiting() -> None:
    """libvirtd restarts mid-wait: connect again, the topology tells what left meanwhile."""
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BEFORE, BEFORE, AFTER_DISK1)
    be.lose_connection = True
    res = run(Orchestrator(be, agent).unplug("disk1", prepare=True, timeout=30))
    assert res.outcome is Outcome.UNPLUGGED, res.message
    assert "reconnect" in be.calls and all(f.removed for f in res.functions)
    assert res.lease_released is True


def test_prepare_failure_unplugs_nothing() -> None:
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BEFORE)
    agent.prepare_error = claim_conflict()
    res = run(Orchestrator(be, agent).unplug("disk1", prepare=True))
    assert res.outcome is Outcome.PREPARE_FAILED and "vdb1 is mounted" in res.message
    assert not [c for c in be.calls if c.startswith("unplug")]


def test_confirmation_waits_for_the_guest_through_watch() -> None:
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BEFORE, BEFORE)
    agent.watch_reports = [BEFORE, AFTER_DISK1]
    res = run(Orchestrator(be, agent, confirm_timeout=2).unplug("disk1"))
    assert res.outcome is Outcome.UNPLUGGED
    assert "watch" in agent.calls


def test_guest_that_keeps_the_device_is_reported() -> None:
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BEFORE)
    res = run(Orchestrator(be, agent, confirm_timeout=0.2).unplug("disk1"))
    assert res.outcome is Outcome.UNPLUGGED_UNCONFIRMED and "still reports" in res.message


def test_cancellation_releases_the_lease() -> None:
    be, agent = FakeBackend(topo(), lambda fn: []), FakeAgent(BEFORE)

    async def go() -> None:
        task = asyncio.ensure_future(Orchestrator(be, agent).unplug("disk1", prepare=True, timeout=60))
        while "unplug disk1" not in be.calls:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go())
    assert agent.calls[-1] == "release lease-1"


def test_wait_ready_returns_when_the_guest_lets_go() -> None:
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BUSY_DISK1)
    agent.watch_reports = [BUSY_DISK1, BEFORE]
    sp = run(Orchestrator(be, agent).wait_ready("vdb", timeout=5))
    assert sp.verdict is Verdict.UNPLUGGABLE


def test_wait_ready_times_out_still_blocked() -> None:
    be, agent = FakeBackend(topo(), slot_of), FakeAgent(BUSY_DISK1)
    agent.watch_reports = [BUSY_DISK1]
    t0 = time.monotonic()
    sp = run(Orchestrator(be, agent).wait_ready("vdb", timeout=0.3))
    assert time.monotonic() - t0 < 2
    assert sp.verdict is Verdict.BLOCKED_BY_GUEST
