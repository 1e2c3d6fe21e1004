"""What the service needs from the readiness engine, as a Protocol.

The servicer, leases and the watcher take an EngineApi, so tests hand them a
fake and `serve` hands them ModuleEngine, which calls agent.engine and
agent.selection. Names from requests are only ever matched against an
inspected inventory there, never turned into paths.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

from unplugd.agent import engine, selection
from unplugd.agent.model import Inventory, PciFunction
from unplugd.agent.roots import Roots
from unplugd.pci import PciAddress
from unplugd.v1 import report_pb2

__all__ = ["EngineApi", "ModuleEngine"]


class EngineApi(Protocol):
    def scan(self, roots: Roots, *, own_claims: Collection[str] = ()) -> Inventory: ...

    def inspect(
        self,
        roots: Roots,
        devices: Sequence[str] = (),
        *,
        leased: Mapping[PciAddress, str] = {},
        own_claims: Collection[str] = (),
    ) -> report_pb2.Report: ...

    def select(self, inventory: Inventory, names: Sequence[str]) -> list[PciFunction]: ...


class ModuleEngine:
    """The real engine: agent/engine.py and agent/selection.py.

    exclusive_probe: [readiness] exclusive_probe of the agent's config.
    """

    def __init__(self, *, exclusive_probe: bool = True) -> None:
        self._probe = exclusive_probe

    def scan(self, roots: Roots, *, own_claims: Collection[str] = ()) -> Inventory:
        return engine.scan(roots, own_claims=own_claims, exclusive_probe=self._probe)

    def inspect(
        self,
        roots: Roots,
        devices: Sequence[str] = (),
        *,
        leased: Mapping[PciAddress, str] = {},
        own_claims: Collection[str] = (),
    ) -> report_pb2.Report:
        return engine.inspect(roots, devices, leased=leased, own_claims=own_claims, exclusive_probe=self._probe)

    def select(self, inventory: Inventory, names: Sequence[str]) -> list[PciFunction]:
        return selection.select(inventory, names)
