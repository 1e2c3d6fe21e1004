"""The command-line front that `make bench` (tests/bench/run.py) and `make reliability`
(tests/reliability/run.py) share: the same options, parsed the same way, output in the same places.

    --only PART     repeatable, commas allowed; a name or its 1-based number in the list
    --json FILE|-   also write the figures as JSON; with '-' the JSON goes to stdout, tables to stderr

Both run for minutes and start processes, loop devices, namespaces and mounts: SIGTERM and SIGHUP
unwind like Ctrl-C, through every `with`, so what was started goes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

__all__ = ["prepare", "runner_parser", "selected", "tables_to", "unwind_on_signals", "write_json"]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Unwind through every `with`/finally so loop devices, netns, mounts and children go.
    raise KeyboardInterrupt(f"signal {signum}")


def prepare() -> None:
    """Before anything imports grpc: the runners fork helpers (preexec_fn) while their own gRPC channels
    are open. gRPC's fork handlers are for children that go on using gRPC; ours exec at once, and the
    handlers only log noise and can break the child."""
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def unwind_on_signals() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)


def runner_parser(
    prog: str, doc: str | None, parts: Sequence[str], what: str, examples: str
) -> argparse.ArgumentParser:
    """The parser with the shared options; `what` names one of `parts` (section, check)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0] if doc else None,
        epilog=f"examples:\n{examples}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    numbered = ", ".join(f"{i} {name}" for i, name in enumerate(parts, 1))
    parser.add_argument(
        "--only", action="append", default=[], metavar=what.upper(), help=f"run only this {what}: {numbered}"
    )
    parser.add_argument(
        "--json", metavar="FILE", help="also write the figures as JSON to FILE ('-': stdout, tables to stderr)"
    )
    return parser


def selected(parser: argparse.ArgumentParser, only: Sequence[str], parts: Sequence[str], what: str) -> list[str]:
    """The parts --only names, in the list's order; all of them without --only. A usage error for others."""
    if not only:
        return list(parts)
    wanted: set[str] = set()
    for item in (i.strip() for i in ",".join(only).split(",")):
        if item.isdigit() and 1 <= int(item) <= len(parts):
            wanted.add(parts[int(item) - 1])
        elif item in parts:
            wanted.add(item)
        elif item:
            numbered = ", ".join(f"{i} {name}" for i, name in enumerate(parts, 1))
            parser.error(f"unknown {what} {item!r} ({what}s: {numbered})")
    return [p for p in parts if p in wanted]


def tables_to(json_dest: str | None) -> TextIO:
    """Where the tables go: stderr when the JSON takes stdout."""
    return sys.stderr if json_dest == "-" else sys.stdout


def write_json(dest: str, doc: Any) -> None:
    text = json.dumps(doc, indent=2, default=str)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")
