"""Release hooks, the pure parts (agent/mutations/release.py, host/release.py), as tables; and the
host's `unplug --release` step against a fake hypervisor and a fake agent."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import pytest

from tests.unit.host_fakes import FakeAgent, FakeBackend, gfunc
from tests.unit.rpc_fakes import DISK_FN, FakeEngine
from tests.unit.test_orchestrator import AFTER_DISK1, BUSY_DISK1, slot_of, topo
from unplugd.agent.config import ReleaseConfig
from unplugd.agent.model import Address, Mount, NetInterface
from unplugd.agent.mutations.release import (
    FunctionHolding,
    FunctionState,
    MountHeld,
    Outcome,
    Releaser,
    holding,
    hook_environment,
    hook_input,
    hook_names,
    outcome,
    unsafe,
    wait_ready,
)
from unplugd.agent.readiness.policy import evaluate
from unplugd.agent.roots import Roots
from unplugd.host.client import AgentCallFailed
from unplugd.host.exitcodes import Exit
from unplugd.host.orchestrator import Orchestrator, Progress
from unplugd.host.orchestrator import Outcome as UnplugOutcome
from unplugd.host.release import (
    FunctionRelease,
    HookOutcome,
    ReleaseResult,
    functions_from,
    hook_lines,
    release_exit,
    release_slot,
    unplug_released,
)
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import report_pb2

_T = TypeVar("_T")

# ------------------------------------------------------------------------------------------ guest


def test_hook_names_run_in_byte_order_and_skip_leftovers() -> None:
    names = [
        "20-b",
        "10-a",
        "10-a~",
        ".hidden",
        "10-a.dpkg-old",
        "10-a.dpkg-dist",
        "30-c.disabled",
        "B",
        "a",
        "40 space",
        "50-x.rpmnew",
        "-dash",
        "60.py",
        "\udcff",
    ]
    assert hook_names(names) == ["10-a", "20-b", "60.py", "B", "a"]


def _st(mode: int, uid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("st", "directory", "why"),
    [
        (_st(stat.S_IFREG | 0o755), False, ""),
        (_st(stat.S_IFREG | 0o700), False, ""),
        (_st(stat.S_IFREG | 0o775), False, "writable by group (mode 0775)"),
        (_st(stat.S_IFREG | 0o757), False, "writable by others (mode 0757)"),
        (_st(stat.S_IFREG | 0o777), False, "writable by group and others (mode 0777)"),
        (_st(stat.S_IFREG | 0o644), False, "not executable by its owner (mode 0644)"),
        (_st(stat.S_IFREG | 0o755, uid=1000), False, "owned by uid 1000, not root"),
        (_st(stat.S_IFIFO | 0o755), False, "not a regular file"),
        (_st(stat.S_IFDIR | 0o755), False, "not a regular file"),
        (_st(stat.S_IFDIR | 0o755), True, ""),
        (_st(stat.S_IFDIR | 0o1777), True, "writable by group and others (mode 1777)"),
        (_st(stat.S_IFDIR | 0o755, uid=1), True, "owned by uid 1, not root"),
        (_st(stat.S_IFREG | 0o755), True, "not a directory"),
    ],
)
def test_unsafe(st: os.stat_result, directory: bool, why: str) -> None:
    assert unsafe(st, directory=directory) == why


@pytest.mark.parametrize(
    ("state", "had", "want"),
    [
        ("READY", True, Outcome.RELEASED),
        ("READY", False, Outcome.RELEASED),
        ("BUSY", True, Outcome.STILL_BUSY),
        ("UNKNOWN", True, Outcome.STILL_BUSY),
        ("BUSY", False, Outcome.NO_HOOK),
        ("", False, Outcome.NO_HOOK),
    ],
)
def test_outcome(state: str, had: bool, want: Outcome) -> None:
    assert outcome(state, had_hooks=had) is want


HOSTILE = "/srv/a b\n\\\udcff\u202e"


def _engine_inventory() -> tuple[FakeEngine, object]:
    engine = FakeEngine()
    inv = engine.inventory._replace(
        mounts=(
            Mount(1, 0, (254, 17), "/", HOSTILE, "ext4", "/dev/vdb1", "rw", 11, 1),
            Mount(2, 0, (254, 17), "/", HOSTILE, "ext4", "/dev/vdb1", "rw", 11, 1),  # same point, same namespace
            Mount(3, 0, (254, 17), "/", "/data", "ext4", "/dev/vdb1", "rw", 22, 812),
        ),
        interfaces={
            "eth1": NetInterface(
                "eth1", 3, True, "up", True, master="bond0", uppers=("bond0",), addresses=(Address(2, "10.0.0.2", 24),)
            )
        },
    )
    return engine, inv


def test_holding_names_the_stack_its_mounts_interfaces_and_reasons() -> None:
    _, inv = _engine_inventory()
    fn_disk, fn_nic = inv.functions  # type: ignore[attr-defined]
    verdicts = {v.address: v for v in evaluate(inv)}  # type: ignore[arg-type]
    h = holding(inv, fn_disk, verdicts[fn_disk.address])  # type: ignore[arg-type]
    assert (h.address, h.pci_path, h.state) == (str(DISK_FN), str(fn_disk.path), "BUSY")
    assert h.block_devices == ("vdb", "vdb1")
    assert h.mounts == (MountHeld("vdb1", HOSTILE, "ext4", 1), MountHeld("vdb1", "/data", "ext4", 812))
    assert "MOUNTED" in {r.code for r in h.reasons}
    n = holding(inv, fn_nic, verdicts[fn_nic.address])  # type: ignore[arg-type]
    assert [(i.name, i.master, i.addresses) for i in n.interfaces] == [("eth1", "bond0", ("10.0.0.2/24",))]


def test_environment_and_json_carry_hostile_names_safely() -> None:
    h = FunctionHolding(
        "0000:00:06.0",
        "0000:00/06.0",
        "BUSY",
        ("vdb", "vdb1"),
        (MountHeld("vdb1", HOSTILE, "ext4", 1), MountHeld("vdb1", "/data", "ext4", 1)),
    )
    env = hook_environment(h, timeout=30)
    assert env["UNPLUGD_MOUNT_POINTS"].split("\n") == ["/srv/a b\\012\\134\\377\u202e", "/data"]
    assert env["UNPLUGD_BLOCK_DEVICES"] == "vdb\nvdb1"
    assert env["UNPLUGD_HOOK_TIMEOUT"] == "30"
    assert set(env) >= {"PATH", "UNPLUGD_FUNCTION", "UNPLUGD_PCI_PATH", "UNPLUGD_INTERFACES", "UNPLUGD_REASONS"}
    doc = json.loads(hook_input(h))
    assert doc["mounts"][0]["mountPoint"] == "/srv/a b\n\\134\\377\u202e"  # wire_text: exact, reversible
    hook_input(h).decode("utf-8")  # valid UTF-8 whatever the names hold


def test_wait_ready_stops_when_every_wanted_function_is_ready() -> None:
    busy, ready = FunctionState("BUSY"), FunctionState("READY")
    stream: list[Mapping[str, FunctionState] | None] = [
        {"a": busy, "b": busy, "c": busy},
        {"a": ready, "b": busy, "c": busy},
        {"a": ready, "b": ready, "c": busy},
        {"a": busy, "b": busy, "c": busy},
    ]
    asked: list[float] = []

    def next_states(timeout: float) -> Mapping[str, FunctionState] | None:
        asked.append(timeout)
        return stream.pop(0)

    got = wait_ready(next_states, {"a", "b", "c"}, ["a", "b"], deadline=100.0, clock=lambda: 0.0)
    assert got == {"a": ready, "b": ready, "c": busy}  # c is watched, not waited for
    assert len(stream) == 1


def test_wait_ready_ends_at_the_deadline_and_takes_one_report_even_past_it() -> None:
    calls: list[float] = []

    def next_states(timeout: float) -> Mapping[str, FunctionState] | None:
        calls.append(timeout)
        if len(calls) > 1:
            raise TimeoutError
        return {"a": FunctionState("BUSY")}

    assert wait_ready(next_states, {"a"}, ["a"], deadline=5.0, clock=lambda: 9.0) == {"a": FunctionState("BUSY")}
    assert calls == [10.0]  # the deadline had passed: FIRST_REPORT_GRACE
    assert wait_ready(lambda t: {"a": FunctionState("BUSY")}, {"a"}, [], deadline=5.0) == {"a": FunctionState("BUSY")}


@pytest.mark.parametrize(
    ("asked", "got"), [(0.0, 600.0), (float("nan"), 600.0), (-1.0, 600.0), (30.0, 30.0), (601.0, 600.0)]
)
def test_the_deadline_is_capped_by_the_config(asked: float, got: float) -> None:
    releaser = Releaser(FakeEngine(), Roots.under("/nonexistent"), None, ReleaseConfig())  # type: ignore[arg-type]
    assert releaser.deadline_seconds(asked) == got


# ------------------------------------------------------------------------------------------ host


def _response() -> pb.RequestReleaseResponse:
    resp = pb.RequestReleaseResponse()
    f = resp.functions.add(
        address="0000:01:00.0",
        pci_path="0000:00/02.0/00.0",
        outcome=pb.RELEASE_OUTCOME_STILL_BUSY,
        state=report_pb2.FUNCTION_STATE_BUSY,
    )
    f.reasons.add(code=report_pb2.REASON_CODE_MOUNTED, detail="vdb1 is mounted on /data", blocking=True)
    f.hooks.add(name="10-fail", status=pb.HOOK_STATUS_EXITED, exit_code=1, stderr="a\nb\n", seconds=0.25)
    f.hooks.add(name="20-hang", status=pb.HOOK_STATUS_TIMED_OUT, signal=9, seconds=5.0, detail="still running")
    f.hooks.add(name="30-gw", status=pb.HOOK_STATUS_REFUSED, detail="writable by group (mode 0775)")
    f.hooks.add(name="40-new", status=99)  # a newer agent's status
    return resp


def test_functions_from_the_wire_and_progress_lines() -> None:
    (f,) = functions_from(_response())
    assert (f.outcome, f.state, [r.code for r in f.reasons]) == ("STILL_BUSY", "BUSY", ["MOUNTED"])
    assert [h.status for h in f.hooks] == ["EXITED", "TIMED_OUT", "REFUSED", "HOOK_STATUS_99"]
    assert hook_lines(f) == [
        "0000:01:00.0: hook 10-fail: exit 1 after 0.2 s",
        "0000:01:00.0:   a",
        "0000:01:00.0:   b",
        "0000:01:00.0: hook 20-hang: timed out after 5.0 s: still running",
        "0000:01:00.0: hook 30-gw: REFUSED, not run: writable by group (mode 0775)",
        "0000:01:00.0: hook 40-new: HOOK_STATUS_99",
        "0000:01:00.0: STILL_BUSY (BUSY)",
    ]


def _result(**kw: object) -> ReleaseResult:
    return ReleaseResult(plan=None, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("result", "code"),
    [
        (_result(functions=(FunctionRelease("a", "p", "RELEASED", "READY"),)), Exit.OK),
        (
            _result(
                functions=(FunctionRelease("a", "p", "RELEASED", "READY"), FunctionRelease("b", "p", "NO_HOOK", "BUSY"))
            ),
            Exit.BLOCKED_BY_GUEST,
        ),
        (_result(functions=(FunctionRelease("a", "p", "STILL_BUSY", "BUSY"),)), Exit.BLOCKED_BY_GUEST),
        (_result(), Exit.BLOCKED_BY_GUEST),  # nothing released is not released
        (_result(error="RequestRelease refused", disabled=True), Exit.RELEASE_DISABLED),
        (_result(error="unreachable"), Exit.GUEST_UNREACHABLE),
    ],
)
def test_release_exit(result: ReleaseResult, code: Exit) -> None:
    assert release_exit(result) == code


class ReleasingAgent(FakeAgent):
    def __init__(self, answer: pb.RequestReleaseResponse | Exception, *reports: report_pb2.Report) -> None:
        super().__init__(*reports)
        self.answer = answer

    async def request_release(
        self, devices: Sequence[str], deadline_seconds: float, *, timeout: float | None = None
    ) -> pb.RequestReleaseResponse:
        self._check(f"request_release {','.join(devices)} {deadline_seconds:g}")
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


def _disk1_released() -> tuple[pb.RequestReleaseResponse, report_pb2.Report]:
    """The agent's answer that disk1 was released, and the report in which it is then READY."""
    released = pb.RequestReleaseResponse()
    released.functions.add(
        address="0000:01:00.0",
        pci_path="0000:00/02.0/00.0",
        outcome=pb.RELEASE_OUTCOME_RELEASED,
        state=report_pb2.FUNCTION_STATE_READY,
    )
    ready = AFTER_DISK1.__class__()
    ready.CopyFrom(BUSY_DISK1)
    ready.functions[2].CopyFrom(gfunc("0000:01:00.0", "0000:00/02.0/00.0", blocks=("vdb",)))
    return released, ready


def test_unplug_release_unplugs_with_a_lease_once_released() -> None:
    released, ready = _disk1_released()
    be = FakeBackend(topo(), slot_of)
    agent = ReleasingAgent(released, BUSY_DISK1, ready, ready, AFTER_DISK1)
    rel, unplug = _run(unplug_released(Orchestrator(be, agent), "disk1", timeout=30))
    assert rel.released
    assert unplug is not None and unplug.outcome is UnplugOutcome.UNPLUGGED and unplug.lease_id
    assert agent.calls[1] == "request_release 0000:01:00.0 30"
    assert agent.calls.index("request_release 0000:01:00.0 30") < agent.calls.index("prepare 0000:01:00.0")


class SlowReleasingAgent(ReleasingAgent):
    """Its hooks take a moment, as real ones do: the release's progress then reads well past zero."""

    async def request_release(
        self, devices: Sequence[str], deadline_seconds: float, *, timeout: float | None = None
    ) -> pb.RequestReleaseResponse:
        await asyncio.sleep(0.05)
        return await super().request_release(devices, deadline_seconds, timeout=timeout)


def test_unplug_release_progress_times_go_on_from_the_release() -> None:
    """One command, one clock: the unplug half's progress does not start again at zero."""
    released, ready = _disk1_released()
    agent = SlowReleasingAgent(released, BUSY_DISK1, ready, ready, AFTER_DISK1)
    seen: list[Progress] = []
    _run(unplug_released(Orchestrator(FakeBackend(topo(), slot_of), agent), "disk1", timeout=30, progress=seen.append))
    events = [p.event for p in seen]
    assert events[0] == "release" and "planned" in events and events[-1] != "release"
    times = [p.elapsed for p in seen]
    assert times == sorted(times) and times[0] >= 0.05, seen


@pytest.mark.parametrize(
    "answer",
    [_response(), AgentCallFailed("unix:/fake", "RequestRelease", grpc.StatusCode.PERMISSION_DENIED, "disabled")],
    ids=["still-busy", "disabled"],
)
def test_unplug_release_unplugs_nothing_unless_released(answer: object) -> None:
    be = FakeBackend(topo(), slot_of)
    agent = ReleasingAgent(answer, BUSY_DISK1)  # type: ignore[arg-type]
    rel, unplug = _run(unplug_released(Orchestrator(be, agent), "disk1", timeout=30))
    assert unplug is None and not rel.released
    assert not [c for c in be.calls if c.startswith("unplug")]
    assert not [c for c in agent.calls if c.startswith("prepare")]
    assert release_exit(rel) == (
        Exit.RELEASE_DISABLED if isinstance(answer, AgentCallFailed) else Exit.BLOCKED_BY_GUEST
    )


def test_release_with_an_unreachable_agent_says_why() -> None:
    """The agent's own error, not "it reports no function of this slot" (it reported nothing)."""
    agent = ReleasingAgent(_response(), BUSY_DISK1)
    agent.dead = True
    rel = _run(release_slot(Orchestrator(FakeBackend(topo(), slot_of), agent), "disk1", timeout=30))
    assert rel.message == "no answer from the guest agent: agent at unix:/fake is unreachable: connection refused"
    assert release_exit(rel) == Exit.GUEST_UNREACHABLE
    assert not [c for c in agent.calls if c.startswith("request_release")]


def test_hook_outcome_summary() -> None:
    assert HookOutcome("x", "EXITED", 0, seconds=1.0).summary() == "exit 0 after 1.0 s"
    assert HookOutcome("x", "SKIPPED", detail="the call's deadline had passed").summary() == (
        "skipped: the call's deadline had passed"
    )
