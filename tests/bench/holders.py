"""Many real processes holding the same fds: `sleep` children that inherit them.

Each child gets stdin/stdout/stderr on /dev/null plus the given fds, so it
holds 3 + len(fds) descriptors without running any code of ours. Children die
with the bench (PR_SET_PDEATHSIG), after `bound_s` at the latest (sleep's own
argument), and are killed and reaped on the way out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence

from tests.bench.measure import die_with_parent

__all__ = ["holding_processes"]


@contextlib.contextmanager
def holding_processes(count: int, fds: Sequence[int], bound_s: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 120
        for _ in range(count):
            if time.monotonic() > deadline:
                raise RuntimeError(f"spawning took over 120 s ({len(procs)} of {count} started)")
            procs.append(
                subprocess.Popen(
                    ["sleep", str(bound_s)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    pass_fds=tuple(fds),
                    preexec_fn=die_with_parent,
                )
            )
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
