"""One shared scanner for every WatchReport subscriber.

ChangeWatcher is the engine of it and knows nothing of reports: a thread
sleeps in poll(2) on the event sources (daemon/events.py), lets a burst settle for
`debounce` seconds, takes one snapshot and calls `on_change` only when the
snapshot's fingerprint differs from the last one. Without events it wakes
every `rescan_seconds` (or RESCAN_PER_SCAN times the last scan's duration,
if longer), for what has no event: open file descriptors, and mount
namespaces past [watch] max_namespace_fds.
Tests drive it with a snapshot of the real Inventory on loop devices and
veth pairs; ReportHub drives it with the engine's Report.

ReportHub starts the watcher with the first subscriber and stops it with the
last, so an agent nobody watches holds no event sources and never wakes.
Each subscriber keeps only the newest report (they are whole states: a slow
reader skips intermediate ones) and works out what changed for it from what
it last sent, so device filters and late joiners need no bookkeeping here.

A stream never goes silent while the truth is unknown: a scan that fails
before any report ends every stream with the error; one that fails later
publishes the last report with every function UNKNOWN (unknown_report), and
the next good scan is published whatever it holds. A watcher that dies (its
event sources fail) ends every stream with WatchStopped (UNAVAILABLE), and
the next subscriber starts a fresh one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from unplugd.agent.daemon.events import EventSources
from unplugd.agent.errors import WatchStopped
from unplugd.v1 import report_pb2

__all__ = [
    "Change",
    "ChangeWatcher",
    "ReportHub",
    "Subscription",
    "Update",
    "changed_between",
    "filter_report",
    "function_keys",
    "unknown_report",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

FunctionKeys = Mapping[str, Hashable]


def function_keys(report: report_pb2.Report) -> dict[str, Hashable]:
    """Per function (by BDF): its state and reasons, the things a watcher reports, and its driver and
    objects: a hot-added NIC's driver binds and its interface appears after the function itself
    (still READY), and `unplugctl plug` waits for exactly that."""
    return {
        f.address: (
            f.state,
            tuple(r.SerializeToString(deterministic=True) for r in f.reasons),
            f.driver,
            tuple(b.name for b in f.block_devices),
            tuple(n.name for n in f.net_interfaces),
        )
        for f in report.functions
    }


def changed_between(old: FunctionKeys | None, new: FunctionKeys) -> list[str]:
    if old is None:
        return sorted(new)
    return sorted(a for a in set(old) | set(new) if old.get(a) != new.get(a))


def filter_report(report: report_pb2.Report, addresses: set[str] | None) -> report_pb2.Report:
    """The report restricted to `addresses` (None: everything)."""
    if addresses is None:
        return report
    out = report_pb2.Report()
    out.CopyFrom(report)
    del out.functions[:]
    out.functions.extend(f for f in report.functions if f.address in addresses)
    del out.slots[:]
    out.slots.extend(s for s in report.slots if any(a in addresses for a in s.functions))
    return out


def unknown_report(last: report_pb2.Report, detail: str) -> report_pb2.Report:
    """`last` with every function and slot UNKNOWN: what a watcher says when a scan fails.

    The old reasons are dropped (they are no longer known to hold); one
    UNREADABLE reason says why. `detail` should not vary between identical
    failures, so a failure that repeats is not sent again.
    """
    out = report_pb2.Report()
    out.CopyFrom(last)
    reason = report_pb2.Reason(
        code=report_pb2.REASON_CODE_UNREADABLE,
        blocking=True,
        object="report",
        detail=f"the report could not be built: {detail}",
    )
    for f in out.functions:
        f.state = report_pb2.FUNCTION_STATE_UNKNOWN
        del f.reasons[:]
        f.reasons.append(reason)
    for slot in out.slots:
        slot.state = report_pb2.FUNCTION_STATE_UNKNOWN
    out.problems.add(object="report", detail=detail)
    return out


class ChangeWatcher(Generic[T]):
    def __init__(
        self,
        snapshot: Callable[[], T],
        on_change: Callable[[T], None],
        *,
        sources: Callable[[], EventSources] = EventSources.live,
        fingerprint: Callable[[T], object] = lambda value: value,
        debounce: float = 0.1,
        rescan_seconds: float = 5.0,
        on_error: Callable[[Exception], None] = lambda exc: None,
        on_died: Callable[[Exception], None] = lambda exc: None,
    ) -> None:
        """on_error: a snapshot failed (the watcher goes on); on_died: the watcher itself stopped."""
        self._snapshot = snapshot
        self._on_change = on_change
        self._make_sources = sources
        self._fingerprint = fingerprint
        self._debounce = debounce
        self._rescan = rescan_seconds
        self._on_error = on_error
        self._on_died = on_died
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sources: EventSources | None = None
        self._ready = threading.Event()
        self.scans = 0  # for tests and figures: how often a snapshot was taken
        self.last_scan_s = 0.0

    def start(self) -> None:
        """Open the sources (so nothing after start() is missed) and start the thread."""
        self._sources = self._make_sources()
        self._thread = threading.Thread(target=self._run, name="unplugd-watch", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the first snapshot was taken (or failed)."""
        return self._ready.wait(timeout)

    def poke(self) -> None:
        """Something changed that has no kernel event (a lease): scan soon."""
        if self._sources is not None:
            self._sources.wake()

    def stop(self) -> None:
        self._stop.set()
        if self._sources is not None:
            self._sources.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._sources is not None:
            self._sources.close()

    def _run(self) -> None:
        assert self._sources is not None
        sources = self._sources
        last: object = _NOTHING
        try:
            while not self._stop.is_set():
                value = self._take()
                if value is _NOTHING:
                    last = _NOTHING  # subscribers were told UNKNOWN: the next good scan goes out whatever it holds
                else:
                    fp = self._fingerprint(value)  # type: ignore[arg-type]
                    if last is _NOTHING or fp != last:
                        last = fp
                        self._on_change(value)  # type: ignore[arg-type]
                self._ready.set()
                # The slow tick waits at least RESCAN_PER_SCAN scans' time: a system
                # crowded with namespaces and processes makes a scan slow, and the
                # timer alone must not keep a core busy.
                deadline = time.monotonic() + max(self._rescan, self.last_scan_s * RESCAN_PER_SCAN)
                while not self._stop.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        # The slow tick: open fds, and namespaces the proc connector could not tell of.
                        sources.refresh_namespaces()
                        break
                    if sources.wait(remaining):
                        self._settle(sources)
                        break
        except Exception as exc:
            log.exception("watcher stopped by an unexpected error")
            self._ready.set()
            self._on_died(exc)
        finally:
            self._ready.set()

    def _settle(self, sources: EventSources) -> None:
        """Let a burst of events pass (udev storms, a mount's several events), then scan."""
        end = time.monotonic() + self._debounce
        while (left := end - time.monotonic()) > 0 and not self._stop.is_set():
            sources.wait(left)

    def _take(self) -> object:
        self.scans += 1
        t0 = time.monotonic()
        try:
            return self._snapshot()
        except Exception as exc:
            log.warning("watch scan failed", extra={"error": str(exc)}, exc_info=True)
            self._on_error(exc)
            return _NOTHING
        finally:
            self.last_scan_s = time.monotonic() - t0


_NOTHING = object()
# Timer-driven rescans take at most 1/(1 + RESCAN_PER_SCAN) of a core: with
# scans of 7 s (10,000 namespaces and 10,000 processes on a 2-core guest) the
# tick waits 28 s instead of 5. Events still scan at once.
RESCAN_PER_SCAN = 4.0


@dataclass(frozen=True)
class Update:
    report: report_pb2.Report


@dataclass(frozen=True)
class Change:
    """One WatchReport message: the (filtered) report, the addresses that changed, whether it is the first."""

    report: report_pb2.Report
    changed: list[str]
    initial: bool


class Subscription:
    """Newest-wins mailbox between the hub and one stream."""

    def __init__(self, hub: ReportHub) -> None:
        self._hub = hub
        self._cond = threading.Condition()
        self._pending: Update | Exception | None = None
        self._closed = False

    def offer(self, item: Update | Exception) -> None:
        with self._cond:
            self._pending = item
            self._cond.notify_all()

    def next(self, timeout: float | None = None) -> Update | Exception | None:
        """The newest update; None once closed. Raises TimeoutError after `timeout`."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._pending is not None or self._closed, timeout):
                raise TimeoutError
            if self._closed:
                return None
            item, self._pending = self._pending, None
            return item

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._hub._unsubscribe(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def changes(self, addresses: set[str] | None, active: Callable[[], bool]) -> Iterator[Change]:
        """What one stream sends: the first report of `addresses` (None: all), then each one in
        which one of them changed, while `active()`. Ends when closed; raises what the hub failed with."""
        sent: dict[str, Hashable] | None = None
        while active():
            update = self.next()
            if update is None:  # closed: the client left, or the server stops
                return
            if isinstance(update, Exception):
                raise update
            report = filter_report(update.report, addresses)
            keys = function_keys(report)
            changed = changed_between(sent, keys)
            if sent is not None and not changed:
                continue
            yield Change(report, changed, initial=sent is None)
            sent = keys


class ReportHub:
    def __init__(
        self,
        produce: Callable[[], report_pb2.Report],
        *,
        sources: Callable[[], EventSources] = EventSources.live,
        debounce: float = 0.1,
        rescan_seconds: float = 5.0,
    ) -> None:
        self._produce = produce
        self._sources = sources
        self._debounce = debounce
        self._rescan = rescan_seconds
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        self._watcher: ChangeWatcher[report_pb2.Report] | None = None
        self._current: report_pb2.Report | None = None  # what subscribers were last offered
        self._good: report_pb2.Report | None = None  # the last report a scan built
        self._closed = False

    @property
    def running(self) -> bool:
        return self._watcher is not None

    @property
    def scans(self) -> int:
        watcher = self._watcher
        return watcher.scans if watcher is not None else 0

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        with self._lock:
            if self._closed:
                sub._closed = True
                return sub
            self._subs.append(sub)
            if self._watcher is None:
                self._current = self._good = None
                watcher = ChangeWatcher(
                    self._produce,
                    self._publish,
                    sources=self._sources,
                    fingerprint=function_keys,
                    debounce=self._debounce,
                    rescan_seconds=self._rescan,
                    on_error=self._failed,
                    on_died=lambda exc: self._died(watcher, exc),
                )
                try:
                    watcher.start()
                except Exception:
                    self._subs.remove(sub)
                    raise
                self._watcher = watcher
                log.info("watch started")
            else:
                if self._current is not None:
                    sub.offer(Update(self._current))
                # It may be a rescan old (or the last scan failed): look again now.
                self._watcher.poke()
        return sub

    def poke(self) -> None:
        with self._lock:
            if self._watcher is not None:
                self._watcher.poke()

    def close(self) -> None:
        """Stop watching and end every stream (server shutdown)."""
        with self._lock:
            self._closed = True
            subs, self._subs = self._subs, []
            watcher, self._watcher = self._watcher, None
        for sub in subs:
            sub.close()
        if watcher is not None:
            watcher.stop()

    def _publish(self, report: report_pb2.Report) -> None:
        with self._lock:
            self._current = self._good = report
            subs = list(self._subs)
        for sub in subs:
            sub.offer(Update(report))

    def _failed(self, exc: Exception) -> None:
        # Streams with a report see every function turn UNKNOWN at once (the
        # next event or rescan tries again); with nothing to show yet, the
        # error ends them, as it would a GetReport.
        with self._lock:
            good = self._good
            subs = list(self._subs)
            item: Update | Exception = exc
            if good is not None:
                item = Update(unknown_report(good, f"{type(exc).__name__}: {exc}"))
                self._current = item.report
        for sub in subs:
            sub.offer(item)

    def _died(self, watcher: ChangeWatcher[report_pb2.Report], exc: Exception) -> None:
        """The watcher thread ended by an error: tell every stream, let the next subscriber start anew."""
        with self._lock:
            if self._watcher is not watcher:
                return
            self._watcher = None
            self._current = self._good = None
            subs, self._subs = self._subs, []
        stopped = WatchStopped(f"the watch stopped ({type(exc).__name__}: {exc}); watch again")
        for sub in subs:
            sub.offer(stopped)
        watcher.stop()

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
            if self._subs or self._watcher is None:
                return
            watcher, self._watcher = self._watcher, None
            self._current = None
        watcher.stop()
        log.info("watch stopped: no subscribers")
