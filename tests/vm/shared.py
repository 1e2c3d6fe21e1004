"""What the test processes of one run share: the built .debs and the installed guest disks, made once.

`make test` runs pytest-xdist workers, each its own process. Without this each worker would build
the packages and boot its own install guest for every config (~2 min each under TCG). The controller
names the run (xdist's testrunuid, which every worker gets as PYTEST_XDIST_TESTRUNUID); the workers
find the same directory by it, and the first to need an artefact makes it under a lock while the
others wait, then use it. The controller removes the directory when the run ends. Outside xdist
there is no run directory and each process makes its own, as before.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["RUN_ENV", "made_once", "run_dir", "run_dir_for"]

RUN_ENV = "PYTEST_XDIST_TESTRUNUID"
_DONE = ".done"


def run_dir_for(uid: str) -> Path:
    """The directory the processes of run `uid` share (the controller removes it at the end)."""
    if not uid.isalnum():  # it becomes a path component
        raise ValueError(f"test run id {uid!r} is not alphanumeric")
    return Path(tempfile.gettempdir()) / f"unplugd-run-{uid}"


def run_dir() -> Path | None:
    """This run's shared directory, or None when this process is not an xdist worker."""
    uid = os.environ.get(RUN_ENV)
    return run_dir_for(uid) if uid else None


def made_once(name: str, make: Callable[[Path], None]) -> Path:
    """run_dir()/name, filled by make(dir) in the first process that asks; the others wait for it.

    A make that raises leaves nothing marked done, so the next process to ask tries again.
    """
    root = run_dir()
    if root is None:
        raise RuntimeError(f"made_once({name!r}) outside an xdist run ({RUN_ENV} is not set)")
    root.mkdir(mode=0o700, exist_ok=True)
    target = root / name
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (target / _DONE).exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            make(target)
            (target / _DONE).touch()
    return target
