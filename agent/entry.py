"""`unplugd`'s entry point: `unplugd inspect` answered by the running agent before anything is imported.

The console script (and Debian's /usr/bin/unplugd) runs main() here. A command
line that is `inspect` with output options only (--json, --all, -v) asks the
agent's report socket (reportsock.py) and prints its answer; anything else, or
an agent that cannot answer, goes to cli.main, which scans here as before. So
this module imports nothing beyond reportsock until it knows which way it goes:
argparse alone costs more than the agent's whole answer (issue 13).
"""

from __future__ import annotations

import os
import sys

from unplugd.agent import reportsock

TYPE_CHECKING = False  # not typing's: see reportsock.py
if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["answered_by_agent", "main", "print_answer", "say_failed"]

# `inspect` options that change only how the report is shown, never what it is: with only these
# the agent's report is the report asked for. Spelled out in full: an abbreviation (--js) goes
# through argparse, which asks the agent as well (cli._run_inspect).
_JSON = "--json"
_ALL = "--all"
_VERBOSE = ("-v", "--verbose")
_SHOWING_ONLY = frozenset((_JSON, _ALL, *_VERBOSE))


def main(argv: Sequence[str] | None = None) -> int:
    if sys.stdout is None:  # stdout closed: imported only then (the fast path imports no more than it needs)
        from unplugd.stdio import stdout_or_devnull

        stdout_or_devnull()
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["inspect"] and _SHOWING_ONLY.issuperset(args[1:]):
        rest = set(args[1:])
        try:
            code = answered_by_agent(
                as_json=_JSON in rest, show_all=_ALL in rest, verbose=not rest.isdisjoint(_VERBOSE)
            )
        except KeyboardInterrupt:
            from unplugd.stdio import EXIT_INTERRUPTED

            return EXIT_INTERRUPTED
        if code is not None:
            return code
        from unplugd.agent import cli

        return cli.main(args, ask_agent=False)
    from unplugd.agent import cli

    return cli.main(args)


def answered_by_agent(*, as_json: bool, show_all: bool, verbose: bool) -> int | None:
    """Print the running agent's report as `inspect` prints its own and return the exit code; None
    when the agent could not answer (said on stderr if it is there but sick): the caller scans."""
    answer = reportsock.ask()
    if isinstance(answer, reportsock.Answer):
        return print_answer(answer, as_json=as_json, show_all=show_all, verbose=verbose)
    say_failed(answer)
    return None


def say_failed(failed: reportsock.Failed) -> None:
    """One line on stderr when the agent is there but sick; nothing when it is just not there."""
    if failed.loud:
        sys.stderr.write(f"unplugd: {failed.why}; inspecting here instead (--local skips the agent)\n")


def print_answer(answer: reportsock.Answer, *, as_json: bool, show_all: bool, verbose: bool) -> int:
    """Print the agent's report as `inspect` prints its own: the bytes themselves for --json (indented on
    a terminal only, as cli._json_text), else the table of render.py. Returns the exit code."""
    try:
        if as_json and not sys.stdout.isatty():
            out = sys.stdout.buffer
            out.write(answer.raw + b"\n")
            out.flush()
            return 0
        if as_json:
            import json

            sys.stdout.write(json.dumps(answer.doc, indent=2) + "\n")
        else:
            from unplugd.agent.render import table_lines
            from unplugd.agent.reportdata import from_json
            from unplugd.text import wants_colour

            lines = table_lines(
                from_json(answer.doc), show_all=show_all, verbose=verbose, colour=wants_colour(sys.stdout, os.environ)
            )
            sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()
    except BrokenPipeError:  # `unplugd inspect --json | head -c 10`: end quietly, as cli.main does
        from unplugd.stdio import broken_pipe

        return broken_pipe()
    return 0


if __name__ == "__main__":
    sys.exit(main())
