"""Thousands of real processes, each in its own mount namespace if asked: what any user can create.

One bash (our child, killed with us through PR_SET_PDEATHSIG) forks them
all, which is ~10x faster than forking this Python process 10,000 times,
and stays their parent: it reaps them as they are killed. Each is
`sleep BOUND` (so a crowd left behind by a SIGKILLed harness ends by itself)
or `unshare -m --propagation private sleep BOUND`: a mount namespace of its
own whose mounts do not propagate. A sleep costs ~175 KiB of memory (measured
here: 1,000 took 175 MB), 10,000 about 1.7 GB.

On the way out (also on an exception) every pid is killed, bash reaps them
and exits, and is reaped in turn: nothing is left, not even zombies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tests.bench.measure import die_with_parent

__all__ = ["Crowd", "crowd"]

# The longest a crowd may outlive a killed harness.
BOUND_S = 3600
SPAWN_TIMEOUT_S = 300.0  # 10,000 take ~15 s on this 2-core machine; generous for a loaded one


@dataclass
class Crowd:
    pids: list[int]
    namespaces: bool

    def __len__(self) -> int:
        return len(self.pids)


def _script(count: int, namespaces: bool) -> str:
    cmd = "unshare -m --propagation private sleep" if namespaces else "sleep"
    # `echo $!` after each: the parent reads every pid; `wait` reaps them as they die.
    return (
        f"for ((i=0; i<{count}; i++)); do {cmd} {BOUND_S} </dev/null >/dev/null 2>&1 & echo $!; done; echo done; wait"
    )


@contextlib.contextmanager
def crowd(count: int, *, namespaces: bool) -> Iterator[Crowd]:
    """`count` sleeping processes (each in a new mount namespace if `namespaces`), gone afterwards."""
    bash = subprocess.Popen(
        ["bash", "-c", _script(count, namespaces)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=die_with_parent,
    )
    got = Crowd([], namespaces)
    spawned = False
    assert bash.stdout is not None
    try:
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        for line in bash.stdout:
            if line.strip() == "done":
                spawned = True
                break
            got.pids.append(int(line))
            if time.monotonic() > deadline:
                raise RuntimeError(f"spawning took over {SPAWN_TIMEOUT_S:.0f} s ({len(got)} of {count})")
        if len(got) != count:
            raise RuntimeError(f"only {len(got)} of {count} processes started (pid_max, ulimit -u?)")
        if namespaces:
            _wait_unshared(got.pids[-1])
        yield got
    finally:
        if not spawned:  # stopped mid-way: stop bash forking first, then collect what it did start
            bash.kill()
            got.pids += [int(line) for line in bash.stdout.read().split() if line.isdigit()]
        for pid in got.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            bash.wait(timeout=60)  # it reaps every child, then its `wait` returns
        except subprocess.TimeoutExpired:
            bash.kill()
            bash.wait()
        bash.stdout.close()


def _wait_unshared(pid: int, timeout_s: float = 10.0) -> None:
    """Until the last child runs sleep in its own namespace (unshare(1) has done its work)."""
    own = os.readlink("/proc/self/ns/mnt")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/{pid}/ns/mnt") != own:
                return
        time.sleep(0.01)
    raise RuntimeError(f"pid {pid} did not enter its own mount namespace in {timeout_s:.0f} s")
