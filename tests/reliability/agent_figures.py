"""What the agent process holds, read from /proc: open fds, resident memory, threads."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tests.bench.measure import proc_status_kib

__all__ = ["Held", "held", "span"]


@dataclass(frozen=True)
class Held:
    fds: int
    rss_kib: int
    hwm_kib: int  # peak RSS so far (VmHWM)
    threads: int

    @property
    def rss_mib(self) -> float:
        return self.rss_kib / 1024


def held(pid: int) -> Held:
    return Held(
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        rss_kib=proc_status_kib(pid, "VmRSS"),
        hwm_kib=proc_status_kib(pid, "VmHWM"),
        threads=len(os.listdir(f"/proc/{pid}/task")),
    )


def span(before: Held, after: Held, peak: Held | None = None) -> str:
    """'fds 12->14, RSS 38.1->41.0 MiB (peak 45.2), threads 9->40'."""
    top = max(after.hwm_kib, peak.hwm_kib if peak else 0) / 1024
    return (
        f"fds {before.fds}->{after.fds}, RSS {before.rss_mib:.1f}->{after.rss_mib:.1f} MiB "
        f"(peak {top:.1f}), threads {before.threads}->{after.threads}"
    )
