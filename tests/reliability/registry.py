"""The checks `make reliability` runs, and the one table they fill.

A check is a module with `run(options) -> list[Row]`: each row says what was
tried, how often, and what happened, and whether that is what should happen.
Checks are listed in CHECKS by module name and imported only when run, so a
check whose code is missing or broken shows as one FAILED row and the others
still run. To add one (hostile paths, QEMU killed mid-unplug, ...): write
tests/reliability/check_NAME.py with a `run` and add a line to CHECKS.
"""

from __future__ import annotations

import importlib
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CHECKS", "Options", "Row", "render", "run_checks"]

# (key, module): run in this order; `--only KEY` picks some.
CHECKS: list[tuple[str, str]] = [
    ("watch-failures", "tests.reliability.check_watch_failures"),
    ("load", "tests.reliability.check_load"),
    ("namespaces", "tests.reliability.check_namespaces"),
    ("faults", "tests.reliability.check_faults"),
    ("hostile", "tests.reliability.check_hostile"),
]


@dataclass(frozen=True)
class Options:
    duration_s: float = 60.0  # how long each sustained load runs
    namespaces: int = 10_000
    processes: int = 10_000
    clients: int = 200
    watchers: int = 100


@dataclass
class Row:
    tried: str  # "200 GetReport clients x 60 s over unix"
    often: str  # "41,200 calls"
    happened: str  # "0 errors, p50 12 ms, p99 80 ms, fds 40->41, RSS 38->41 MiB"
    ok: bool | None = None  # None: a figure, no verdict
    check: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def run_checks(keys: Iterable[str], options: Options) -> list[Row]:
    rows: list[Row] = []
    for key, module in CHECKS:
        if key not in keys:
            continue
        t0 = time.monotonic()
        try:
            got: list[Row] = importlib.import_module(module).run(options)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            traceback.print_exc()
            got = [Row(key, "-", f"FAILED: {type(exc).__name__}: {exc}", ok=False)]
        for row in got:
            row.check = key
            row.raw.setdefault("check_seconds", round(time.monotonic() - t0, 1))
        rows += got
    return rows


def _verdict(ok: bool | None) -> str:
    return {True: "ok", False: "FAILED", None: ""}[ok]


def render(rows: list[Row]) -> str:
    """One plain-text table (also valid Markdown)."""
    head = ("check", "what was tried", "how often", "what happened", "verdict")
    cells = [head] + [(r.check, r.tried, r.often, r.happened, _verdict(r.ok)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(head))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
