"""A watch stream never freezes silently: the engine fails, the event source dies.

In-process AgentServer on the live system with the real engine and the real
event sources, each wrapped so the check can make it fail on demand:
- the engine raises mid-stream: every subscriber must get an UNKNOWN report
  at once (not after a rescan tick), and the real one again when it recovers;
- the event source's poll raises: every stream must end with UNAVAILABLE,
  and a new subscriber must get a report from a fresh watcher;
- GetReport with the failing engine: a status, and the server answers after.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from tests.reliability.registry import Options, Row
from unplugd.agent.config import Config, ServerConfig
from unplugd.agent.daemon.events import EventSources
from unplugd.agent.daemon.scans import ModuleEngine
from unplugd.agent.model import Inventory, PciFunction
from unplugd.agent.roots import Roots
from unplugd.agent.rpc.server import AgentServer
from unplugd.pci import PciAddress
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import agent_service_pb2_grpc, report_pb2

__all__ = ["run"]

ROUNDS = 5
SUBSCRIBERS = 10
UNKNOWN = report_pb2.FUNCTION_STATE_UNKNOWN
WAIT_S = 10.0  # far above a scan (~0.1 s) and the 5 s rescan tick: a miss is a freeze, not slowness


class FailingEngine(ModuleEngine):
    def __init__(self) -> None:
        super().__init__()
        self.failing = threading.Event()

    def inspect(
        self,
        roots: Roots,
        devices: Sequence[str] = (),
        *,
        leased: Mapping[PciAddress, str] = {},
        own_claims: Collection[str] = (),
    ) -> report_pb2.Report:
        if self.failing.is_set():
            raise RuntimeError("injected engine failure")
        return super().inspect(roots, devices, leased=leased, own_claims=own_claims)

    def scan(self, roots: Roots, *, own_claims: Collection[str] = ()) -> Inventory:
        return super().scan(roots, own_claims=own_claims)

    def select(self, inventory: Inventory, names: Sequence[str]) -> list[PciFunction]:
        return super().select(inventory, names)


class DyingSources(EventSources):
    def __init__(self, dead: threading.Event) -> None:
        super().__init__(Roots.live_system())
        self.dead = dead

    def wait(self, timeout: float) -> bool:
        if self.dead.is_set():
            raise OSError(5, "injected poll failure")
        return super().wait(timeout)


class Stream:
    """One WatchReport read by a thread: (arrival, message or RpcError) in order."""

    def __init__(self, stub: agent_service_pb2_grpc.AgentServiceStub) -> None:
        self.call: Any = stub.WatchReport(pb.WatchReportRequest(), timeout=600)
        self.got: list[tuple[float, Any]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for msg in self.call:
                self._add(msg)
        except grpc.RpcError as exc:
            self._add(exc)

    def _add(self, item: Any) -> None:
        with self.cond:
            self.got.append((time.monotonic(), item))
            self.cond.notify_all()

    def first_after(self, since: float, want: Any) -> float | None:
        """Seconds from `since` to the first item after it that `want` accepts; None after WAIT_S."""
        with self.cond:

            def found() -> float | None:
                for at, item in self.got:
                    if at >= since and want(item):
                        return at - since
                return None

            self.cond.wait_for(lambda: found() is not None, WAIT_S)
            return found()


def _unknown(item: Any) -> bool:
    return (
        isinstance(item, pb.WatchReportResponse)
        and bool(item.report.functions)
        and all(f.state == UNKNOWN for f in item.report.functions)
    )


def _recovered(item: Any) -> bool:
    return isinstance(item, pb.WatchReportResponse) and any(f.state != UNKNOWN for f in item.report.functions)


def _unavailable(item: Any) -> bool:
    return isinstance(item, grpc.RpcError) and item.code() == grpc.StatusCode.UNAVAILABLE


def _ms(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1000:.0f} ms, max {max(xs) * 1000:.0f} ms"


def _server(tmp: Path, engine: FailingEngine, dead: threading.Event) -> Iterator[AgentServer]:
    # More streams than the default 8 watchers: every subscriber must be told.
    cfg = Config(server=ServerConfig(max_workers=SUBSCRIBERS * 2, max_watchers=SUBSCRIBERS + 1)).with_overrides(
        socket=tmp / "agent.sock"
    )
    server = AgentServer(cfg, engine=engine, sources=lambda: DyingSources(dead), bridges=lambda c, p: _NoBridges())
    server.start()
    try:
        yield server
    finally:
        server.stop(grace=0.5)


class _NoBridges:
    listeners = ()

    def stop(self) -> None:
        pass


def run(options: Options) -> list[Row]:
    rows: list[Row] = []
    engine, dead = FailingEngine(), threading.Event()
    with tempfile.TemporaryDirectory(prefix="unplugd-rel-") as tmp:
        for server in _server(Path(tmp), engine, dead):
            channel = grpc.insecure_channel(server.target)
            stub = agent_service_pb2_grpc.AgentServiceStub(channel)
            streams = [Stream(stub) for _ in range(SUBSCRIBERS)]
            for s in streams:
                if s.first_after(0, lambda m: isinstance(m, pb.WatchReportResponse)) is None:
                    raise RuntimeError(f"no initial WatchReport message: {s.got[:1]}")
            to_unknown: list[float] = []
            to_back: list[float] = []
            missed = 0
            for _ in range(ROUNDS):
                t0 = time.monotonic()
                engine.failing.set()
                server.hub.poke()  # what an event would do: the scan fails
                got = [s.first_after(t0, _unknown) for s in streams]
                t1 = time.monotonic()
                engine.failing.clear()
                server.hub.poke()
                back = [s.first_after(t1, _recovered) for s in streams]
                missed += sum(1 for x in got + back if x is None)
                to_unknown += [x for x in got if x is not None]
                to_back += [x for x in back if x is not None]
            rows.append(
                Row(
                    f"watch, engine raises mid-stream ({SUBSCRIBERS} subscribers)",
                    f"{ROUNDS} failures",
                    f"UNKNOWN reached {len(to_unknown)}/{ROUNDS * SUBSCRIBERS} streams ({_ms(to_unknown)}); "
                    f"real report back in {_ms(to_back)}"
                    if to_unknown and to_back
                    else f"{missed} streams silent",
                    ok=missed == 0,
                    raw={"to_unknown_s": to_unknown, "to_back_s": to_back},
                )
            )

            engine.failing.set()
            codes = []
            for _ in range(ROUNDS):
                try:
                    stub.GetReport(pb.GetReportRequest(), timeout=30)
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
            engine.failing.clear()
            after = stub.GetReport(pb.GetReportRequest(), timeout=30)
            rows.append(
                Row(
                    "GetReport, engine raises",
                    f"{ROUNDS} calls",
                    f"status {', '.join(sorted(set(codes)))}; then served again "
                    f"({len(after.report.functions)} functions)",
                    ok="OK" not in codes and bool(after.report.functions),
                )
            )

            t0 = time.monotonic()
            dead.set()
            server.hub.poke()
            ended = [s.first_after(t0, _unavailable) for s in streams]
            dead.clear()
            fresh = Stream(stub)
            t1 = time.monotonic()
            first = fresh.first_after(t1, lambda m: isinstance(m, pb.WatchReportResponse))
            ended_ok = [x for x in ended if x is not None]
            rows.append(
                Row(
                    f"watch, event source dies ({SUBSCRIBERS} subscribers)",
                    "1 death",
                    f"UNAVAILABLE on {len(ended_ok)}/{SUBSCRIBERS} streams"
                    + (f" ({_ms(ended_ok)})" if ended_ok else "")
                    + (
                        f"; a new subscriber got a report in {first * 1000:.0f} ms"
                        if first is not None
                        else "; a new subscriber got NOTHING"
                    ),
                    ok=len(ended_ok) == SUBSCRIBERS and first is not None,
                )
            )
            fresh.call.cancel()
            channel.close()
    return rows
