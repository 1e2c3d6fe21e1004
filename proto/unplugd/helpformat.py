"""argparse help formatters that find the terminal's width without importing shutil.

argparse makes a help formatter for every add_argument, even when no help is
printed, and each asks shutil for the terminal's width: importing shutil
(with bz2, lzma and zlib) was ~3 ms of every `unplugctl` and `unplugd`
command's start (issue 13). `columns()` takes the same steps as
shutil.get_terminal_size().columns.
"""

from __future__ import annotations

import argparse
import os
import sys

TYPE_CHECKING = False  # not typing's: `unplugctl --help` imports no typing (tests/unit/test_startup_imports.py)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["HelpFormatter", "RawDescriptionHelpFormatter", "columns"]


def columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else the terminal of sys.__stdout__, else 80."""
    try:
        found = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        found = 0
    out = sys.__stdout__
    if found <= 0 and out is not None:
        try:
            found = os.get_terminal_size(out.fileno()).columns
        except (ValueError, OSError):
            found = 0
    return found or 80  # shutil's fallback


class _Width:
    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None, **kw: Any
    ) -> None:
        # argparse's own default is the terminal's width less 2; **kw: what later Pythons add (3.14: color)
        super().__init__(prog, indent_increment, max_help_position, columns() - 2 if width is None else width, **kw)  # type: ignore[call-arg]


class HelpFormatter(_Width, argparse.HelpFormatter):
    """argparse.HelpFormatter, its width found without shutil."""


class RawDescriptionHelpFormatter(_Width, argparse.RawDescriptionHelpFormatter):
    """argparse.RawDescriptionHelpFormatter, its width found without shutil."""
