"""host/fleet.py: the selector, which devices are UNPLUGGABLE now, how an error classifies a domain,
the summary exit code, and run_fleet's bounds (concurrency, deadline, one failure not stopping the
rest) with fake domains; host/fleet_cli.py's lines of output."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.unit.host_fakes import FakeAgent, FakeBackend, func
from tests.unit.test_unplugctl import BUSY, READY, RP1, topo
from unplugd.host.client import AgentCallFailed, AgentUnreachable
from unplugd.host.errors import BackendError, DeviceNotFound, DomainNotFound, TopologyError
from unplugd.host.exitcodes import Exit
from unplugd.host.fleet import Answer, Question, Selector, State, Target, run_fleet, state_of, summary_exit, unpluggable
from unplugd.host.fleet_cli import answer_json, answer_line
from unplugd.host.orchestrator import Orchestrator
from unplugd.host.planner import GuestView


@pytest.mark.parametrize(
    ("text", "terms"),
    [
        ("alias=net*", (("alias", "net*"),)),
        ("model=hostdev*,path=0000:00/02.*", (("model", "hostdev*"), ("path", "0000:00/02.*"))),
        ("target=vdb", (("target", "vdb"),)),
    ],
)
def test_selector_parses(text: str, terms: tuple[tuple[str, str], ...]) -> None:
    assert Selector.parse(text).terms == terms
    assert str(Selector.parse(text)) == text


@pytest.mark.parametrize("text", ["", "vdb", "colour=red", "alias=", "alias=a,,model=b"])
def test_selector_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="KEY=GLOB"):
        Selector.parse(text)


NIC = func(RP1, 0, qemu_id="net1", alias="net1", model="interface virtio")
DISK = func(RP1, 0, qemu_id="disk1", alias="virtio-disk1", targets=("vdb",), model="disk virtio")


@pytest.mark.parametrize(
    ("selector", "fn", "hit"),
    [
        ("alias=net*", NIC, True),
        ("alias=net*", DISK, False),
        ("target=vd?", DISK, True),
        ("target=vd?", NIC, False),  # no target at all
        ("model=interface *", NIC, True),
        ("model=Interface *", NIC, False),  # case-sensitive, as libvirt's names are
        ("path=0000:00/02.0/*", DISK, True),
        ("path=0000:00/02.1/*", DISK, False),
        ("alias=virtio-disk1,target=vdc", DISK, False),  # every term, on the same function
        ("alias=virtio-disk1,target=vdb", DISK, True),
    ],
)
def test_selector_matches(selector: str, fn: object, hit: bool) -> None:
    assert Selector.parse(selector).matches(fn) is hit  # type: ignore[arg-type]


def test_unpluggable_keeps_only_devices_that_could_go_alone_now() -> None:
    t = topo()
    every = Selector.parse("model=virtio-blk-pci")
    # vdb's slot is READY; mf-disk needs its companion; off-net is a NIC, not selected
    ready = unpluggable(t, GuestView.from_report(READY), every)
    assert [sp.slot_path for sp in ready] == ["0000:00/02.0/00"]
    assert [fp.host.qemu_id for fp in ready[0].requested if fp.host] == ["disk1"]
    # the same domain with vdb mounted: nothing
    assert unpluggable(t, GuestView.from_report(BUSY), every) == []
    # no guest answer: nothing is UNPLUGGABLE (GUEST_UNREACHABLE)
    assert unpluggable(t, None, every, "agent gone") == []
    # the slot's two functions, each asked alone, need companions
    assert unpluggable(t, GuestView.from_report(READY), Selector.parse("path=0000:00/02.1/*")) == []


@pytest.mark.parametrize(
    ("exc", "state"),
    [
        (DomainNotFound("cannot connect to qemu+ssh://hv/system"), State.UNREACHABLE),
        (BackendError("libvirt dumpxml got no answer within 10s"), State.UNREACHABLE),
        (AgentUnreachable("channel:x", "no answer"), State.UNREACHABLE),
        (TimeoutError(), State.UNREACHABLE),
        (TopologyError("domain XML does not parse"), State.FAILED),
        (DeviceNotFound("no device matches 'net9'"), State.FAILED),
        (AgentCallFailed("channel:x", "GetReport", grpc.StatusCode.INTERNAL, "boom"), State.FAILED),
    ],
)
def test_state_of(exc: BaseException, state: State) -> None:
    assert state_of(exc) is state


def _answers(*states: State) -> list[Answer]:
    return [Answer(Target("u", str(i)), s) for i, s in enumerate(states)]


@pytest.mark.parametrize(
    ("states", "code"),
    [
        ((), Exit.OK),
        ((State.ANSWERED, State.ANSWERED), Exit.OK),
        ((State.ANSWERED, State.UNREACHABLE), Exit.GUEST_UNREACHABLE),
        ((State.UNREACHABLE, State.FAILED, State.ANSWERED), Exit.FAILURE),
    ],
)
def test_summary_exit(states: tuple[State, ...], code: int) -> None:
    assert summary_exit(_answers(*states)) == code


class Fleet:
    """Fake domains: each an Orchestrator on a FakeBackend and FakeAgent; counts how many are open."""

    def __init__(self, *, delay: float = 0.01) -> None:
        self.delay = delay
        self.open_now = 0
        self.most = 0
        self.broken: dict[str, Exception] = {}
        self.dead_agents: set[str] = set()
        self.hang: set[str] = set()

    @contextlib.asynccontextmanager
    async def open(self, t: Target) -> AsyncIterator[Orchestrator]:
        self.open_now += 1
        self.most = max(self.most, self.open_now)
        try:
            await asyncio.sleep(self.delay)
            if t.domain in self.hang:
                await asyncio.sleep(3600)
            if t.domain in self.broken:
                raise self.broken[t.domain]
            agent = FakeAgent(READY)
            agent.dead = t.domain in self.dead_agents
            yield Orchestrator(FakeBackend(topo()), agent)
        finally:
            self.open_now -= 1


def _run(fleet: Fleet, targets: list[Target], question: Question, **kw: object) -> list[Answer]:
    return asyncio.run(run_fleet(targets, fleet.open, question, **kw))  # type: ignore[arg-type]


def test_run_fleet_bounds_concurrency_and_keeps_target_order() -> None:
    fleet = Fleet()
    targets = [Target(f"qemu+tcp://hv{i % 3}/system", f"vm{i}") for i in range(40)]
    answers = _run(fleet, targets, Question(), jobs=5)
    assert fleet.most == 5
    assert [a.target for a in answers] == targets
    assert {a.state for a in answers} == {State.ANSWERED}
    assert all(a.plan is not None and len(a.plan.slots) == 4 for a in answers)


def test_one_domain_failing_never_stops_the_others() -> None:
    fleet = Fleet()
    fleet.broken = {"vm1": DomainNotFound("domain 'vm1' is not running"), "vm2": TopologyError("bad XML")}
    fleet.dead_agents = {"vm3"}
    fleet.hang = {"vm4"}
    targets = [Target("u", f"vm{i}") for i in range(8)]
    seen: list[str] = []
    answers = _run(fleet, targets, Question(), jobs=3, deadline=0.5, on_answer=lambda a: seen.append(a.target.domain))
    states = {a.target.domain: a.state for a in answers}
    assert states == {
        "vm0": State.ANSWERED,
        "vm1": State.UNREACHABLE,
        "vm2": State.FAILED,
        "vm3": State.UNREACHABLE,
        "vm4": State.UNREACHABLE,
        "vm5": State.ANSWERED,
        "vm6": State.ANSWERED,
        "vm7": State.ANSWERED,
    }
    assert "no answer within 0.5s" in answers[4].error
    assert "connection refused" in answers[3].error  # the plan says why the guest was not reached
    assert sorted(seen) == [t.domain for t in targets]  # every answer was emitted, as it came
    assert summary_exit(answers) == Exit.FAILURE


def test_fleet_check_and_the_unpluggable_filter() -> None:
    fleet = Fleet()
    targets = [Target("u", "a"), Target("u", "b")]
    checked = _run(fleet, targets, Question(device="vdb"))
    assert [a.slot.verdict.value if a.slot else None for a in checked] == ["UNPLUGGABLE", "UNPLUGGABLE"]
    missing = _run(fleet, targets[:1], Question(device="net9"))
    assert missing[0].state is State.FAILED and "net9" in missing[0].error
    found = _run(fleet, targets, Question(unpluggable=Selector.parse("target=vdb")))
    assert [[sp.slot_path for sp in a.matches] for a in found] == [["0000:00/02.0/00"]] * 2


def test_output_lines() -> None:
    fleet = Fleet()
    fleet.broken = {"b": DomainNotFound("domain 'b' is not running")}
    q = Question(unpluggable=Selector.parse("target=vdb"))
    a, b = _run(fleet, [Target("qemu+tcp://hv/system", "a"), Target("qemu+tcp://hv/system", "b")], q)
    doc = json.loads(json.dumps(answer_json(a, q)))
    assert (doc["uri"], doc["domain"], doc["state"]) == ("qemu+tcp://hv/system", "a", "answered")
    assert doc["unpluggable"] == [
        {
            "slotPath": "0000:00/02.0/00",
            "devices": [{"pciPath": "0000:00/02.0/00.0", "alias": None, "targets": ["vdb"], "model": "virtio-blk-pci"}],
        }
    ]
    assert doc["status"]["guestReachable"] is True
    assert answer_line(a, q) == "qemu+tcp://hv/system a: UNPLUGGABLE now: 0000:00/02.0/00.0 (virtio-blk-pci)"
    assert answer_line(b, q) == "qemu+tcp://hv/system b: UNREACHABLE: domain 'b' is not running"
    assert answer_json(b, q)["status"] is None
    plain = Question()
    # status plans each slot whole: the root ports' slot and the hotplug='off' port are NOT_HOTPLUGGABLE,
    # vdb's port and the multifunction slot (both functions asked for) UNPLUGGABLE
    assert answer_line(a, plain) == (
        "qemu+tcp://hv/system a: guest agent reachable; 4 slots: 2 NOT_HOTPLUGGABLE, 2 UNPLUGGABLE"
    )
    checked = _run(fleet, [Target("u", "a")], Question(device="vdb"))[0]
    assert answer_line(checked, Question(device="vdb")) == "u a: vdb 0000:00/02.0/00 UNPLUGGABLE"
    assert answer_json(checked, Question(device="vdb"))["verdict"] == "UNPLUGGABLE"


def test_a_busy_guest_is_not_listed_by_the_filter() -> None:
    @contextlib.asynccontextmanager
    async def busy(t: Target) -> AsyncIterator[Orchestrator]:
        yield Orchestrator(FakeBackend(topo()), FakeAgent(BUSY))

    q = Question(unpluggable=Selector.parse("target=vdb"))
    (a,) = asyncio.run(run_fleet([Target("u", "x")], busy, q))
    assert a.state is State.ANSWERED and a.matches == ()
    assert answer_line(a, q) is None


class _Conn:
    def close(self) -> None:
        pass


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_all_domains_with_none_running_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], json_flag: list[str]
) -> None:
    """A hypervisor with no running domain: a line on stderr, nothing on stdout, exit 0; it printed nothing."""
    from unplugd.host import cli, fleet_cli

    async def open_connection(uri: str, timeout: float) -> _Conn:
        return _Conn()

    async def running_domains(conn: object, timeout: float) -> list[str]:
        return []

    monkeypatch.setattr(fleet_cli, "open_connection", open_connection)
    monkeypatch.setattr(fleet_cli, "running_domains", running_domains)
    assert cli.main(["status", "--all-domains", "-c", "qemu+ssh://hv1/system", *json_flag]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "unplugctl: no running domain on qemu+ssh://hv1/system\n"
