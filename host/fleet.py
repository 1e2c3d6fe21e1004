"""Fleet questions: `status` and `check` over many domains on many hypervisors at once.

    unplugctl status --connect qemu+ssh://hv1/system --connect qemu+ssh://hv2/system --all-domains
    unplugctl status -c URI -c URI --all-domains --unpluggable 'model=hostdev*'    # who can give a GPU back now?
    unplugctl check  -c URI --all-domains net1 --json

Each domain is one Question answered by one Answer, in its own task under a semaphore (`--jobs`):
one domain's failure (its hypervisor gone, its agent silent, its XML odd) is that domain's Answer
and never stops the others. Every domain has a deadline; nothing waits forever on a hypervisor that
stopped answering. The pure parts (Selector, unpluggable(), state_of(), summary_exit(),
answer_json()) are table-tested in tests/unit/test_fleet.py; the I/O is run_fleet() and what the
caller's `open_` does (host/cli.py opens one libvirt connection per URI, shared by its domains).
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import Enum
from typing import Any

from unplugd.host.client import AgentUnreachable
from unplugd.host.errors import BackendError, HostError, TopologyError
from unplugd.host.exitcodes import Exit
from unplugd.host.planner import GuestView, Plan, SlotPlan, Verdict, plan, plan_slot, resolve
from unplugd.host.topology import Function, Topology
from unplugd.host.usage import DEFAULT_JOBS

__all__ = [
    "DEFAULT_JOBS",
    "Answer",
    "Open",
    "Question",
    "Selector",
    "State",
    "Target",
    "ask",
    "run_fleet",
    "state_of",
    "summary_exit",
    "unpluggable",
]


@dataclass(frozen=True, order=True)
class Target:
    uri: str
    domain: str


class State(Enum):
    ANSWERED = "answered"  # hypervisor and guest agent both answered
    UNREACHABLE = "unreachable"  # the hypervisor, the domain or its guest agent could not be reached
    FAILED = "failed"  # reached, but the question failed (an error that is not about reachability)


@dataclass(frozen=True)
class Question:
    """What to ask each domain: its status, one DEVICE's check, or which devices matching a selector
    are UNPLUGGABLE now (`unpluggable`, on status)."""

    device: str | None = None
    unpluggable: Selector | None = None


_KEYS = ("alias", "target", "model", "path")


@dataclass(frozen=True)
class Selector:
    """KEY=GLOB[,KEY=GLOB...] over a hypervisor-side function: alias, target (vdb), model
    ("interface virtio", "hostdev"), path (the PCI path, 0000:00/02.0/00.0). All must match one
    function; shell-style globs (fnmatch, case-sensitive). Pure."""

    terms: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str) -> Selector:
        terms = []
        for part in text.split(","):
            key, eq, glob = part.partition("=")
            key = key.strip()
            if not eq or key not in _KEYS or not glob:
                raise ValueError(f"{text!r}: expected KEY=GLOB[,KEY=GLOB...] with KEY one of {', '.join(_KEYS)}")
            terms.append((key, glob))
        return cls(tuple(terms))

    def matches(self, fn: Function) -> bool:
        def values(key: str) -> Iterable[str]:
            if key == "alias":
                return (fn.alias,) if fn.alias else ()
            if key == "target":
                return fn.targets
            if key == "model":
                return (fn.model,)
            return (str(fn.path),)

        return all(any(fnmatch.fnmatchcase(v, glob) for v in values(key)) for key, glob in self.terms)

    def __str__(self) -> str:
        return ",".join(f"{k}={g}" for k, g in self.terms)


def unpluggable(topo: Topology, guest: GuestView | None, selector: Selector, guest_error: str = "") -> list[SlotPlan]:
    """The plan of each function matching `selector` asked for alone (as `unplugctl unplug` would),
    kept when UNPLUGGABLE: a device that needs companions, or whose slot is not hotpluggable, does
    not count. In PCI path order. Pure."""
    found: list[SlotPlan] = []
    for fn in sorted((f for s in topo.slots for f in s.functions), key=lambda f: str(f.path)):
        if fn.is_bridge or not selector.matches(fn):
            continue
        sel = resolve(str(fn.path), topo, guest)
        sp = plan_slot(sel.slot_path, topo, guest, requested=sel.paths, guest_error=guest_error)
        if sp.verdict is Verdict.UNPLUGGABLE:
            found.append(sp)
    return found


@dataclass(frozen=True)
class Answer:
    target: Target
    state: State
    error: str = ""
    plan: Plan | None = None  # status
    slot: SlotPlan | None = None  # check
    matches: tuple[SlotPlan, ...] = ()  # status --unpluggable
    seconds: float = 0.0


def state_of(exc: BaseException) -> State:
    """What an error while asking one domain says about it. Pure.

    Not reached: the hypervisor connection or a call on it (BackendError: no answer, connection
    lost), the domain (DomainNotFound: missing or not running), the agent, a deadline. A failure of
    the question: what the hypervisor answered does not make sense (TopologyError), a DEVICE that
    matches nothing or several slots, an agent call that answered with an error."""
    if isinstance(exc, TopologyError):
        return State.FAILED
    if isinstance(exc, (BackendError, AgentUnreachable, TimeoutError)):
        return State.UNREACHABLE
    return State.FAILED


def summary_exit(answers: Iterable[Answer]) -> int:
    """0 when every domain answered, 4 (GUEST_UNREACHABLE) when some could not be reached,
    1 (FAILURE) when any failed; a failure outranks unreachable. Pure."""
    states = {a.state for a in answers}
    if State.FAILED in states:
        return Exit.FAILURE
    if State.UNREACHABLE in states:
        return Exit.GUEST_UNREACHABLE
    return Exit.OK


Open = Callable[[Target], AbstractAsyncContextManager[Any]]  # -> an Orchestrator for the target


async def ask(target: Target, open_: Open, question: Question, deadline: float) -> Answer:
    """One domain's Answer within `deadline` seconds; never raises a HostError."""
    start = time.monotonic()

    async def go() -> Answer:
        async with open_(target) as orch:
            topo, guest, why = await orch.snapshot()
            if question.device is not None:
                sel = resolve(question.device, topo, guest)
                sp = plan_slot(sel.slot_path, topo, guest, requested=sel.paths, guest_error=why)
                return Answer(target, State.ANSWERED if guest is not None else State.UNREACHABLE, why, slot=sp)
            p = plan(topo, guest, guest_error=why)
            matches = tuple(unpluggable(topo, guest, question.unpluggable, why)) if question.unpluggable else ()
            state = State.ANSWERED if p.guest_reachable else State.UNREACHABLE
            return Answer(target, state, p.guest_error or "", plan=p, matches=matches)

    try:
        answer = await asyncio.wait_for(go(), deadline)
    except TimeoutError:
        answer = Answer(target, State.UNREACHABLE, f"no answer within {deadline:g}s")
    except HostError as exc:
        answer = Answer(target, state_of(exc), str(exc) or type(exc).__name__)
    return Answer(
        answer.target, answer.state, answer.error, answer.plan, answer.slot, answer.matches, time.monotonic() - start
    )


async def run_fleet(
    targets: Sequence[Target],
    open_: Open,
    question: Question,
    *,
    jobs: int = DEFAULT_JOBS,
    deadline: float = 60.0,
    on_answer: Callable[[Answer], Awaitable[None] | None] | None = None,
) -> list[Answer]:
    """Ask every target, at most `jobs` at once; answers in completion order through `on_answer`
    (output as they come), returned in target order."""
    gate = asyncio.Semaphore(max(1, jobs))

    async def one(t: Target) -> Answer:
        async with gate:
            a = await ask(t, open_, question, deadline)
        if on_answer is not None:
            r = on_answer(a)
            if r is not None:
                await r
        return a

    return list(await asyncio.gather(*(one(t) for t in targets)))
