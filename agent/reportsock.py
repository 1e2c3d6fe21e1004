"""The report socket: `unplugd inspect` answered by the running agent, the client's half.

`unplugd serve` listens on a second root-only unix socket beside its gRPC one,
`report.sock` in the same directory (/run/unplugd/report.sock by default). The
protocol is the least there is: a client connects, the agent reads nothing,
scans afresh, writes the report as `unplugd inspect --json` prints it (compact:
reportdata.to_json of engine.inspect_data) and closes. daemon/reportserver.py is
the agent's half.

Why: a fresh `unplugd inspect` process spends most of its time importing the
agent (~50-60 ms of ~100 on this VM, issue 13) before a scan of ~7 ms; the agent
has it all imported. So this module, imported by the entry point before anything
else, imports nothing but builtins (`_socket` and `_json`, the C halves of socket
and json: `import socket` and `import json` would cost ~11 ms each here, enum
and re with them).

Every failure is a value (`Failed`), never an exception: the caller then scans
here as before. `Failed.loud` tells whether the user should hear of it: an
agent that is not there (no socket, refused, not root) is ordinary; one that
answered late or wrongly is sick.
"""

from __future__ import annotations

import _socket
import os
import time

import unplugd

# Not typing's: importing typing is ~2.5 ms of this path; mypy reads any TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = [
    "DEFAULT_REPORT_SOCKET",
    "REPORT_SOCKET_NAME",
    "SOCKET_ENV",
    "TIMEOUT_S",
    "Answer",
    "Failed",
    "ask",
    "check_answer",
    "report_socket_path",
]

REPORT_SOCKET_NAME = "report.sock"  # beside [server] socket (config.ServerConfig.report_socket)
# ServerConfig's default socket directory: the CLI reads no config file (tomllib and the config
# module cost more than the answer); tests/unit/test_reportsock.py holds the two together.
DEFAULT_REPORT_SOCKET = "/run/unplugd/" + REPORT_SOCKET_NAME
# Where to ask instead, for an agent whose [server] socket is elsewhere (and for tests).
SOCKET_ENV = "UNPLUGD_REPORT_SOCKET"
# The agent scans after the connection: ~10 ms idle here, 2-6 s with 10,000 mount namespaces and
# processes (README "Known limits"), more under load. Past this the agent is stuck, not busy.
TIMEOUT_S = 30.0
# A report naming 2,000 processes x 20 fds is ~1 MB; a 256-function tree's ~0.3 MB. An agent
# writing more is broken: stop reading rather than grow without bound.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
_CHUNK = 256 * 1024


class Answer:
    """The agent's report: its bytes as sent (compact JSON) and the parsed document."""

    __slots__ = ("doc", "raw")

    def __init__(self, raw: bytes, doc: dict[str, Any]) -> None:
        self.raw = raw
        self.doc = doc


class Failed:
    """Why the agent could not be asked; loud: it is there but sick (late, a wrong answer), worth a line."""

    __slots__ = ("loud", "why")

    def __init__(self, why: str, *, loud: bool) -> None:
        self.why = why
        self.loud = loud

    def __repr__(self) -> str:
        return f"Failed({self.why!r}, loud={self.loud})"


def report_socket_path() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_REPORT_SOCKET


def ask(path: str | None = None, timeout_s: float | None = None) -> Answer | Failed:
    """Connect, read to EOF within timeout_s (TIMEOUT_S), check. Never raises for the agent's failures."""
    path = path or report_socket_path()
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except OSError as exc:
        return Failed(f"no unix socket: {exc}", loud=False)
    try:
        sock.settimeout(timeout_s)
        try:
            # ENOENT (no agent), ECONNREFUSED (a stale socket), EACCES (not root: the directory is
            # 0700), EAGAIN (its backlog full): the agent cannot be asked, which is no news.
            sock.connect(path)
        except OSError as exc:
            return Failed(f"cannot connect to {path}: {exc.strerror or exc}", loud=False)
        chunks: list[bytes] = []
        size = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return Failed(f"the agent at {path} did not answer within {timeout_s:g} s", loud=True)
            sock.settimeout(left)
            try:
                chunk = sock.recv(_CHUNK)
            except TimeoutError:
                return Failed(f"the agent at {path} did not answer within {timeout_s:g} s", loud=True)
            except OSError as exc:
                return Failed(f"reading the agent's answer from {path}: {exc.strerror or exc}", loud=True)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                return Failed(f"the agent at {path} sent more than {MAX_ANSWER_BYTES} bytes", loud=True)
    finally:
        sock.close()
    return check_answer(b"".join(chunks), path)


def check_answer(raw: bytes, path: str = DEFAULT_REPORT_SOCKET) -> Answer | Failed:
    """The answer if it is one whole JSON document, a report of this system by an agent of our version."""
    if not raw:
        return Failed(f"the agent at {path} closed without an answer", loud=True)
    try:
        text = raw.decode("utf-8")
        doc, end = _scanner()(text, 0)
        whole = end == len(text) and type(doc) is dict
    except (ValueError, StopIteration, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        whole = False
    except SystemError:
        # _json reports a malformed document (cut short, a raw control character) by raising
        # json.decoder.JSONDecodeError, which it looks up in sys.modules without importing it; where
        # json.decoder is not imported (this path, on purpose) the scanner fails with SystemError.
        whole = False
    if not whole:
        return Failed(f"the agent at {path} answered with something that is not a whole report", loud=True)
    version = doc.get("agentVersion")
    if version != unplugd.__version__:
        return Failed(
            f"the agent at {path} is version {version!r}, this unplugd {unplugd.__version__!r}"
            " (restart the agent after an upgrade)",
            loud=True,
        )
    if doc.get("fromCapture") is not False:
        return Failed(f"the agent at {path} serves a captured tree, not this system", loud=True)
    return Answer(raw, doc)


_SCAN: list[Callable[[str, int], tuple[Any, int]]] = []


def _scanner() -> Callable[[str, int], tuple[Any, int]]:
    """json's own C scanner (what json.loads runs), built without json.decoder, which imports re.

    strict JSON: NaN and Infinity are refused (the agent never writes them), as are control
    characters inside strings. Where `_json` is missing (not CPython) json.decoder's scanner.
    """
    if not _SCAN:

        class Context:
            strict = True
            object_hook = None
            object_pairs_hook = None
            parse_float = float
            parse_int = int
            memo: dict[str, str] = {}

            @staticmethod
            def parse_constant(name: str) -> Any:
                raise ValueError(f"{name} is not JSON")

        try:
            import _json

            _SCAN.append(_json.make_scanner(Context()))  # type: ignore[arg-type]  # typeshed: a JSONDecoder-like
        except ImportError:
            from json import scanner

            _SCAN.append(scanner.make_scanner(Context()))  # type: ignore[arg-type]
    return _SCAN[0]
