"""Timing and memory measurements: commands, callables, and running processes.

Peak RSS of a command is its ru_maxrss (KiB) as reaped by rusage_run.c, a
small C launcher, so the bench's own RSS at fork time does not leak into it;
the kernel folds in the children the command waited for (lsof's helper).
RSS and CPU of a long-running process come from /proc/PID/status and stat.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Timing",
    "cpu_seconds",
    "die_with_parent",
    "proc_status_kib",
    "run_once",
    "rusage_helper",
    "spawn",
    "stop",
    "time_call",
    "time_command",
]

_PR_SET_PDEATHSIG = 1


@dataclass
class Timing:
    samples_s: list[float] = field(default_factory=list)
    peak_rss_kib: int = 0
    returncodes: list[int] = field(default_factory=list)
    stdout: bytes = b""  # of the last measured run

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_s) * 1000

    @property
    def min_ms(self) -> float:
        return min(self.samples_s) * 1000

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def rss_mib(self) -> float:
        return self.peak_rss_kib / 1024

    @property
    def runs(self) -> int:
        return len(self.samples_s)


def die_with_parent() -> None:
    """preexec_fn: the kernel kills the child if the bench dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_HELPER_SOURCE = Path(__file__).with_name("rusage_run.c")


@functools.cache
def rusage_helper() -> str | None:
    """Build rusage_run.c once (cached by its hash); None without a C compiler."""
    source = _HELPER_SOURCE.read_bytes()
    cache = Path(os.environ.get("UNPLUGD_CACHE") or Path.home() / ".cache" / "unplugd") / "bench"
    exe = cache / f"rusage-run-{hashlib.sha256(source).hexdigest()[:12]}"
    if exe.exists():
        return str(exe)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_suffix(f".tmp{os.getpid()}")
    proc = subprocess.run([cc, "-O2", "-o", str(tmp), str(_HELPER_SOURCE)], capture_output=True, check=False)
    if proc.returncode != 0:
        return None
    tmp.rename(exe)
    return str(exe)


def run_once(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout_s: float = 120.0
) -> tuple[float, int, int, bytes, bytes]:
    """(wall seconds, exit code, peak RSS KiB, stdout, stderr) of one run.

    The command runs under rusage-run for an honest peak RSS (see rusage_run.c);
    without a C compiler the figure is wait4()'s, an upper bound that includes
    the bench's own RSS at fork time. Output goes to temporary files so a large
    output never blocks the child.
    """
    helper = rusage_helper()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as rss:
        full = [helper, rss.name, *argv] if helper else list(argv)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            preexec_fn=die_with_parent,
        )
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if elapsed >= timeout_s and proc.returncode < 0:
            raise RuntimeError(f"{argv[0]} took over {timeout_s:.0f} s")
        peak = int(usage.ru_maxrss)
        if helper:
            text = Path(rss.name).read_text().strip()
            peak = int(text) if text.isdigit() else 0
        out.seek(0)
        err.seek(0)
        return elapsed, proc.returncode, peak, out.read(), err.read()


def time_command(
    argv: Sequence[str],
    runs: int,
    *,
    warmup: int = 1,
    env: Mapping[str, str] | None = None,
    ok_codes: Sequence[int] = (0,),
    timeout_s: float = 120.0,
) -> Timing:
    """Run argv `warmup + runs` times; wall time and peak RSS of the measured runs.

    A run whose exit code is not in ok_codes raises RuntimeError with its stderr,
    so a broken tool never shows up as a fast figure.
    """
    result = Timing()
    for i in range(warmup + runs):
        elapsed, rc, rss, out, err = run_once(argv, env=env, timeout_s=timeout_s)
        if rc not in ok_codes:
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(argv)} exited {rc}: {' / '.join(tail)}")
        if i >= warmup:
            result.samples_s.append(elapsed)
            result.returncodes.append(rc)
            result.peak_rss_kib = max(result.peak_rss_kib, rss)
            result.stdout = out
    return result


def time_call(fn: Callable[[], Any], runs: int, *, warmup: int = 1) -> Timing:
    result = Timing()
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            result.samples_s.append(elapsed)
    return result


def proc_status_kib(pid: int, key: str) -> int:
    """A 'kB' field of /proc/PID/status: VmRSS, VmHWM, ..."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            return int(rest.split()[0])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (not its children), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # comm may contain spaces and parentheses: the fields start after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """A helper process that dies with the bench, whatever kills the bench."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(list(argv), preexec_fn=die_with_parent, **kwargs)


def stop(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after grace_s; always reaped."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
