"""What a section hands back: rows of figures, printed as a table and dumped as JSON."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

__all__ = ["Row", "SectionResult", "Skipped", "compare", "part", "render", "to_json"]

T = TypeVar("T")


class Skipped(Exception):
    """What a section (or one of its rows) measures does not exist here yet."""


@dataclass
class Row:
    what: str
    median_ms: float | None = None
    min_ms: float | None = None
    runs: int = 0
    rss_mib: float | None = None
    value: str = ""  # a figure that is not a time: "38.2 MiB", "0.00 s CPU"
    target: str = ""
    verdict: str = ""  # "met" | "MISSED" | ""
    versus: str = ""  # "unplugd 3.1x faster"
    note: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class SectionResult:
    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str = ""
    seconds: float = 0.0

    def skip_row(self, what: str, why: str) -> None:
        self.rows.append(Row(what, note=f"skipped: {why}"))


def part(result: SectionResult, what: str, fn: Callable[[], T]) -> T | None:
    """One part of a section; its failure (another engineer's code mid-change, say) skips only its rows."""
    try:
        return fn()
    except Skipped as exc:
        result.skip_row(what, str(exc))
    except Exception as exc:  # grpc.RpcError, subprocess errors, ...: a finding, printed in the row
        result.rows.append(Row(what, note=f"FAILED: {type(exc).__name__}: {exc}"))
    return None


def compare(ours_s: float, theirs_s: float, ours: str = "unplugd") -> str:
    """'unplugd 3.1x faster' / 'unplugd 2.0x slower' from two durations."""
    if ours_s <= 0 or theirs_s <= 0:
        return ""
    if ours_s <= theirs_s:
        return f"{ours} {theirs_s / ours_s:.1f}x faster"
    return f"{ours} {ours_s / theirs_s:.1f}x slower"


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


_COLUMNS: list[tuple[str, str]] = [
    ("what", "what"),
    ("median_ms", "median ms"),
    ("min_ms", "min ms"),
    ("runs", "runs"),
    ("rss_mib", "peak RSS MiB"),
    ("value", "figure"),
    ("target", "target"),
    ("verdict", "verdict"),
    ("versus", "ratio"),
    ("note", "note"),
]


def _cell(row: Row, key: str) -> str:
    v = getattr(row, key)
    if key in ("median_ms", "min_ms"):
        return _fmt_ms(v)
    if key == "rss_mib":
        return "" if v is None else f"{v:.1f}"
    if key == "runs":
        return str(v) if v else ""
    return str(v)


def render(result: SectionResult) -> str:
    """A plain-text table; columns nobody filled are left out."""
    out = [f"== {result.title}"]
    if result.skipped:
        out.append(f"   skipped: {result.skipped}")
    if result.rows:
        cols = [(k, h) for k, h in _COLUMNS if any(_cell(r, k) for r in result.rows)]
        cells = [[_cell(r, k) for k, _ in cols] for r in result.rows]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(cols)]
        numeric = {"median_ms", "min_ms", "runs", "rss_mib"}

        def line(values: list[str]) -> str:
            parts = [
                v.rjust(w) if cols[i][0] in numeric else v.ljust(w)
                for i, (v, w) in enumerate(zip(values, widths, strict=True))
            ]
            return "   " + "  ".join(parts).rstrip()

        out.append(line([h for _, h in cols]))
        out.append("   " + "  ".join("-" * w for w in widths))
        out.extend(line(c) for c in cells)
    out.extend(f"   * {n}" for n in result.notes)
    out.append(f"   ({result.seconds:.1f} s)")
    return "\n".join(out)


def to_json(result: SectionResult) -> dict[str, Any]:
    return asdict(result)
