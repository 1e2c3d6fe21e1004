"""The agent's own footprint for GetAgentInfo: what an operator checks across a fleet.

Read from the live /proc/self (also when serving a captured tree: this is
the agent's own process), the same files psutil reads: statm for the
resident set, status for threads, fd/ for open descriptors, stat and
/proc/stat for the start time; CPU times come from times(2). Importing
psutil for this alone would add ~1 MiB to an agent whose target is a small,
flat RSS.
"""

from __future__ import annotations

import os
from pathlib import Path

from google.protobuf import timestamp_pb2

from unplugd.agent.errors import ParseError
from unplugd.agent.roots import Roots
from unplugd.agent.sysio import listdir, read_text
from unplugd.v1 import agent_service_pb2 as pb

__all__ = ["agent_resources", "parse_btime", "parse_starttime", "parse_statm_rss", "parse_threads"]

_STARTTIME_FIELD = 22  # proc(5): field 22 of /proc/PID/stat, in clock ticks after boot


def parse_statm_rss(text: str, page_size: int) -> int:
    """/proc/PID/statm ("size resident shared ...", in pages) -> resident bytes."""
    fields = text.split()
    if len(fields) < 2 or not fields[1].isdigit():
        raise ParseError("statm", f"no resident page count in {text[:80]!r}")
    return int(fields[1]) * page_size


def parse_threads(status: str) -> int:
    """The Threads: line of /proc/PID/status."""
    for line in status.splitlines():
        if line.startswith("Threads:"):
            value = line.split(":", 1)[1].strip()
            if value.isdigit():
                return int(value)
    raise ParseError("status", "no Threads: line")


def parse_starttime(stat: str) -> int:
    """Field 22 of /proc/PID/stat (clock ticks after boot).

    The command (field 2) is in parentheses and may itself hold spaces and
    parentheses, so fields are counted after the last ')'.
    """
    _, paren, rest = stat.rpartition(")")
    fields = rest.split()
    # rest starts at field 3 (state)
    index = _STARTTIME_FIELD - 3
    if not paren or len(fields) <= index or not fields[index].isdigit():
        raise ParseError("stat", f"no start time in {stat[:80]!r}")
    return int(fields[index])


def parse_btime(proc_stat: str) -> int:
    """The boot time (seconds since the epoch) from /proc/stat's btime line."""
    for line in proc_stat.splitlines():
        if line.startswith("btime "):
            value = line.split()[1] if len(line.split()) > 1 else ""
            if value.isdigit():
                return int(value)
    raise ParseError("/proc/stat", "no btime line")


def agent_resources(*, leases: int, watchers: int, proc: Path | None = None) -> pb.AgentResources:
    """This process's RSS, CPU times, threads, open fds and start time, plus the counts given."""
    proc = proc if proc is not None else Roots.live_system().proc
    me = proc / "self"
    times = os.times()
    ticks = os.sysconf("SC_CLK_TCK")
    started_s = parse_btime(read_text(proc / "stat")) + parse_starttime(read_text(me / "stat")) / ticks
    started = timestamp_pb2.Timestamp()
    started.FromNanoseconds(int(started_s * 1e9))
    return pb.AgentResources(
        rss_bytes=parse_statm_rss(read_text(me / "statm"), os.sysconf("SC_PAGE_SIZE")),
        cpu_user_seconds=times.user,
        cpu_system_seconds=times.system,
        threads=parse_threads(read_text(me / "status")),
        open_fds=len(listdir(me / "fd")),
        started_at=started,
        leases=leases,
        watchers=watchers,
    )
