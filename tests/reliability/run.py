"""`make reliability`: resource bounds and failure behaviour of the agent, as one table.

    tests/reliability/run.py [--duration SECONDS] [--only CHECK]... [--json FILE]

Needs root: the checks start `unplugd serve` on this machine, create
thousands of processes and mount namespaces, and mount inside them. Every
check cleans up what it started, also when it fails or is interrupted.
Figures, not timed tests: a verdict is about correctness (errors, bounds).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[2]
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(REPO)
elif str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Same reason as tests/bench/run.py: helpers are forked while channels are open.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from tests.reliability.registry import CHECKS, Options, render, run_checks  # noqa: E402


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwind every `with`: children, mounts, agents go


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of each sustained load (60)")
    parser.add_argument("--namespaces", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=10_000)
    parser.add_argument("--only", action="append", default=[], help=f"one of {', '.join(k for k, _ in CHECKS)}")
    parser.add_argument("--json", help="also write the rows as JSON to FILE (- for stdout)")
    args = parser.parse_args(argv)
    keys = set(args.only) or {k for k, _ in CHECKS}
    unknown = keys - {k for k, _ in CHECKS}
    if unknown:
        parser.error(f"unknown check {sorted(unknown)[0]!r}")
    signal.signal(signal.SIGTERM, _interrupt)
    options = replace(Options(), duration_s=args.duration, namespaces=args.namespaces, processes=args.processes)
    rows = run_checks(keys, options)
    print(render(rows), flush=True)
    if args.json:
        data = json.dumps([asdict(r) for r in rows], indent=2, default=str)
        if args.json == "-":
            print(data)
        else:
            Path(args.json).write_text(data + "\n")
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
