"""A watch stream never goes silent: a failing engine turns it UNKNOWN at once, a dead watcher ends it."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.unit.rpc_fakes import DISK_FN, NIC_FN, FakeEngine
from unplugd.agent.config import Config
from unplugd.agent.daemon.events import EventSources
from unplugd.agent.errors import WatchStopped
from unplugd.agent.roots import Roots
from unplugd.agent.rpc.server import AgentServer
from unplugd.agent.rpc.watch import ReportHub, Update, unknown_report
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import agent_service_pb2_grpc, report_pb2

READY = report_pb2.FUNCTION_STATE_READY
BUSY = report_pb2.FUNCTION_STATE_BUSY
UNKNOWN = report_pb2.FUNCTION_STATE_UNKNOWN


class Engine:
    """A report producer that fails while `failing` is set."""

    def __init__(self) -> None:
        self.failing: Exception | None = None
        self.state = READY

    def __call__(self) -> report_pb2.Report:
        if self.failing is not None:
            raise self.failing
        r = report_pb2.Report()
        r.functions.add(address="0000:00:06.0", state=self.state)
        r.slots.add(address="0000:00:06", functions=["0000:00:06.0"], state=self.state)
        return r


class DyingSources(EventSources):
    """Only the wake pipe; wait() raises once `dead` is set, as a failing poll(2) would."""

    def __init__(self, dead: threading.Event) -> None:
        super().__init__(Roots.live_system(), udev=False, netlink=False, mounts=False)
        self.dead = dead

    def wait(self, timeout: float) -> bool:
        if self.dead.is_set():
            raise OSError(9, "poll on a closed source")
        return super().wait(timeout)


def _update(item: object) -> report_pb2.Report:
    assert isinstance(item, Update), item
    return item.report


def test_unknown_report_marks_everything_unknown_and_keeps_the_original() -> None:
    good = Engine()()
    out = unknown_report(good, "RuntimeError: boom")
    assert [f.state for f in out.functions] == [UNKNOWN] and [s.state for s in out.slots] == [UNKNOWN]
    (reason,) = out.functions[0].reasons
    assert reason.code == report_pb2.REASON_CODE_UNREADABLE and "boom" in reason.detail and reason.blocking
    assert [p.detail for p in out.problems] == ["RuntimeError: boom"]
    assert good.functions[0].state == READY


def test_failing_engine_turns_streams_unknown_at_once_and_recovers() -> None:
    engine = Engine()
    hub = ReportHub(engine, sources=EventSources.none, debounce=0, rescan_seconds=60)
    sub = hub.subscribe()
    try:
        assert _update(sub.next(timeout=5)).functions[0].state == READY
        engine.failing = RuntimeError("engine down")
        hub.poke()
        failed = _update(sub.next(timeout=2))  # no waiting for a rescan tick
        assert failed.functions[0].state == UNKNOWN and "engine down" in failed.functions[0].reasons[0].detail
        late = hub.subscribe()  # a late joiner sees the truth too: UNKNOWN, not the stale READY
        assert _update(late.next(timeout=2)).functions[0].state == UNKNOWN
        engine.failing = None  # back, with the very report it had before the failure
        hub.poke()
        # The late joiner's own look may have failed once more first: READY must follow.
        states = [_update(sub.next(timeout=2)).functions[0].state]
        while states[-1] == UNKNOWN and len(states) < 3:
            states.append(_update(sub.next(timeout=2)).functions[0].state)
        assert states[-1] == READY
        late.close()
    finally:
        hub.close()


def test_failing_first_scan_ends_streams_with_the_error() -> None:
    engine = Engine()
    engine.failing = RuntimeError("no report yet")
    hub = ReportHub(engine, sources=EventSources.none, rescan_seconds=60)
    try:
        assert isinstance(hub.subscribe().next(timeout=5), RuntimeError)
    finally:
        hub.close()


def test_dead_watcher_ends_every_stream_and_the_next_subscriber_starts_anew() -> None:
    dead = threading.Event()
    engine = Engine()
    hub = ReportHub(engine, sources=lambda: DyingSources(dead), debounce=0, rescan_seconds=60)
    subs = [hub.subscribe() for _ in range(3)]
    try:
        for sub in subs:
            assert _update(sub.next(timeout=5)).functions[0].state == READY
        dead.set()
        hub.poke()
        for sub in subs:
            assert isinstance(sub.next(timeout=2), WatchStopped)
        assert not hub.running
        dead.clear()
        again = hub.subscribe()
        assert hub.running and _update(again.next(timeout=5)).functions[0].state == READY
    finally:
        hub.close()


def test_watch_report_over_grpc_unknown_then_unavailable(tmp_path: Path) -> None:
    dead = threading.Event()
    engine = FakeEngine()
    cfg = Config().with_overrides(socket=tmp_path / "run" / "agent.sock")
    server = AgentServer(
        cfg,
        roots=Roots.under(tmp_path / "tree"),
        engine=engine,
        sources=lambda: DyingSources(dead),
        bridges=lambda c, p: _NoBridges(),
    )
    server.start()
    channel = grpc.insecure_channel(server.target)
    try:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        stream = iter(stub.WatchReport(pb.WatchReportRequest(), timeout=30))
        first = next(stream)
        assert {f.address: f.state for f in first.report.functions} == {str(DISK_FN): READY, str(NIC_FN): BUSY}
        real_inspect = engine.inspect
        engine.inspect = _raise  # type: ignore[method-assign]
        server.hub.poke()
        failed = next(stream)
        assert sorted(failed.changed) == [str(DISK_FN), str(NIC_FN)]
        assert {f.state for f in failed.report.functions} == {UNKNOWN}
        engine.inspect = real_inspect  # type: ignore[method-assign]
        dead.set()
        server.hub.poke()
        with pytest.raises(grpc.RpcError) as err:
            next(stream)
        call: Any = err.value
        assert call.code() == grpc.StatusCode.UNAVAILABLE
        assert "watch again" in call.details()
    finally:
        channel.close()
        server.stop(grace=0.2)


def _raise(*args: object, **kwargs: object) -> report_pb2.Report:
    raise RuntimeError("collector exploded")


class _NoBridges:
    listeners = ()

    def stop(self) -> None:
        pass


def test_slow_scans_stretch_the_rescan_tick() -> None:
    """Timer-driven scans keep to 1/(1 + RESCAN_PER_SCAN) of the time however slow a scan gets."""
    from unplugd.agent.rpc.watch import RESCAN_PER_SCAN, ChangeWatcher

    scan_s = 0.1
    times: list[float] = []

    def slow() -> int:
        time.sleep(scan_s)
        times.append(time.monotonic())
        return len(times)

    w: ChangeWatcher[int] = ChangeWatcher(
        slow, lambda v: None, sources=EventSources.none, debounce=0, rescan_seconds=0.05
    )
    w.start()
    try:
        time.sleep(2.0)
    finally:
        w.stop()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps and min(gaps) >= scan_s * (1 + RESCAN_PER_SCAN) * 0.9  # not every 0.05 s + a scan
