"""What the service needs from the readiness engine, as a Protocol.

The servicer, leases and the watcher take an EngineApi, so tests hand them a
fake and `serve` hands them ModuleEngine, which calls agent.engine and
agent.selection. Names from requests are only ever matched against an
inspected inventory there, never turned into paths.

CoalescingEngine wraps either so that concurrent identical inspect() calls
share work instead of piling scans on top of each other: a caller that
arrives while a scan for the same question runs waits for the next one,
which starts after it arrived, so no one gets a report older than its call.
A crowd of N callers costs about two scans, not N.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from unplugd.agent import engine, selection
from unplugd.agent.model import Inventory, PciFunction
from unplugd.agent.roots import Roots
from unplugd.pci import PciAddress
from unplugd.v1 import report_pb2

__all__ = ["Coalescer", "CoalescingEngine", "EngineApi", "ModuleEngine"]

_V = TypeVar("_V")


class EngineApi(Protocol):
    """The one statement of what the service asks the engine; ModuleEngine and
    CoalescingEngine implement it (and name it as their base, so a drift fails
    type checking where they are defined), tests fake it.

    Every argument is passed by every caller: no defaults to keep in step.
    """

    def scan(self, roots: Roots, *, own_claims: Collection[str]) -> Inventory:
        """The inventory; `own_claims`: kernel names of disks our leases hold (not someone else's claim)."""
        ...

    def inspect(
        self, roots: Roots, devices: Sequence[str], *, leased: Mapping[PciAddress, str], own_claims: Collection[str]
    ) -> report_pb2.Report:
        """The report of `devices` (every function when empty), `leased` functions marked with their lease label."""
        ...

    def select(self, inventory: Inventory, names: Sequence[str]) -> list[PciFunction]:
        """The functions `names` (request text, matched against the inventory only) designate."""
        ...

    def functions(self, roots: Roots) -> report_pb2.Report:
        """The PCI functions alone, unjudged: a report with no state and no reasons (functions_only)."""
        ...


class ModuleEngine(EngineApi):
    """The real engine: agent/engine.py and agent/selection.py.

    exclusive_probe: [readiness] exclusive_probe of the agent's config.
    """

    def __init__(self, *, exclusive_probe: bool = True) -> None:
        self._probe = exclusive_probe

    def scan(self, roots: Roots, *, own_claims: Collection[str]) -> Inventory:
        return engine.scan(roots, own_claims=own_claims, exclusive_probe=self._probe)

    def inspect(
        self, roots: Roots, devices: Sequence[str], *, leased: Mapping[PciAddress, str], own_claims: Collection[str]
    ) -> report_pb2.Report:
        return engine.inspect(roots, devices, leased=leased, own_claims=own_claims, exclusive_probe=self._probe)

    def select(self, inventory: Inventory, names: Sequence[str]) -> list[PciFunction]:
        return selection.select(inventory, names)

    def functions(self, roots: Roots) -> report_pb2.Report:
        return engine.functions(roots)


@dataclass
class _Round(Generic[_V]):
    """The computations of one key: how many started and finished, the newest outcome, who waits."""

    cond: threading.Condition
    started: int = 0
    finished: int = 0
    running: bool = False
    outcome: tuple[bool, _V | BaseException] | None = None  # (ok, value or error) of round `finished`
    users: int = 0


@dataclass
class Coalescer(Generic[_V]):
    """run(key, fn): one fn at a time per key; callers that arrive meanwhile share the next run.

    A caller is answered by the first run that starts after it arrived (so
    never by one already under way, which may have read the system before
    the caller asked). Errors are shared the same way. A key's bookkeeping
    is dropped when its last caller leaves, so keys cost nothing at rest.
    """

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rounds: dict[Hashable, _Round[_V]] = field(default_factory=dict)
    runs: int = 0  # for tests and figures: how many times fn ran

    def run(self, key: Hashable, fn: Callable[[], _V]) -> _V:
        with self._lock:
            rnd = self._rounds.get(key)
            if rnd is None:
                rnd = self._rounds[key] = _Round(threading.Condition(self._lock))
            rnd.users += 1
            try:
                want = rnd.started + 1  # the first run that starts from now on
                while rnd.finished < want:
                    if not rnd.running:
                        rnd.running = True
                        rnd.started += 1
                        self.runs += 1
                        mine = rnd.started
                        self._lock.release()
                        try:
                            outcome: tuple[bool, _V | BaseException] = (True, fn())
                        except BaseException as exc:  # handed to every caller of this run, raised below
                            outcome = (False, exc)
                        finally:
                            self._lock.acquire()
                        rnd.running = False
                        rnd.finished, rnd.outcome = mine, outcome
                        rnd.cond.notify_all()
                    else:
                        rnd.cond.wait()
                assert rnd.outcome is not None
                ok, value = rnd.outcome
            finally:
                rnd.users -= 1
                if rnd.users == 0 and not rnd.running:
                    del self._rounds[key]
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value  # type: ignore[return-value]


class CoalescingEngine(EngineApi):
    """An EngineApi whose inspect() calls share scans (Coalescer); scan(), select() and functions() pass through.

    Calls share a scan only when they ask the same question: the same roots,
    devices, leases and own claims.
    """

    def __init__(self, engine: EngineApi) -> None:
        self.engine = engine
        self.shared: Coalescer[report_pb2.Report] = Coalescer()

    def scan(self, roots: Roots, *, own_claims: Collection[str]) -> Inventory:
        return self.engine.scan(roots, own_claims=own_claims)

    def inspect(
        self, roots: Roots, devices: Sequence[str], *, leased: Mapping[PciAddress, str], own_claims: Collection[str]
    ) -> report_pb2.Report:
        key = (roots, tuple(devices), frozenset(leased.items()), frozenset(own_claims))
        # One Report object for every caller of a run: read-only (GetReportResponse(report=...) copies it).
        return self.shared.run(key, lambda: self.engine.inspect(roots, devices, leased=leased, own_claims=own_claims))

    def select(self, inventory: Inventory, names: Sequence[str]) -> list[PciFunction]:
        return self.engine.select(inventory, names)

    def functions(self, roots: Roots) -> report_pb2.Report:
        return self.engine.functions(roots)  # the PCI scan alone: cheap enough not to share
