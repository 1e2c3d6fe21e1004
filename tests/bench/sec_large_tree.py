"""Section 2 (issue 2): a generated large guest as a tree; target: the full report under 200 ms.

256 PCI functions, 1,000 mounts, 2,000 processes x 20 fds (gen_tree.py).
Measures `unplugd inspect --json --root DIR` end to end and the in-process
engine.inspect(Roots.under(DIR)), plus each collector alone, so a miss shows
where the time goes. The report is checked for what the tree holds (functions,
mounts, holders), so a fast figure from a misread tree is flagged, not shown
as a success.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench import commands
from tests.bench.gen_tree import GeneratedTree, TreeSpec, generated_tree
from tests.bench.measure import Timing, time_call, time_command
from tests.bench.results import Row, SectionResult, Skipped
from unplugd.agent import engine, model
from unplugd.agent.collectors.block import collect_block
from unplugd.agent.collectors.mounts import collect_mounts
from unplugd.agent.collectors.net import collect_net
from unplugd.agent.collectors.pci import collect_pci
from unplugd.agent.collectors.processes import scan_processes
from unplugd.agent.roots import Roots

__all__ = ["TARGET_MS", "run"]

KEY = "tree"
TITLE = "2. generated large guest as a tree: 256 functions, 1,000 mounts, 2,000 procs x 20 fds (issue 2)"
TARGET_MS = 200.0


def _verdict(t: Timing) -> str:
    return "met" if t.median_ms < TARGET_MS else "MISSED"


def _timed_row(what: str, t: Timing, *, target: bool, note: str = "") -> Row:
    return Row(
        what,
        median_ms=t.median_ms,
        min_ms=t.min_ms,
        runs=t.runs,
        rss_mib=t.rss_mib if t.peak_rss_kib else None,
        target=f"< {TARGET_MS:.0f} ms" if target else "",
        verdict=_verdict(t) if target else "",
        note=note,
        raw={"samples_s": t.samples_s, "peak_rss_kib": t.peak_rss_kib},
    )


def _check_report(report: dict[str, Any], tree: GeneratedTree) -> list[str]:
    """What the report shows against what the tree holds; mismatches start with 'CHECK'."""
    functions = report.get("functions", [])
    codes: dict[str, int] = {}
    states: dict[str, int] = {}
    for fn in functions:
        state = str(fn.get("state", "")).rsplit("_", 1)[-1]
        states[state] = states.get(state, 0) + 1
        for reason in fn.get("reasons", []):
            code = str(reason.get("code", "")).removeprefix("REASON_CODE_")
            codes[code] = codes.get(code, 0) + 1
    notes = [
        f"report: {len(functions)} functions ({', '.join(f'{k} {v}' for k, v in sorted(states.items()))}); "
        f"reasons: {', '.join(f'{k} {v}' for k, v in sorted(codes.items())) or 'none'}"
    ]
    if len(functions) != tree.functions:
        notes.append(f"CHECK: the tree has {tree.functions} functions, the report {len(functions)}")
    if "MOUNTED" not in codes:
        notes.append("CHECK: no MOUNTED reason although data partitions are mounted in the tree")
    if tree.holders and "OPEN_BY_PROCESS" not in codes:
        notes.append(f"CHECK: no OPEN_BY_PROCESS although {tree.holders} processes hold a partition")
    return notes


def _inspect_rows(result: SectionResult, tree: GeneratedTree, runs: int) -> None:
    root = str(tree.root)
    roots = Roots.under(tree.root)
    t = time_call(lambda: engine.inspect(roots), runs)
    result.rows.append(_timed_row("engine.inspect(Roots.under(DIR)) in-process", t, target=True))
    try:
        argv = [*commands.unplugd_argv("inspect"), "--json", "--root", root]
        t = time_command(argv, runs)
        result.rows.append(
            _timed_row("unplugd inspect --json --root DIR (venv)", t, target=True, note="incl. interpreter start")
        )
        try:
            result.notes.extend(_check_report(json.loads(t.stdout), tree))
        except ValueError as exc:
            result.notes.append(f"CHECK: inspect --json printed no JSON: {exc}")
    except (Skipped, RuntimeError) as exc:
        result.skip_row("unplugd inspect --json --root DIR (venv)", str(exc))
    try:
        argv = [*commands.unplugd_debian_argv("inspect"), "--json", "--root", root]
        t = time_command(argv, runs, env=commands.debian_env())
        result.rows.append(_timed_row("unplugd inspect --json --root DIR (Debian python3)", t, target=True))
    except (Skipped, RuntimeError) as exc:
        result.skip_row("unplugd inspect --json --root DIR (Debian python3)", str(exc))


def _collector_rows(result: SectionResult, tree: GeneratedTree, runs: int) -> None:
    """Each collector alone on the tree: where the time of a full report goes."""
    roots = Roots.under(tree.root)
    wanted = [model.DeviceNode(path, (major, minor), "block") for path, major, minor in tree.block_nodes]
    steps: list[tuple[str, Callable[[], Any], Callable[[Any], str]]] = [
        ("collect_pci", lambda: collect_pci(roots), lambda r: f"{len(r[0])} functions"),
        ("collect_block", lambda: collect_block(roots), lambda r: f"{len(r[0])} devices"),
        ("collect_mounts", lambda: collect_mounts(roots), lambda r: f"{len(r.value.mounts)} mounts"),
        (
            f"scan_processes ({len(wanted)} nodes wanted)",
            lambda: scan_processes(roots, wanted),
            lambda r: f"{len(r.value.open_refs)} open refs, {len(r.problems)} problems",
        ),
        ("collect_net", lambda: collect_net(roots), lambda r: f"{len(r.value.interfaces)} interfaces"),
    ]
    for what, call, describe in steps:
        try:
            t = time_call(call, runs)
            result.rows.append(_timed_row(f"  {what}", t, target=False, note=describe(call())))
        except Exception as exc:  # a collector failing on the tree is a finding
            result.rows.append(Row(f"  {what}", note=f"FAILED on the tree: {type(exc).__name__}: {exc}"))


def run(quick: bool) -> SectionResult:
    result = SectionResult(KEY, TITLE)
    t0 = time.monotonic()
    runs = 5 if quick else 15
    with generated_tree(TreeSpec()) as (tree, build_s):
        result.notes.append(
            f"tree: {tree.functions} functions ({tree.bridges} bridges, {tree.multifunction_slots} multifunction "
            f"slots), {len(tree.disks)} disks, {len(tree.interfaces)} NICs, {tree.mounts} mounts in "
            f"{tree.spec.namespaces} namespaces, {tree.processes} processes x {tree.spec.fds_per_process} fds "
            f"({tree.holders} hold a data partition); generated in {build_s:.1f} s under {Path(tree.root).parent}"
        )
        _inspect_rows(result, tree, runs)
        _collector_rows(result, tree, runs)
    result.notes.append(f"target: the full report in under {TARGET_MS:.0f} ms (issue 2); collectors: breakdown only")
    result.seconds = time.monotonic() - t0
    return result
