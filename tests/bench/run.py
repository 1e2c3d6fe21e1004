"""`make bench`: figures for issues 2, 3 and 4, measured in one run on this machine.

    tests/bench/run.py [--quick] [--only SECTION]... [--json FILE|-]

Sections: 1 inspect, 2 tree, 3 procs, 4 service, 5 host, 6 bounds, 7 hotadd (number or name).
Each section stops by itself, cleans up what it started (loop devices,
processes, namespaces, QEMU) even when interrupted, and prints
"skipped: <why>" for what does not exist yet. Nothing here is a timed test.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[2]
# Import as the package tests.bench, not as loose modules of this directory.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(REPO)
elif str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.bench.results import SectionResult, render, to_json  # noqa: E402

# The bench forks helpers (preexec_fn) while its own gRPC channels are open.
# gRPC's fork handlers are for children that go on using gRPC; ours exec at
# once, and the handlers only log noise and can break the child. Off, before
# grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

SECTIONS: list[tuple[str, str]] = [
    ("inspect", "tests.bench.sec_inspect_tools"),
    ("tree", "tests.bench.sec_large_tree"),
    ("procs", "tests.bench.sec_live_procs"),
    ("service", "tests.bench.sec_agent_service"),
    ("host", "tests.bench.sec_host"),
    ("bounds", "tests.bench.sec_bounds"),
    ("hotadd", "tests.bench.sec_hot_add"),
]


def _selected(only: list[str]) -> list[tuple[str, str]]:
    if not only:
        return SECTIONS
    wanted: set[str] = set()
    for item in ",".join(only).split(","):
        item = item.strip()
        if item.isdigit() and 1 <= int(item) <= len(SECTIONS):
            wanted.add(SECTIONS[int(item) - 1][0])
        elif item in {k for k, _ in SECTIONS}:
            wanted.add(item)
        elif item:
            names = ", ".join(f"{i} {k}" for i, (k, _) in enumerate(SECTIONS, 1))
            raise SystemExit(f"run.py: unknown section {item!r} (sections: {names})")
    return [s for s in SECTIONS if s[0] in wanted]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Unwind through every `with`/finally so loop devices, netns and children go.
    raise KeyboardInterrupt(f"signal {signum}")


def _run_section(key: str, module_name: str, quick: bool) -> SectionResult:
    t0 = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        mod = importlib.import_module(module_name)
        result: SectionResult = mod.run(quick)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        result = SectionResult(key, module_name, skipped=f"section failed: {type(exc).__name__}: {exc}")
    result.seconds = result.seconds or time.monotonic() - t0
    # The machine is shared (2 cores): say how busy it was, figures move with it.
    result.notes.append(f"load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tests/bench/run.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="examples:\n  make bench\n  .venv/bin/python tests/bench/run.py --quick --only 2 --json -",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs and shorter waits (whole run under 3 min)")
    parser.add_argument(
        "--only", action="append", default=[], metavar="SECTION", help="1-5 or inspect, tree, procs, service, host"
    )
    parser.add_argument(
        "--json", metavar="FILE", help="also write every figure as JSON ('-': stdout, tables to stderr)"
    )
    args = parser.parse_args(argv)
    sections = _selected(args.only)
    table_out = sys.stderr if args.json == "-" else sys.stdout

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    results: list[SectionResult] = []
    started = time.monotonic()
    interrupted = False
    try:
        for key, module_name in sections:
            print(f"-- running {key} ...", file=sys.stderr, flush=True)
            result = _run_section(key, module_name, args.quick)
            results.append(result)
            print(render(result) + "\n", file=table_out, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("bench: interrupted; cleaned up what had started", file=sys.stderr)
    total = time.monotonic() - started
    print(f"bench: {len(results)} section(s) in {total:.0f} s", file=table_out)
    if args.json:
        doc = {
            "quick": args.quick,
            "interrupted": interrupted,
            "seconds": total,
            "sections": [to_json(r) for r in results],
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 130 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
