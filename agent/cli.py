"""`unplugd`: the guest agent's command line (inspect, check, capture; serve).

Each subcommand is a pair: an `_add_NAME(subparsers)` that declares its
arguments and sets `run=` to a function taking the parsed arguments and
returning an exit code, listed in SUBCOMMANDS. Adding one (serve) is a new
pair and one line in that list.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from unplugd.agent import entry, lazylog
from unplugd.agent.errors import AgentError, InvalidArgument, UnknownDevice
from unplugd.agent.exitcodes import Exit, help_paragraph
from unplugd.agent.roots import CAPTURE_MARKS, Roots, is_capture
from unplugd.agent.serve import add_serve_parser
from unplugd.helpformat import RawDescriptionHelpFormatter
from unplugd.stdio import broken_pipe, flush_stdout, log_to_stderr, stdout_or_devnull
from unplugd.text import display_text, wants_colour

# Building the parser imports no protobuf: `--help`, the manual page and the
# completion (packaging/docs/generate.py) need only this module and the stdlib.
if TYPE_CHECKING:
    from unplugd.agent.reportdata import Data

__all__ = [
    "EXIT_BUSY",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_UNKNOWN",
    "EXIT_USAGE",
    "SUBCOMMANDS",
    "build_parser",
    "main",
    "open_roots",
]

EXIT_OK = Exit.OK
EXIT_FAILURE = Exit.FAILURE
EXIT_USAGE = Exit.USAGE
EXIT_BUSY = Exit.BUSY
EXIT_UNKNOWN = Exit.UNKNOWN


_DESCRIPTION = """\
Is it safe to hot-unplug a PCI device from this VM right now, and if not, why?

unplugd looks at every PCI function of this guest: the disks, partitions,
device-mapper/LVM/md/loop stacks and mounts (in every mount namespace) below
it, swap, processes holding its device nodes open, and the state of its
network interfaces. Each function is READY (nothing uses it), BUSY (with the
reasons) or UNKNOWN (something could not be read: never treated as ready).
"""

_EPILOG = """\
examples:
  unplugd inspect                      every slot and function, as a table
  unplugd inspect --json               the same as JSON (protobuf's mapping)
  unplugd inspect --device vdb         only the function below vdb
  unplugd check eth1 && echo free      exit 0 ready, 3 busy, 4 unknown
  unplugd capture /tmp/tree --text /tmp/tree.txt
  unplugd inspect --root /tmp/tree.txt what the captured machine looked like

"""
_EPILOG += help_paragraph() + "\n"


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root",
        metavar="DIR|FILE",
        help="inspect a captured tree instead of this system: a directory written by "
        "`unplugd capture` (DIR/sys, DIR/proc, DIR/dev, DIR/netlink.json) or its text archive",
    )
    p.add_argument(
        "--no-probe",
        action="store_true",
        help="do not ask the kernel with an O_EXCL open of idle disks (EXCLUSIVE_CLAIM is then not seen)",
    )


def _add_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inspect",
        help="show every PCI function's readiness",
        description="Show every PCI function, grouped by slot, with its state and its first reason (-v: every reason).",
        epilog="""\
examples:
  unplugd inspect                    a line per function and its first reason
  unplugd inspect -v                 every reason
  unplugd inspect --device 0000:00:06.0 --device eth1
  unplugd inspect --json | jq '.functions[] | {address, state}'
  unplugd inspect --root tests/fixtures/scenarios/bond.tree

--device takes a guest PCI address (0000:00:06.1 or 00:06.1), a PCI path
(0000:00/03.0/05.0), an interface (eth1, bond0) or a block device (vdb,
vdb1, dm-0, /dev/mapper/vg-lv): the function(s) below it are shown.
""",
        formatter_class=RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the Report as JSON")
    p.add_argument("--device", action="append", default=[], metavar="NAME", help="only these functions (repeatable)")
    p.add_argument("--all", action="store_true", help="also bridges, root ports and host/ISA bridge functions")
    p.add_argument(
        "-v",
        "--verbose",
        dest="every_reason",
        action="store_true",
        help="every reason of every function (without: the first, and the codes of the others)",
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="scan from this process even when the agent (unplugd serve) runs: when the agent is suspect, "
        "or to see what this process itself can read (without it, inspect asks the agent's report socket "
        "first and scans here only if no agent answers)",
    )
    _add_root(p)
    p.set_defaults(run=_run_inspect, lazy_logging=True)


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check",
        help="exit 0 if a device may be unplugged now, 3 if busy, 4 if unknown",
        description="Say whether DEVICE's PCI function(s) may be unplugged now, and why not.",
        epilog=help_paragraph()
        + """

examples:
  unplugd check vdb || echo "vdb is in use"
  unplugd check 0000:00:07.0 --json
""",
        formatter_class=RawDescriptionHelpFormatter,
    )
    p.add_argument("device", metavar="DEVICE", help="PCI address, PCI path, interface or block device name")
    p.add_argument("--json", action="store_true", help="print the Report as JSON")
    _add_root(p)
    p.set_defaults(run=_run_check, lazy_logging=True)


def _add_capture(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "capture",
        help="copy what inspect reads from this system into a directory",
        description="Write the parts of /sys, /proc and /dev that inspect reads, plus netlink.json, "
        "into DIR, so `unplugd inspect --root DIR` reproduces this system's report.",
        epilog="""\
examples:
  unplugd capture /tmp/guest
  unplugd capture /tmp/guest --text guest.tree   also pack it as a text archive
""",
        formatter_class=RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "dir", metavar="DIR", help="a directory that does not exist yet or is empty, that only root (or you) can change"
    )
    p.add_argument("--text", metavar="FILE", help="also write the tree as a reviewable text archive")
    p.set_defaults(run=_run_capture)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_inspect,
    _add_check,
    _add_capture,
    add_serve_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unplugd",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the collectors do (to stderr)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


# --------------------------------------------------------------------------- roots


@contextlib.contextmanager
def open_roots(root: str | None) -> Iterator[Roots]:
    """The live system, a captured directory, or a text archive unpacked for the duration."""
    if root is None:
        yield Roots.live_system()
        return
    path = Path(root)
    if path.is_dir():
        _require_capture(path, root)
        yield Roots.under(path)
        return
    if not path.is_file():
        what = "not a directory or a regular file" if path.exists() else "no such directory or file"
        raise InvalidArgument(f"--root {root}: {what}")
    import tempfile  # only text archives need it: every other run skips its import

    from unplugd.agent import treetext

    with tempfile.TemporaryDirectory(prefix="unplugd-root-") as tmp:
        try:
            treetext.unpack(treetext.read_archive(path), tmp)
        except treetext.TreeTextError as exc:  # "treetext line 3: ..." alone does not say which file
            raise AgentError(f"--root {root}: {exc}") from exc
        _require_capture(Path(tmp), root)
        yield Roots.under(tmp)


def _require_capture(base: Path, root: str) -> None:
    if not is_capture(base):
        raise InvalidArgument(
            f"--root {root}: not a captured tree (no {' or '.join(CAPTURE_MARKS)} directory in it); "
            "write one with `unplugd capture DIR`"
        )


# --------------------------------------------------------------------------- commands


def _inspect(root: str | None, devices: Sequence[str], *, probe: bool = True) -> Data:
    from unplugd.agent import engine

    with open_roots(root) as roots:
        return engine.inspect_data(roots, devices, exclusive_probe=probe)


def _json_text(data: Data) -> str:
    """Indented on a terminal only, as unplugctl does: json's indenting encoder is pure Python
    (~100 ms of CPU for a report naming 2,000 processes), the compact one is C."""
    from unplugd.agent.reportdata import to_json

    return to_json(data, indent=2 if sys.stdout.isatty() else None)


def _agent_may_answer(args: argparse.Namespace) -> bool:
    """The agent's report is the one asked for: the live system, every function, the probe on; not
    --local, and no -v before the command (it logs what this process's collectors do)."""
    return args.ask_agent and not (args.local or args.root or args.device or args.no_probe or args.verbose)


def _run_inspect(args: argparse.Namespace) -> int:
    if _agent_may_answer(args):
        code = entry.answered_by_agent(as_json=args.json, show_all=args.all, verbose=args.every_reason)
        if code is not None:
            return code
    # --json prints the report's data as protobuf's JSON mapping would, without importing protobuf.
    data = _inspect(args.root, args.device, probe=not args.no_probe)
    if args.json:
        sys.stdout.write(_json_text(data) + "\n")
    else:
        from unplugd.agent.render import table_lines

        lines = table_lines(
            data,
            show_all=args.all or bool(args.device),
            verbose=args.every_reason or args.verbose,
            colour=wants_colour(sys.stdout, os.environ),
        )
        sys.stdout.write("".join(line + "\n" for line in lines))
    return EXIT_OK


def _run_check(args: argparse.Namespace) -> int:
    from unplugd.agent.render import function_objects, reason_text
    from unplugd.agent.reportdata import STATE_PREFIX

    data = _inspect(args.root, [args.device], probe=not args.no_probe)
    states = [f["state"].removeprefix(STATE_PREFIX) for f in data["functions"]]
    if "BUSY" in states:
        code = EXIT_BUSY
    elif any(s != "READY" for s in states) or not states:
        code = EXIT_UNKNOWN
    else:
        code = EXIT_OK
    if args.json:
        sys.stdout.write(_json_text(data) + "\n")
        return code
    for f, state in zip(data["functions"], states, strict=True):
        sys.stdout.write(f"{f['address']} ({display_text(function_objects(f))}): {state}\n")
        for r in f["reasons"]:
            sys.stdout.write(f"  {reason_text(r)}\n")
    return code


def _run_capture(args: argparse.Namespace) -> int:
    from unplugd.agent import treetext
    from unplugd.agent.capture import capture

    dest = Path(args.dir)
    stats = capture(dest)
    sys.stderr.write(f"captured {stats.files} files, {stats.links} links into {dest}\n")
    if args.text:
        Path(args.text).write_text(treetext.pack(dest), encoding="utf-8", errors="surrogateescape")
        sys.stderr.write(f"packed into {args.text}\n")
    return EXIT_OK


def _log_to_stderr(verbose: bool) -> None:
    """Log records to stderr, their messages escaped like the table: they name guest objects (paths,
    slots, interfaces)."""
    log_to_stderr("unplugd: %(levelname)s %(name)s: %(message)s", "DEBUG" if verbose else "WARNING")


def main(argv: Sequence[str] | None = None, *, ask_agent: bool = True) -> int:
    """ask_agent=False: entry.main asked the agent already (and it could not answer)."""
    stdout_or_devnull()  # `python -m unplugd.agent.cli` does not pass through entry.main
    parser = build_parser()
    args = parser.parse_args(argv)
    args.ask_agent = ask_agent
    # inspect and check import logging only to log something (lazylog): a warning, or -v.
    if getattr(args, "lazy_logging", False) and not args.verbose:
        lazylog.defer(lambda: _log_to_stderr(verbose=False))
    else:
        _log_to_stderr(args.verbose)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        code = run(args)
        flush_stdout()
        return code
    except BrokenPipeError:  # `unplugd inspect | head -1`: the reader left; end quietly
        return broken_pipe()
    except (UnknownDevice, InvalidArgument) as exc:
        parser.exit(EXIT_USAGE, f"unplugd: error: {display_text(str(exc))}\n")
    except AgentError as exc:
        sys.stderr.write(f"unplugd: {display_text(str(exc))}\n")
        return EXIT_FAILURE
    except OSError as exc:
        sys.stderr.write(f"unplugd: {display_text(str(exc))}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return Exit.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
