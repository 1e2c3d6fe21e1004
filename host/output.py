"""The CLIs' own lines: escaped text and the progress line on stderr (unplugctl's commands and plug).

Only the standard library and unplugd.text, so `cli.py` can import it at start-up (`--help`).
"""

from __future__ import annotations

import sys

from unplugd.text import display_text

TYPE_CHECKING = False  # not typing's: importing typing would cost every `--help` (see cli.py)
if TYPE_CHECKING:
    from typing import Protocol, TextIO

    class ProgressEvent(Protocol):
        """What a progress line shows: the orchestrator's Progress and plugging's PlugProgress."""

        @property
        def event(self) -> str: ...
        @property
        def detail(self) -> str: ...
        @property
        def elapsed(self) -> float: ...


__all__ = ["print_line", "progress_line"]


def print_line(text: str, out: TextIO) -> None:
    """One line whose pieces came from the guest (names, reasons, problems) or the hypervisor:
    escaped, so none of them can add a line, move the cursor or colour the terminal."""
    print(display_text(text), file=out)


def progress_line(p: ProgressEvent) -> None:
    """`[  1.23s] event: detail` on stderr, escaped, at once (stdout keeps the outcome)."""
    print(display_text(f"[{p.elapsed:6.2f}s] {p.event}: {p.detail}"), file=sys.stderr, flush=True)
