"""`make reliability`: resource bounds and failure behaviour of the agent, as one table.

    tests/reliability/run.py [--duration SECONDS] [--only CHECK]... [--json FILE|-]

Needs root: the checks start `unplugd serve` on this machine, create
thousands of processes and mount namespaces, and mount inside them. Every
check cleans up what it started, also when it fails or is interrupted.
Figures, not timed tests: a verdict is about correctness (errors, bounds).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(REPO)
elif str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import runfront  # noqa: E402

runfront.prepare()  # before grpc is first imported

from tests.reliability.registry import CHECKS, Options, render, run_checks  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    names = [k for k, _ in CHECKS]
    parser = runfront.runner_parser(
        "tests/reliability/run.py",
        __doc__,
        names,
        "check",
        "  make reliability\n  sudo .venv/bin/python tests/reliability/run.py --duration 10 --only 1 --json -",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of each sustained load (60)")
    parser.add_argument("--namespaces", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=10_000)
    args = parser.parse_args(argv)
    keys = set(runfront.selected(parser, args.only, names, "check"))
    runfront.unwind_on_signals()
    options = replace(Options(), duration_s=args.duration, namespaces=args.namespaces, processes=args.processes)
    rows = run_checks(keys, options)
    print(render(rows), file=runfront.tables_to(args.json), flush=True)
    if args.json:
        runfront.write_json(args.json, [asdict(r) for r in rows])
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
