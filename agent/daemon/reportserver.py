"""The report socket, the agent's half: every connection gets a fresh report as JSON, then EOF.

The protocol (reportsock.py has the client): the agent reads nothing from a
client, so no byte a client sends can reach a parser; it computes a report
for the connection (`produce`: the first scan that starts after the client
connected, shared by clients that arrive meanwhile, as GetReport's are), writes
it and closes. The work runs in the gRPC server's worker pool (`submit`), never
on the accepting thread, and is bounded twice:
- `slots`: at most this many answers at once; the accepting thread waits for a
  free slot before it accepts, so further clients wait in the listen backlog
  (and past it their connect fails at once: they scan for themselves);
- `write_timeout_s`: a client that does not read cannot hold a worker longer.

rpc/server.py owns the socket file (made like the gRPC socket's, removed on
stop); this module is handed the listening socket.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
from collections.abc import Callable

from unplugd.agent.lazylog import Logger

__all__ = ["ReportServer"]

log = Logger(__name__)


class ReportServer:
    """Answers connections on `listener` (bound and listening) until stop()."""

    def __init__(
        self,
        listener: socket.socket,
        produce: Callable[[], bytes],
        submit: Callable[[Callable[[], None]], object],
        *,
        slots: int,
        write_timeout_s: float,
    ) -> None:
        self._listener = listener
        self._produce = produce
        self._submit = submit
        self._slots = threading.Semaphore(slots)  # not Bounded: stop() may release one more
        self._write_timeout_s = write_timeout_s
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, name="unplugd-report", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting; answers under way finish (each bounded by the write timeout)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() with an error (Linux)
        self._slots.release()  # wakes a loop waiting for a slot; it sees _stopping
        self._thread.join(timeout=5)
        self._listener.close()

    def _accept_loop(self) -> None:
        while True:
            self._slots.acquire()
            if self._stopping:
                return
            try:
                conn, _ = self._listener.accept()
            except OSError:
                self._slots.release()
                if self._stopping:
                    return
                log.exception("report socket: accept failed; no longer answering on it")
                return
            try:
                self._submit(functools.partial(self._answer, conn))
            except RuntimeError:  # the pool is shut down: the agent is stopping
                conn.close()
                self._slots.release()
                return

    def _answer(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    body = self._produce()
                except Exception:
                    # The client reads an empty answer, says so and scans for itself.
                    log.exception("report socket: the report failed")
                    return
                conn.settimeout(self._write_timeout_s)  # for the whole sendall (Python >= 3.5)
                try:
                    conn.sendall(body)
                except OSError as exc:  # left early, or did not read within the timeout
                    log.debug("report socket: client not answered", extra={"error": str(exc)})
                    return
                log.debug("report socket: answered", extra={"bytes": len(body)})
        finally:
            self._slots.release()
