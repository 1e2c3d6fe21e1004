"""`unplugd`'s exit codes: one home for main(), `--help` and the manual page unplugd(8).

Stdlib only: packaging/docs/generate.py reads MEANING where grpc and protobuf
may be absent (a package build root).
"""

from __future__ import annotations

from enum import IntEnum

from unplugd.stdio import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED

__all__ = ["MEANING", "Exit", "help_paragraph"]


class Exit(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    BUSY = 3
    UNKNOWN = 4
    INTERRUPTED = EXIT_INTERRUPTED
    # stdout's reader left (`unplugd inspect | head -1`): what a shell reports for a command killed by SIGPIPE.
    BROKEN_PIPE = EXIT_BROKEN_PIPE


MEANING: dict[Exit, str] = {
    Exit.OK: "ok; check: READY, the device may be unplugged now",
    Exit.FAILURE: "failure: the system or a capture could not be read, or serve could not start",
    Exit.USAGE: "usage error: bad arguments, unknown device, invalid configuration file",
    Exit.BUSY: "check: BUSY, something uses the device (the reasons are printed)",
    Exit.UNKNOWN: "check: UNKNOWN, something could not be read (never taken as ready)",
    Exit.INTERRUPTED: "interrupted (SIGINT)",
    Exit.BROKEN_PIPE: "stdout closed early (| head): the output was cut short, nothing else went wrong",
}


def help_paragraph() -> str:
    """The "exit codes" paragraph of `--help` (the manual page has its own EXIT STATUS instead)."""
    lines = [f"  {code.value} {MEANING[code]}" for code in Exit]
    return "\n".join(["exit codes:", *lines])
