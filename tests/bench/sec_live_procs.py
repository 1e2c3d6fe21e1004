"""Section 3 (issue 2): this machine with 2,000 extra real processes holding 20 fds each.

Target: `unplugd inspect`'s full report (every device) faster than one
`lsof DEVICE` for a single device. The processes are `sleep` children each
holding /dev/null, a loop disk's second partition (the block node itself) and
a file on its first partition (mounted): 20 fds apiece. Everything is killed,
unmounted and detached afterwards.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from tests.bench import commands
from tests.bench.agent_proc import running_agent
from tests.bench.holders import holding_processes
from tests.bench.loopdev import loop_disk
from tests.bench.measure import Timing, time_call, time_command
from tests.bench.results import Row, SectionResult, Skipped, compare
from unplugd.agent import engine, model, reportsock
from unplugd.agent.collectors.processes import scan_processes
from unplugd.agent.roots import Roots

__all__ = ["run"]

KEY = "procs"
TITLE = "3. live load: 2,000 extra processes x 20 fds on this machine (issue 2)"
PROCESSES = 2000
# 3 std fds on /dev/null + these: 7 more /dev/null, 5 the raw partition, 5 a file on the mounted one.
NULL_FDS, NODE_FDS, FILE_FDS = 7, 5, 5


def _row(what: str, t: Timing, ref: Timing | None, note: str = "") -> Row:
    return Row(
        what,
        median_ms=t.median_ms,
        min_ms=t.min_ms,
        runs=t.runs,
        rss_mib=t.rss_mib if t.peak_rss_kib else None,
        versus=compare(ref.median_s, t.median_s) if ref is not None and ref is not t else "",
        note=note,
        raw={"samples_s": t.samples_s, "peak_rss_kib": t.peak_rss_kib},
    )


def _count_lines(t: Timing) -> int:
    return max(0, len(t.stdout.splitlines()) - 1)  # minus lsof's header


def _measure(result: SectionResult, disk_parts: tuple[str, str], runs: int) -> None:
    mounted, raw = disk_parts
    ours: Timing | None = None
    what = "unplugd inspect --json (full report, every device; no agent: scans itself)"
    try:
        no_agent = {**os.environ, reportsock.SOCKET_ENV: "/nonexistent/unplugd-bench/report.sock"}
        ours = time_command([*commands.unplugd_argv("inspect"), "--json"], runs, env=no_agent)
        result.rows.append(_row(what, ours, None, note="reference"))
    except (Skipped, RuntimeError) as exc:
        result.skip_row(what, str(exc))
    served: Timing | None = None
    what = "unplugd inspect --json (agent running: its report socket)"
    try:
        with running_agent(config="[transports.virtio_serial]\nenabled = false\n") as agent:
            env = {**os.environ, reportsock.SOCKET_ENV: str(agent.socket.parent / reportsock.REPORT_SOCKET_NAME)}
            served = time_command([*commands.unplugd_argv("inspect"), "--json"], runs, env=env)
        row = _row(what, served, None, note="the agent's scan, the CLI waits")
        row.versus = compare(served.median_s, ours.median_s, ours="agent") if ours is not None else ""
        result.rows.append(row)
    except (Skipped, OSError, RuntimeError) as exc:
        result.skip_row(what, str(exc))
    roots = Roots.live_system()
    t = time_call(lambda: engine.inspect(roots), runs)
    result.rows.append(_row("engine.inspect() in-process", t, None, note="no interpreter start"))
    lsof_times: list[tuple[str, Timing]] = []
    for what, argv, note in [
        (f"lsof {raw}", ["lsof", raw], "the node the processes hold"),
        (f"lsof {mounted}", ["lsof", mounted], "files open on its filesystem"),
        ("lsof /dev/vda", ["lsof", "/dev/vda"], "the root disk"),
        (f"fuser {raw}", ["fuser", raw], ""),
        (f"fuser -m {mounted}", ["fuser", "-m", mounted], ""),
        ("fuser -m /dev/vda", ["fuser", "-m", "/dev/vda"], ""),
    ]:
        try:
            t = time_command(argv, runs, ok_codes=(0, 1))
        except (OSError, RuntimeError) as exc:
            result.skip_row(what, str(exc))
            continue
        if what.startswith("lsof"):
            note = f"{note}; {_count_lines(t)} lines".lstrip("; ")
            lsof_times.append((what, t))
        result.rows.append(_row(what, t, ours, note=note))
    _holder_check(result, raw, runs)
    if lsof_times:
        fastest_name, fastest = min(lsof_times, key=lambda x: x[1].median_s)
        for row, timing in ((result.rows[0], ours), (result.rows[1], served)):
            if timing is not None:
                row.target = f"< one lsof DEVICE ({fastest_name}: {fastest.median_ms:.0f} ms)"
                row.verdict = "met" if timing.median_s < fastest.median_s else "MISSED"


def _holder_check(result: SectionResult, raw: str, runs: int) -> None:
    """The process scan alone, for the loop partition: proves the load is there and sees it."""
    what = f"scan_processes(live, wanted={raw})"
    roots = Roots.live_system()
    st = os.stat(raw)
    node = model.DeviceNode(raw, (os.major(st.st_rdev), os.minor(st.st_rdev)), "block")
    t = time_call(lambda: scan_processes(roots, [node]), runs)
    scan = scan_processes(roots, [node]).value
    pids = {ref.pid for ref in scan.open_refs}
    result.rows.append(_row(f"  {what}", t, None, note=f"{len(pids)} processes, {len(scan.open_refs)} fds found"))


def run(quick: bool) -> SectionResult:
    result = SectionResult(KEY, TITLE)
    t0 = time.monotonic()
    if os.geteuid() != 0:
        result.skipped = "needs root (loop devices)"
        return result
    runs = 3 if quick else 7
    bound_s = 300 if quick else 600
    with contextlib.ExitStack() as stack:
        disk = stack.enter_context(loop_disk(64))
        assert disk.mountpoint is not None
        held = disk.mountpoint / "held.dat"
        held.write_bytes(b"x" * 4096)
        fds: list[int] = []

        def close_fds() -> None:
            while fds:
                os.close(fds.pop())

        stack.callback(close_fds)
        fds += [os.open("/dev/null", os.O_RDONLY) for _ in range(NULL_FDS)]
        fds += [os.open(disk.part(2), os.O_RDONLY) for _ in range(NODE_FDS)]
        fds += [os.open(held, os.O_RDONLY) for _ in range(FILE_FDS)]
        t_spawn = time.monotonic()
        procs = stack.enter_context(holding_processes(PROCESSES, fds, bound_s))
        spawn_s = time.monotonic() - t_spawn
        close_fds()  # only the children hold them now
        per_proc = len(os.listdir(f"/proc/{procs[0].pid}/fd"))
        result.notes.append(
            f"{len(procs)} sleep processes x {per_proc} fds ({3 + NULL_FDS} /dev/null, {NODE_FDS} {disk.part(2)}, "
            f"{FILE_FDS} {Path(held).name} on {disk.part(1)}), spawned in {spawn_s:.1f} s; "
            f"{len([p for p in os.listdir('/proc') if p.isdigit()])} processes on the machine"
        )
        _measure(result, (disk.part(1), disk.part(2)), runs)
    result.notes.append("target (issue 2): the full report for every device faster than one `lsof DEVICE`")
    result.notes.append("loop devices are not PCI functions: unplugd scans every fd, but reports vda/eth0")
    result.seconds = time.monotonic() - t0
    return result
