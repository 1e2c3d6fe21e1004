"""Loggers that import `logging` only when a record could come out of them.

`unplugd inspect` and `check` log nothing unless something goes wrong or -v asks, and importing
logging (with traceback, textwrap, tokenize, string, threading, weakref) was ~6 ms of their start
(session 6, -X importtime). Until logging is imported nothing can have enabled DEBUG or INFO (the
root logger starts at WARNING), so those calls return at once; warning() and above import it, run
the setup main() deferred (`defer`), and log as a logging.Logger would, naming their caller.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging

__all__ = ["Logger", "defer"]

_deferred: list[Callable[[], None]] = []


def defer(setup: Callable[[], None]) -> None:
    """Run `setup` (handlers, level) when a record is first logged through a Logger, not now."""
    _deferred[:] = [setup]


def _logging_ready() -> None:
    while _deferred:
        _deferred.pop()()


class Logger:
    """The part of logging.Logger the agent's scan uses, by name, created without importing logging."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def _real(self) -> logging.Logger:
        import logging

        _logging_ready()
        return logging.getLogger(self.name)

    # stacklevel=2: the record names our caller's file and line, as its own logger's would.
    def debug(self, msg: str, *args: object, **kwargs: Any) -> None:
        if "logging" in sys.modules:
            self._real().debug(msg, *args, stacklevel=2, **kwargs)

    def info(self, msg: str, *args: object, **kwargs: Any) -> None:
        if "logging" in sys.modules:
            self._real().info(msg, *args, stacklevel=2, **kwargs)

    def warning(self, msg: str, *args: object, **kwargs: Any) -> None:
        self._real().warning(msg, *args, stacklevel=2, **kwargs)

    def error(self, msg: str, *args: object, **kwargs: Any) -> None:
        self._real().error(msg, *args, stacklevel=2, **kwargs)

    def exception(self, msg: str, *args: object, **kwargs: Any) -> None:
        self._real().exception(msg, *args, stacklevel=2, **kwargs)
