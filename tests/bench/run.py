"""`make bench`: figures for issues 2, 3 and 4, measured in one run on this machine.

    tests/bench/run.py [--quick] [--only SECTION]... [--json FILE|-]

Sections: 1 inspect, 2 tree, 3 procs, 4 service, 5 host, 6 bounds, 7 fleet, 8 hotadd (number or name).
Each section stops by itself, cleans up what it started (loop devices,
processes, namespaces, QEMU) even when interrupted, and prints
"skipped: <why>" for what this machine lacks (root, QEMU, libvirt, a
tool to compare with). Nothing here is a timed test.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Import as the package tests.bench, not as loose modules of this directory.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(REPO)
elif str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import runfront  # noqa: E402

runfront.prepare()  # before grpc is first imported

from tests.bench.results import SectionResult, render, to_json  # noqa: E402
from unplugd.stdio import EXIT_INTERRUPTED  # noqa: E402

SECTIONS: list[tuple[str, str]] = [
    ("inspect", "tests.bench.sec_inspect_tools"),
    ("tree", "tests.bench.sec_large_tree"),
    ("procs", "tests.bench.sec_live_procs"),
    ("service", "tests.bench.sec_agent_service"),
    ("host", "tests.bench.sec_host"),
    ("bounds", "tests.bench.sec_bounds"),
    ("fleet", "tests.bench.sec_fleet"),
    ("hotadd", "tests.bench.sec_hot_add"),
]


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


def _as_installed() -> None:
    """Commands start as an installed package's do: from byte-compiled modules.

    A .deb or a wheel is byte-compiled when installed; an environment with
    PYTHONDONTWRITEBYTECODE=1 (set in some sandboxes) makes every measured run of
    the venv's commands compile our ~25 modules from source (~60 ms of CPU of an
    `unplugctl --help` here), which no user pays. The bytecode goes to the bench's
    cache directory, not into the tree; each figure's warm-up run writes it.
    """
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    cache = Path(os.environ.get("UNPLUGD_CACHE") or Path.home() / ".cache" / "unplugd") / "bench" / "pycache"
    os.environ.setdefault("PYTHONPYCACHEPREFIX", str(cache))


def main(argv: list[str] | None = None) -> int:
    _as_installed()
    keys = [k for k, _ in SECTIONS]
    parser = runfront.runner_parser(
        "tests/bench/run.py",
        __doc__,
        keys,
        "section",
        "  make bench\n  .venv/bin/python tests/bench/run.py --quick --only 2 --json -",
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs and shorter waits (whole run under 3 min)")
    args = parser.parse_args(argv)
    chosen = runfront.selected(parser, args.only, keys, "section")
    sections = [s for s in SECTIONS if s[0] in chosen]
    table_out = runfront.tables_to(args.json)
    runfront.unwind_on_signals()
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
        runfront.write_json(args.json, doc)
    return EXIT_INTERRUPTED if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
