"""What both command lines do when their reader goes away (`unplugd inspect | head -1`).

Python ignores SIGPIPE, so a write to a pipe nobody reads any more raises
BrokenPipeError, and a traceback (or "Exception ignored ... BrokenPipeError"
from the flush at exit) would land on the terminal. The commands end quietly
instead, with the status a shell shows for a C tool killed by SIGPIPE (141),
so `set -o pipefail` scripts can still tell the output was cut short.
"""

from __future__ import annotations

import os
import signal
import sys

from unplugd.text import display_text

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_INTERRUPTED",
    "broken_pipe",
    "flush_stdout",
    "log_to_stderr",
    "stdout_or_devnull",
]

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
# What a shell reports for a command killed by SIGINT; both CLIs return it on Ctrl-C.
EXIT_INTERRUPTED = 128 + signal.SIGINT


def stdout_or_devnull() -> None:
    """Started with stdout closed (`unplugd check vdb >&-`: only the exit status wanted), Python's
    sys.stdout is None and the first write raised AttributeError, a traceback and exit 1 in place
    of check's 0/3/4. Write into /dev/null instead; it also takes fd 1, so no file the command
    opens later lands there."""
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)


def flush_stdout() -> None:
    """Flush now, inside the command's error handling, not at interpreter exit where it cannot be caught."""
    sys.stdout.flush()


def broken_pipe() -> int:
    """Silence stdout for the rest of the process and return the exit status to use."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout fd (tests capturing output): nothing left to flush
        pass
    return EXIT_BROKEN_PIPE


def log_to_stderr(fmt: str, level: str) -> None:
    """Both CLIs' log records on stderr, their messages escaped as every line they print: a
    message may carry guest text (a path, an interface, a reason `--force` overrides, why a guest
    closed its session). A traceback, appended after the message, keeps its lines."""
    import logging  # here: `--help` and a usage error do without it

    class EscapingFormatter(logging.Formatter):
        def formatMessage(self, record: logging.LogRecord) -> str:
            return display_text(super().formatMessage(record))

    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
