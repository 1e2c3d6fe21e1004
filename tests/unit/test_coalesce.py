"""Concurrent GetReports share scans: a crowd costs about two, and nobody gets a report started before it asked."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc

from tests.unit.rpc_fakes import FakeEngine, running_server
from unplugd.agent.config import Config, ServerConfig
from unplugd.agent.daemon.scans import Coalescer, CoalescingEngine
from unplugd.agent.roots import Roots
from unplugd.v1 import agent_service_pb2 as pb

CALLERS = 50
SCAN_S = 0.05  # long enough that every caller arrives while the first scan runs


class CountingScan:
    """A scan that takes SCAN_S and says when it started."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        started = time.monotonic()
        with self.lock:
            self.count += 1
        time.sleep(SCAN_S)
        return started


def _crowd(n: int, call: object) -> list[tuple[float, object]]:
    """n threads released together; (arrival time, what the call returned or raised) each."""
    gate = threading.Barrier(n)
    out: list[tuple[float, object]] = []
    lock = threading.Lock()

    def one() -> None:
        gate.wait()
        arrived = time.monotonic()
        try:
            got: object = call()  # type: ignore[operator]
        except Exception as exc:
            got = exc
        with lock:
            out.append((arrived, got))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(out) == n
    return out


def test_fifty_concurrent_callers_share_about_two_scans_all_started_after_they_asked() -> None:
    scan = CountingScan()
    shared: Coalescer[float] = Coalescer()
    results = _crowd(CALLERS, lambda: shared.run("report", scan))
    assert scan.count <= 3, scan.count  # the one under way when most arrived, the next; one spare for stragglers
    for arrived, started in results:
        assert isinstance(started, float) and started >= arrived  # never a scan begun before the call
    assert shared._rounds == {}  # nothing kept once everyone left


def test_callers_one_after_another_each_get_a_new_scan() -> None:
    scan = CountingScan()
    shared: Coalescer[float] = Coalescer()
    first = shared.run("k", scan)
    second = shared.run("k", scan)
    assert scan.count == 2 and second > first


def test_different_keys_do_not_share_and_errors_are_shared() -> None:
    shared: Coalescer[int] = Coalescer()
    assert shared.run("a", lambda: 1) == 1 and shared.run("b", lambda: 2) == 2
    calls = {"n": 0}

    def broken() -> int:
        calls["n"] += 1
        time.sleep(SCAN_S)
        raise RuntimeError("engine down")

    results = _crowd(20, lambda: shared.run("c", broken))
    assert all(isinstance(got, RuntimeError) for _, got in results)
    assert calls["n"] <= 3
    assert shared.run("c", lambda: 3) == 3  # a failure is not remembered


class SlowEngine(FakeEngine):
    def inspect(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        time.sleep(SCAN_S)
        return super().inspect(*args, **kwargs)  # type: ignore[arg-type]


def test_coalescing_engine_keys_on_the_question() -> None:
    engine = SlowEngine()
    wrapped = CoalescingEngine(engine)
    roots = Roots.under(Path("/nonexistent"))
    results = _crowd(10, lambda: wrapped.inspect(roots, (), leased={}, own_claims=()))
    assert engine.count("inspect") <= 3 and all(r.functions for _, r in results)  # type: ignore[attr-defined]
    before = engine.count("inspect")
    wrapped.inspect(roots, ["eth1"], leased={}, own_claims=())  # another question: its own scan
    assert engine.count("inspect") == before + 1


def test_two_hundred_concurrent_get_reports_all_answered(tmp_path: Path) -> None:
    """More callers than workers: they queue and share scans instead of being refused."""
    engine = SlowEngine()
    cfg = Config(server=ServerConfig(max_workers=16, max_watchers=8, max_queued_calls=512))
    with running_server(tmp_path, engine, config=cfg) as (_, stub):
        results = _crowd(200, lambda: stub.GetReport(pb.GetReportRequest(), timeout=60))
    errors = [got for _, got in results if isinstance(got, grpc.RpcError)]
    assert errors == []
    assert engine.count("inspect") < 200 // 4  # shared: each scan answers every caller waiting on it


def test_past_the_queue_calls_are_refused_not_stacked(tmp_path: Path) -> None:
    engine = SlowEngine()
    cfg = Config(server=ServerConfig(max_workers=2, max_watchers=1, max_queued_calls=0))
    with running_server(tmp_path, engine, config=cfg) as (_, stub):
        results = _crowd(20, lambda: stub.GetReport(pb.GetReportRequest(), timeout=60))
    codes = {got.code() for _, got in results if isinstance(got, grpc.RpcError)}
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
