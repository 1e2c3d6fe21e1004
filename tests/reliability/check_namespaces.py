"""10,000 mount namespaces and 10,000 processes on the live system, with the agent watching.

What any unprivileged user can create (`unshare -Urm` in a loop). The agent
(`unplugd serve`, its own process, the packaged defaults: at most 512
mountinfo files held for events) has one WatchReport subscriber throughout:
- its fds, RSS and threads before, with the crowd, after the crowd is gone;
- a full GetReport with the crowd there;
- a bind mount (of a directory on the root filesystem: a new MOUNTED reason
  for the root disk's function) made in the crowd's FIRST namespace (one the
  agent holds a file for: an event) and in its LAST (past the cap: found by
  the rescan every fd_rescan_seconds), timed to the WatchReport message.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from tests.bench.agent_proc import RunningAgent, running_agent
from tests.bench.sec_agent_service import _root_function
from tests.bench.watch_probe import WatchRecorder, nsenter_mount
from tests.reliability.agent_figures import Held, held
from tests.reliability.crowd import crowd
from tests.reliability.registry import Options, Row
from unplugd.agent.config import WatchConfig
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import agent_service_pb2_grpc as pb_grpc

__all__ = ["run", "settled", "time_mount_event"]

# The promise for a namespace without a file: the rescan tick (fd_rescan_seconds,
# or 4 scans if longer) plus a scan: ~35 s with 7 s scans here; past this, "never".
EVENT_TIMEOUT_S = 120.0


def settled(pid: int, timeout_s: float = 60.0) -> Held:
    """What the agent holds once its fd count stops moving (the watcher has caught up with a change)."""
    deadline = time.monotonic() + timeout_s
    last = held(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = held(pid)
        if now.fds == last.fds:
            return now
        last = now
    return last


def _report_ms(agent: RunningAgent, runs: int = 3) -> float:
    with grpc.insecure_channel(agent.target) as channel:
        stub = pb_grpc.AgentServiceStub(channel)
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            stub.GetReport(pb.GetReportRequest(), timeout=120)
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


@contextlib.contextmanager
def mount_dirs() -> Iterator[Path]:
    """src/ and dst*/ on the root filesystem, made before the crowd so every namespace has them."""
    with tempfile.TemporaryDirectory(prefix="unplugd-rel-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        for i in range(4):
            (root / f"dst{i}").mkdir()
        yield root


def time_mount_event(watch: WatchRecorder, pid: int, src: Path, dst: Path, address: str) -> float | None:
    """Bind-mount src on dst in pid's namespace; seconds until the WatchReport names `address`."""
    watch.drain()
    t0 = time.perf_counter()
    nsenter_mount(pid, ["mount", "--bind", str(src), str(dst)])
    return watch.wait_for(address, t0, EVENT_TIMEOUT_S)


def split_by_file(agent_pid: int, pids: list[int]) -> tuple[list[int], list[int]]:
    """The pids whose mountinfo the agent holds open (watched by event), and the others."""
    held_files = set()
    for fd in os.listdir(f"/proc/{agent_pid}/fd"):
        with contextlib.suppress(OSError):
            held_files.add(os.readlink(f"/proc/{agent_pid}/fd/{fd}"))
    watched = [p for p in pids if f"/proc/{p}/mountinfo" in held_files]
    return watched, [p for p in pids if p not in set(watched)]


def _fmt(h: Held) -> str:
    return f"fds {h.fds}, RSS {h.rss_mib:.1f} MiB, threads {h.threads}"


def _event_text(seconds: float | None) -> str:
    return "NO event" if seconds is None else f"event in {seconds * 1000:.0f} ms"


def run(options: Options) -> list[Row]:
    rows: list[Row] = []
    cap = WatchConfig.max_namespace_fds
    with mount_dirs() as dirs, running_agent(timeout_s=60) as agent:
        address = _root_function(agent)
        idle = held(agent.pid)
        alone_ms = _report_ms(agent)
        watch = WatchRecorder(agent.target)
        try:
            if watch.next(30) is None:
                raise RuntimeError("no initial WatchReport message")
            watching = settled(agent.pid)
            t0 = time.monotonic()
            with (
                crowd(options.namespaces, namespaces=True) as spaces,
                crowd(options.processes, namespaces=False) as procs,
            ):
                spawn_s = time.monotonic() - t0
                crowded = settled(agent.pid)
                full_ms = _report_ms(agent)
                watched, unwatched = split_by_file(agent.pid, spaces.pids)
                if not watched or not unwatched:
                    raise RuntimeError(
                        f"{len(watched)} crowd namespaces with a file, {len(unwatched)} without: "
                        "the cap did not split the crowd"
                    )
                first = time_mount_event(watch, watched[0], dirs / "src", dirs / "dst0", address)
                last = time_mount_event(watch, unwatched[-1], dirs / "src", dirs / "dst1", address)
                during = held(agent.pid)
            gone = settled(agent.pid)
        finally:
            watch.close()
        after = settled(agent.pid)
    n = f"{options.namespaces:,} mount namespaces + {options.processes:,} processes"
    held_by_ns = crowded.fds - watching.fds
    rows.append(
        Row(
            f"{n}, agent watching (max_namespace_fds {cap})",
            f"spawned in {spawn_s:.0f} s",
            f"agent idle {_fmt(idle)}; watching {_fmt(watching)}; with the crowd {_fmt(crowded)} "
            f"(+{held_by_ns} fds); crowd gone {_fmt(gone)}; unwatched {_fmt(after)}; "
            f"peak RSS {during.hwm_kib / 1024:.1f} MiB",
            ok=held_by_ns <= cap and gone.fds <= watching.fds + 2,
            raw={
                "idle": idle.__dict__,
                "watching": watching.__dict__,
                "crowded": crowded.__dict__,
                "gone": gone.__dict__,
                "after": after.__dict__,
                "during": during.__dict__,
            },
        )
    )
    rows.append(
        Row(
            f"full GetReport with {n}",
            "3 calls",
            f"median {full_ms:.0f} ms (without the crowd {alone_ms:.0f} ms)",
            ok=None,
            raw={"full_ms": full_ms, "alone_ms": alone_ms},
        )
    )
    rows.append(
        Row(
            f"bind mount in a crowd namespace the agent holds a file for (pid {watched[0]})",
            "1 mount",
            _event_text(first),
            ok=first is not None,
        )
    )
    rows.append(
        Row(
            f"bind mount in a crowd namespace past the cap (pid {unwatched[-1]}, {len(unwatched):,} such)",
            "1 mount",
            f"{_event_text(last)} (promise: within max(fd_rescan_seconds {WatchConfig.fd_rescan_seconds:g} s, "
            "4 scans) + one scan)",
            ok=last is not None,
        )
    )
    _ = procs
    return rows
