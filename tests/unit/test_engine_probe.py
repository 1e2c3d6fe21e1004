"""The O_EXCL probe claims a disk for an instant; it must skip disks whose users are already visible."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from pathlib import Path

import pytest

from tests.fixtures import build_scenarios
from unplugd.agent import engine, treetext
from unplugd.agent.model import BlockDevice, Collected
from unplugd.agent.roots import Roots


def test_probe_only_disks_without_visible_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    treetext.unpack((build_scenarios.SCENARIOS / "multifunction8.tree").read_text(), tmp_path)
    probed: list[str] = []

    def fake_probe(
        roots: Roots, devices: Iterable[BlockDevice], skip: Collection[str] = ()
    ) -> Collected[frozenset[str]]:
        probed.extend(d.name for d in devices)
        return Collected(frozenset(), [])

    monkeypatch.setattr(engine, "probe_exclusive", fake_probe)
    inv = engine.scan(Roots.under(tmp_path))
    mounted = {b.parent or b.name for b in inv.block_devices.values() if b.devno in {m.devno for m in inv.mounts}}
    swapped = {b.parent or b.name for b in inv.block_devices.values() if b.devno in {s.devno for s in inv.swaps}}
    function_disks = {d for f in inv.functions for d in f.block_devices}
    assert mounted and swapped, "the scenario must have a mounted and a swapped disk"
    assert probed, "idle disks must still be probed"
    assert not set(probed) & (mounted | swapped)
    assert set(probed) == function_disks - mounted - swapped


def test_probe_can_be_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """[readiness] exclusive_probe = false and `inspect --no-probe` open no disk at all."""
    from unplugd.agent import cli
    from unplugd.agent.config import ConfigError, parse_config
    from unplugd.agent.daemon.scans import ModuleEngine

    treetext.unpack((build_scenarios.SCENARIOS / "multifunction8.tree").read_text(), tmp_path)
    probed: list[list[str]] = []

    def fake_probe(
        roots: Roots, devices: Iterable[BlockDevice], skip: Collection[str] = ()
    ) -> Collected[frozenset[str]]:
        probed.append([d.name for d in devices])
        return Collected(frozenset(), [])

    monkeypatch.setattr(engine, "probe_exclusive", fake_probe)
    ModuleEngine(exclusive_probe=False).scan(Roots.under(tmp_path), own_claims=())
    assert cli.main(["inspect", "--json", "--no-probe", "--root", str(tmp_path)]) == cli.EXIT_OK
    capsys.readouterr()
    assert probed and all(names == [] for names in probed)
    ModuleEngine().scan(Roots.under(tmp_path), own_claims=())
    assert probed[-1], "the default still probes idle disks"

    assert not parse_config({"readiness": {"exclusive_probe": False}}).readiness.exclusive_probe
    with pytest.raises(ConfigError, match=r"readiness\.exclusive_probe"):
        parse_config({"readiness": {"exclusive_probe": "no"}})
