"""GetReport's functions_only: which PCI functions the guest has, from the PCI scan alone, unjudged."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import build_scenarios
from unplugd.agent import engine, treetext
from unplugd.agent.roots import Roots
from unplugd.v1 import report_pb2

TREES = sorted(build_scenarios.SCENARIOS.glob("*.tree"))


def _unpacked(tree: Path, tmp_path: Path) -> Roots:
    treetext.unpack(tree.read_text(encoding="utf-8", errors="surrogateescape"), tmp_path / "tree")
    return Roots.under(tmp_path / "tree")


@pytest.mark.parametrize("tree", TREES, ids=[t.stem for t in TREES])
def test_the_same_functions_and_slots_as_the_full_report_unjudged(tree: Path, tmp_path: Path) -> None:
    roots = _unpacked(tree, tmp_path)
    full = engine.inspect(roots, exclusive_probe=False)
    listed = engine.functions(roots)
    assert [(f.address, f.pci_path, f.slot, f.driver) for f in listed.functions] == [
        (f.address, f.pci_path, f.slot, f.driver) for f in full.functions
    ]
    assert [(s.address, list(s.functions)) for s in listed.slots] == [
        (s.address, list(s.functions)) for s in full.slots
    ]
    states = {f.state for f in listed.functions} | {s.state for s in listed.slots}
    assert states == {report_pb2.FUNCTION_STATE_UNSPECIFIED}
    assert not any(f.reasons or f.block_devices or f.net_interfaces for f in listed.functions)


def test_nothing_but_the_pci_scan_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no(*_: object, **__: object) -> None:
        raise AssertionError("functions_only must not scan for use")

    for collector in ("collect_block", "collect_mounts", "collect_swaps", "collect_net", "scan_processes"):
        monkeypatch.setattr(engine, collector, no)
    listed = engine.functions(_unpacked(TREES[0], tmp_path))
    assert listed.functions and not listed.problems
