"""A report for named devices judges only their slots, and gives the verdicts the full report gives.

engine.inspect_data(roots, devices) evaluates the named functions, the rest of their slots (a
slot's state is its functions' worst) and, for a bridge, reads the usage of what is behind it.
Every function of every scenario tree and of a generated tree with nested bridges, named alone,
must get the verdict (and the slot) the full report gives it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bench.gen_tree import TreeSpec, generated_tree
from tests.fixtures import build_scenarios
from unplugd.agent import cli, engine
from unplugd.agent.model import Inventory
from unplugd.agent.readiness.policy import evaluate
from unplugd.agent.reportdata import keep_functions

SCENARIOS = build_scenarios.SCENARIOS
# Small enough to scan in a blink, with the generator's bridges (one nested) and multifunction slots.
SMALL = TreeSpec(
    functions=48, mounts=40, processes=20, fds_per_process=4, root_multifunction_slots=2, root_single_slots=6, bridges=3
)


def _without_time(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "generated_at"}


def _each_alone_matches_the_whole(inv: Inventory) -> int:
    full = {v.address: v for v in evaluate(inv)}
    for f in inv.functions:
        alone = evaluate(inv, only={f.address})
        slot = [g.address for g in inv.functions if g.address.slot_key == f.address.slot_key]
        assert [v.address for v in alone] == slot
        for v in alone:
            assert v == full[v.address], f"{v.address} judged for {f.address} alone"
    return len(full)


@pytest.mark.parametrize("name", sorted(build_scenarios.ALL))
def test_each_function_alone_gets_the_full_reports_verdict(name: str) -> None:
    with cli.open_roots(str(SCENARIOS / f"{name}.tree")) as roots:
        inv = engine.scan(roots)
        assert _each_alone_matches_the_whole(inv) == len(inv.functions)
        full = engine.inspect_data(roots)
        for f in inv.functions:
            named = engine.inspect_data(roots, [str(f.address)])
            assert _without_time(named) == _without_time(keep_functions(full, {str(f.address)}))


@pytest.fixture(scope="module")
def small_tree() -> Iterator[Path]:
    with generated_tree(SMALL) as (tree, _):
        yield tree.root


def test_behind_nested_bridges_each_function_alone_gets_the_full_verdict(small_tree: Path) -> None:
    with cli.open_roots(str(small_tree)) as roots:
        inv = engine.scan(roots)
    bridges = [f for f in inv.functions if f.is_bridge]
    assert len(bridges) >= 2 and any(len(b.path.hops) > 1 for b in bridges), "the spec must nest a bridge"
    busy_behind = [v for v in evaluate(inv) if any(r.code.value == "BRIDGE_WITH_CHILDREN" for r in v.reasons)]
    assert busy_behind, "a bridge's verdict must read what is behind it"
    _each_alone_matches_the_whole(inv)
