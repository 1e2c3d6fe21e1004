"""Section 1 (issue 2): `unplugd inspect --json` against the tools a user would run instead.

Same machine, same moment: qemu-guest-agent's three calls (run locally on a
unix socket), `lsblk --json`, `fuser -m` and `lsof` on /dev/vda (the root disk)
and on a mounted loop partition. `unplugd inspect --json` twice: with no agent
(the CLI scans itself) and with `unplugd serve` running (the CLI asks its report
socket), the latter judged against issue 13's target, 2x `lsof /dev/vda`.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench import commands
from tests.bench.agent_proc import running_agent
from tests.bench.loopdev import loop_disk
from tests.bench.measure import Timing, proc_status_kib, rusage_helper, time_call, time_command
from tests.bench.qga import QGA_CALLS, QgaClient, running_qga
from tests.bench.results import Row, SectionResult, Skipped, compare
from unplugd.agent import engine, reportsock
from unplugd.agent.roots import Roots

__all__ = ["run"]

KEY = "inspect"
TITLE = "1. unplugd inspect vs the usual tools, on this machine (issue 2)"
TARGET_X_LSOF = 2.0  # issue 13: `unplugd inspect --json` within 2x of `lsof /dev/vda`
NO_AGENT = "/nonexistent/unplugd-bench/report.sock"  # the CLI finds no agent: it scans itself


@dataclass
class _Ctx:
    runs: int
    result: SectionResult
    reference_s: float | None = None  # unplugd inspect (venv) median
    engine_s: float | None = None  # engine.inspect() in-process median
    judged: list[Row] = field(default_factory=list)  # rows held to TARGET_X_LSOF once lsof is measured


def _versus(ctx: _Ctx, tool_s: float) -> str:
    """How unplugd compares with a tool: as a CLI run, and as the agent's in-process call."""
    parts = []
    if ctx.reference_s is not None:
        parts.append(compare(ctx.reference_s, tool_s, ours="CLI"))
    if ctx.engine_s is not None:
        parts.append(compare(ctx.engine_s, tool_s, ours="in-process"))
    return "; ".join(parts)


def _row(what: str, t: Timing, ctx: _Ctx, note: str = "", versus: str | None = None) -> Row:
    versus = _versus(ctx, t.median_s) if versus is None else versus
    return Row(
        what,
        median_ms=t.median_ms,
        min_ms=t.min_ms,
        runs=t.runs,
        rss_mib=t.rss_mib if t.peak_rss_kib else None,
        versus=versus,
        note=note,
        raw={"samples_s": t.samples_s, "peak_rss_kib": t.peak_rss_kib},
    )


def _env(base: dict[str, str] | None, report_socket: str) -> dict[str, str]:
    return {**(base if base is not None else os.environ), reportsock.SOCKET_ENV: report_socket}


def _unplugd_rows(ctx: _Ctx, report_socket: str = NO_AGENT, label: str = "no agent: scans itself") -> None:
    what = f"unplugd inspect --json (venv, {label})"
    try:
        argv = commands.unplugd_argv("inspect")
        t = time_command([*argv, "--json"], ctx.runs, env=_env(None, report_socket))
        if report_socket == NO_AGENT:
            ctx.reference_s = t.median_s
            ctx.result.rows.append(_row(what, t, ctx, note="reference", versus=""))
        else:
            ctx.judged.append(_row(what, t, ctx))
            ctx.result.rows.append(ctx.judged[-1])
    except (Skipped, RuntimeError) as exc:
        ctx.result.skip_row(what, str(exc))
    what = f"unplugd inspect --json (Debian python3, {label})"
    try:
        argv = commands.unplugd_debian_argv("inspect")
        t = time_command([*argv, "--json"], ctx.runs, env=_env(commands.debian_env(), report_socket))
        versus = compare(t.median_s, ctx.reference_s, ours="Debian") if ctx.reference_s else ""
        ctx.result.rows.append(_row(what, t, ctx, versus=versus))
        if report_socket != NO_AGENT:
            ctx.judged.append(ctx.result.rows[-1])
    except (Skipped, RuntimeError) as exc:
        ctx.result.skip_row(what, str(exc))


def _agent_rows(ctx: _Ctx) -> None:
    """The same command with `unplugd serve` running: the CLI prints the agent's answer."""
    try:
        with running_agent(config="[transports.virtio_serial]\nenabled = false\n") as agent:
            _unplugd_rows(ctx, str(agent.socket.parent / reportsock.REPORT_SOCKET_NAME), "agent running")
    except (OSError, RuntimeError, Skipped) as exc:
        ctx.result.skip_row("unplugd inspect --json (agent running)", str(exc))


def _engine_row(ctx: _Ctx) -> None:
    roots = Roots.live_system()
    t = time_call(lambda: engine.inspect(roots), ctx.runs)
    ctx.engine_s = t.median_s
    ctx.result.rows.append(_row("engine.inspect() in-process", t, ctx, note="no interpreter start", versus=""))


def _qga_rows(ctx: _Ctx) -> float | None:
    what = "qemu-ga: " + " + ".join(c.removeprefix("guest-") for c in QGA_CALLS)
    try:
        with running_qga() as (proc, sock):
            client = QgaClient(sock)
            try:

                def three_calls() -> None:
                    for command in QGA_CALLS:
                        client.call(command)

                t = time_call(three_calls, ctx.runs)
                hwm = proc_status_kib(proc.pid, "VmHWM")
            finally:
                client.close()
            # A fresh connection each time, as a host tool run once would do.
            t_connect = time_call(lambda: _connect_and_call(sock), ctx.runs)
    except (OSError, RuntimeError) as exc:
        ctx.result.skip_row(what, str(exc))
        return None
    t.peak_rss_kib = hwm
    ctx.result.rows.append(_row(what, t, ctx, note="open connection; RSS = running qemu-ga"))
    t_connect.peak_rss_kib = hwm
    ctx.result.rows.append(_row("qemu-ga: connect + sync + the three calls", t_connect, ctx))
    return t_connect.median_s


def _connect_and_call(sock: Path) -> None:
    client = QgaClient(sock)
    try:
        for command in QGA_CALLS:
            client.call(command)
    finally:
        client.close()


def _judge(ctx: _Ctx, lsof_s: float) -> None:
    for row in ctx.judged:
        if row.median_ms is None:
            continue
        ratio = row.median_ms / 1000 / lsof_s
        row.target = f"<= {TARGET_X_LSOF:g}x lsof /dev/vda"
        row.verdict = "met" if ratio <= TARGET_X_LSOF else "MISSED"
        row.versus = f"{ratio:.1f}x lsof /dev/vda"


def _tool_rows(ctx: _Ctx, loop_part: str | None) -> float:
    """lsblk, fuser -m, lsof; returns the summed medians of the /dev/vda trio."""
    total = 0.0
    for what, argv, ok in [
        ("lsblk --json", ["lsblk", "--json"], (0,)),
        ("fuser -m /dev/vda", ["fuser", "-m", "/dev/vda"], (0, 1)),
        ("lsof /dev/vda", ["lsof", "/dev/vda"], (0, 1)),
    ]:
        try:
            t = time_command(argv, ctx.runs, ok_codes=ok)
        except (OSError, RuntimeError) as exc:
            ctx.result.skip_row(what, str(exc))
            continue
        total += t.median_s
        ctx.result.rows.append(_row(what, t, ctx))
        if argv[0] == "lsof":
            _judge(ctx, t.median_s)
    if loop_part is None:
        return total
    for what, argv in [
        (f"fuser -m {loop_part} (mounted loop)", ["fuser", "-m", loop_part]),
        (f"lsof {loop_part} (mounted loop)", ["lsof", loop_part]),
    ]:
        try:
            t = time_command(argv, ctx.runs, ok_codes=(0, 1))
        except (OSError, RuntimeError) as exc:
            ctx.result.skip_row(what, str(exc))
            continue
        ctx.result.rows.append(_row(what, t, ctx))
    return total


def run(quick: bool) -> SectionResult:
    result = SectionResult(KEY, TITLE)
    t0 = time.monotonic()
    ctx = _Ctx(runs=3 if quick else 10, result=result)
    _unplugd_rows(ctx)
    _agent_rows(ctx)
    _engine_row(ctx)
    qga_s = _qga_rows(ctx)
    with contextlib.ExitStack() as stack:
        loop_part: str | None = None
        try:
            disk = stack.enter_context(loop_disk(64))
            loop_part = disk.part(1)
        except (OSError, RuntimeError) as exc:
            result.notes.append(f"no loop device: {exc}")
        tools_s = _tool_rows(ctx, loop_part)
    if qga_s is not None and tools_s:
        combined = qga_s + tools_s
        result.rows.append(
            Row(
                "sum: qemu-ga calls + lsblk + fuser -m + lsof (/dev/vda)",
                median_ms=combined * 1000,
                versus=_versus(ctx, combined),
                note="what a user pieces together, still without a verdict",
            )
        )
    result.notes.append("median/min over the runs after one warm-up")
    result.notes.append(
        "peak RSS: the command's own ru_maxrss (tests/bench/rusage_run.c)"
        if rusage_helper()
        else "peak RSS: wait4() ru_maxrss, an upper bound (no C compiler for rusage_run.c)"
    )
    result.notes.append(
        "ratio: unplugd as a CLI run (venv, no agent) and as the agent's in-process call, against each tool's median;"
        " the agent-running rows against lsof /dev/vda (issue 13's target)"
    )
    result.seconds = time.monotonic() - t0
    return result
