"""The load run: 200 GetReport clients for `duration` seconds while 100 WatchReport streams stay open.

Against `unplugd serve` (its own process, the live system) twice:
- over its unix socket: each client and each watcher its own connection;
- through the virtio-serial bridge (fake port with the kernel driver's
  semantics, the real VirtioSerialBridge in its own process, the host's
  AgentClient and SerialRelay): one port carries one session, so all 300
  calls share the host's one AgentClient, as unplugctl's would.

Every client calls GetReport again as soon as it has its answer. Figures:
calls, errors (by status), p50/p99 latency, against the latency of one
GetReport alone (about one scan: coalescing promises p99 within ~2 scans
when enough workers wait), the agent's fds, RSS and threads before, at the
peak and after. The agent runs with max_workers = clients + watchers + 20:
each watch stream holds a worker while open (max_watchers = watchers) and
the GetReport callers must not queue behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from tests.bench.agent_proc import RunningAgent, running_agent
from tests.bench.measure import cpu_seconds
from tests.bench.sec_agent_service import _bridge_guest
from tests.reliability.agent_figures import Held, held, span
from tests.reliability.registry import Options, Row
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import agent_service_pb2_grpc as pb_grpc

__all__ = ["run"]

CALL_TIMEOUT_S = 60.0  # a call slower than this is an error in the table, not a hang
SPARE_WORKERS = 20  # for GetAgentInfo, health, the check's own probes


MAX_WORKERS = 256  # the most [server] max_workers allows


def load_config(clients: int, watchers: int) -> str:
    workers = min(MAX_WORKERS, clients + watchers + SPARE_WORKERS)
    return f"[server]\nmax_workers = {workers}\nmax_watchers = {watchers}\nmax_queued_calls = {clients * 2}\n"


@dataclass
class Outcome:
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    watch_initial: int = 0
    watch_messages: int = 0
    watch_errors: Counter[str] = field(default_factory=Counter)


def _error_name(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):
        with contextlib.suppress(Exception):
            return str(code().name)
    return type(exc).__name__


async def _drive(
    call: Callable[[], Awaitable[Any]],
    watch: Callable[[], AsyncIterator[Any]],
    clients: int,
    watchers: int,
    duration_s: float,
) -> Outcome:
    out = Outcome()
    stop_at = time.monotonic() + duration_s

    async def client() -> None:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                await call()
                out.latencies_s.append(time.perf_counter() - t0)
            except Exception as exc:
                out.errors[_error_name(exc)] += 1

    async def watcher() -> None:
        try:
            async for msg in watch():
                out.watch_messages += 1
                if msg.initial:
                    out.watch_initial += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            out.watch_errors[_error_name(exc)] += 1

    watching = [asyncio.create_task(watcher()) for _ in range(watchers)]
    # Let every watcher get its first report before the GetReport crowd starts.
    deadline = time.monotonic() + 30
    while out.watch_initial + sum(out.watch_errors.values()) < watchers and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.gather(*(client() for _ in range(clients)))
    for task in watching:
        task.cancel()
    await asyncio.gather(*watching, return_exceptions=True)
    return out


async def _over_unix(agent: RunningAgent, options: Options, *, watch: bool = True) -> Outcome:
    # A subchannel pool per channel: otherwise grpc shares one connection among them all.
    own = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(agent.target, options=own)
        for _ in range(options.clients + (options.watchers if watch else 0))
    ]
    stubs = [pb_grpc.AgentServiceStub(ch) for ch in channels]
    calls = iter(stubs[: options.clients])
    watches = iter(stubs[options.clients :])
    per_task: dict[asyncio.Task[Any] | None, Any] = {}

    def stub_for_call() -> Any:
        task = asyncio.current_task()
        if task not in per_task:
            per_task[task] = next(calls)
        return per_task[task]

    async def call() -> Any:
        return await stub_for_call().GetReport(pb.GetReportRequest(), timeout=CALL_TIMEOUT_S)

    def stream() -> AsyncIterator[Any]:
        return next(watches).WatchReport(pb.WatchReportRequest()).__aiter__()  # type: ignore[no-any-return,attr-defined]

    try:
        return await _drive(call, stream, options.clients, options.watchers if watch else 0, options.duration_s)
    finally:
        await asyncio.gather(*(ch.close(None) for ch in channels))


async def _over_serial(chardev: str, options: Options) -> Outcome:
    from unplugd.host.client import AgentClient

    async with AgentClient(f"serial:{chardev}", timeout=CALL_TIMEOUT_S) as client:

        async def call() -> Any:
            return await client.get_report(timeout=CALL_TIMEOUT_S)

        return await _drive(call, lambda: client.watch_report(), options.clients, options.watchers, options.duration_s)


def _alone_s(agent: RunningAgent, runs: int = 10) -> float:
    """Median latency of one GetReport with nothing else going on: about one scan."""
    with grpc.insecure_channel(agent.target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        stub.GetReport(pb.GetReportRequest(), timeout=30)
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            stub.GetReport(pb.GetReportRequest(), timeout=30)
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


class Peak:
    """Samples what the agent holds every 0.5 s in a thread; keeps the largest."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.top: Held | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with contextlib.suppress(OSError):
                h = held(self.pid)
                if self.top is None or h.fds > self.top.fds or h.rss_kib > self.top.rss_kib:
                    self.top = Held(
                        max(h.fds, self.top.fds if self.top else 0),
                        max(h.rss_kib, self.top.rss_kib if self.top else 0),
                        h.hwm_kib,
                        max(h.threads, self.top.threads if self.top else 0),
                    )

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _rows(
    label: str,
    options: Options,
    out: Outcome,
    alone_s: float,
    before: Held,
    peak: Held | None,
    after: Held,
    cpu_s: float,
    watchers: int,
) -> list[Row]:
    lat = sorted(out.latencies_s)
    n = len(lat)
    errors = sum(out.errors.values())
    if n:
        p50, p99 = lat[n // 2], lat[min(n - 1, int(n * 0.99))]
        timing = (
            f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (one GetReport on the idle agent: "
            f"{alone_s * 1000:.0f} ms, so p99 = {p99 / alone_s:.1f} of them)"
        )
    else:
        p50 = p99 = 0.0
        timing = "no call answered"
    err_text = f"{errors} errors" + (f" ({dict(out.errors)})" if errors else "")
    if n:
        timing += f"; agent CPU {cpu_s:.1f} s = {cpu_s / n * 1000:.1f} ms a call"
    peak_text = f"; peak fds {peak.fds}, peak threads {peak.threads}" if peak else ""
    rows = [
        Row(
            f"{options.clients} GetReport clients x {options.duration_s:g} s over {label}",
            f"{n + errors:,} calls",
            f"{err_text}, {timing}; agent {span(before, after, peak)}{peak_text}",
            ok=errors == 0 and n > 0,
            raw={
                "p50_s": p50,
                "p99_s": p99,
                "alone_s": alone_s,
                "errors": dict(out.errors),
                "calls": n,
                "cpu_s": cpu_s,
                "before": before.__dict__,
                "after": after.__dict__,
                "peak": peak.__dict__ if peak else None,
            },
        )
    ]
    if not watchers:
        return rows
    watch_err = sum(out.watch_errors.values())
    rows.append(
        Row(
            f"{watchers} WatchReport streams open meanwhile, over {label}",
            f"{watchers} streams",
            f"{out.watch_initial} got their initial report, {out.watch_messages} messages, {watch_err} ended in error"
            + (f" ({dict(out.watch_errors)})" if watch_err else ""),
            ok=out.watch_initial == watchers and watch_err == 0,
        )
    )
    return rows


def _measure(
    agent: RunningAgent, label: str, options: Options, drive: Callable[[], Outcome], watchers: int
) -> list[Row]:
    alone = _alone_s(agent)
    before = held(agent.pid)
    cpu0 = cpu_seconds(agent.pid)
    with Peak(agent.pid) as peak:
        out = drive()
    cpu = cpu_seconds(agent.pid) - cpu0
    time.sleep(1)  # let closed connections go
    after = held(agent.pid)
    return _rows(label, options, out, alone, before, peak.top, after, cpu, watchers)


def run(options: Options) -> list[Row]:
    rows: list[Row] = []
    with running_agent() as agent:  # the packaged defaults: 16 workers, 512 queued calls
        rows += _measure(
            agent,
            "unix, default config, no watchers",
            options,
            lambda: asyncio.run(_over_unix(agent, options, watch=False)),
            0,
        )
    with running_agent(config=load_config(options.clients, options.watchers)) as agent:
        workers = min(MAX_WORKERS, options.clients + options.watchers + SPARE_WORKERS)
        rows += _measure(
            agent,
            f"unix ({workers} workers)",
            options,
            lambda: asyncio.run(_over_unix(agent, options)),
            options.watchers,
        )
        with _bridge_guest(agent, "serial") as (chardev, _proc):
            rows += _measure(
                agent,
                "virtio-serial (fake port, real bridge, host relay)",
                options,
                lambda: asyncio.run(_over_serial(str(chardev), options)),
                options.watchers,
            )
    return rows
