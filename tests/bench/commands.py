"""The commands the bench runs: the venv's console scripts, and the agent's CLI under Debian's python3.

Each finder returns the argv, checked to answer `--help`, or raises Skipped(why) when this machine
lacks it (no venv script, no Debian python3). unplugd's own modules the sections import plainly: a
missing or renamed one is an error, never a skipped row.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.bench.results import Skipped

__all__ = [
    "DEBIAN_PYTHON",
    "REPO",
    "VENV_BIN",
    "debian_env",
    "unplugctl_argv",
    "unplugd_argv",
    "unplugd_debian_argv",
]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
DEBIAN_PYTHON = "/usr/bin/python3"


def _check_help(argv: Sequence[str], env: dict[str, str] | None = None) -> None:
    try:
        proc = subprocess.run(
            [*argv, "--help"], capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Skipped(f"{argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise Skipped(f"`{' '.join(argv[-2:])} --help` fails: {tail}")


def _venv_script(name: str, subcommand: str) -> list[str]:
    exe = VENV_BIN / name
    if not exe.exists():
        raise Skipped(f"{exe} missing (run packaging/dev/venv.sh)")
    argv = [str(exe), subcommand]
    _check_help(argv)
    return argv


def unplugd_argv(subcommand: str = "inspect") -> list[str]:
    """The venv's console script, checked to know the subcommand."""
    return _venv_script("unplugd", subcommand)


def debian_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / ".dev")
    return env


def unplugd_debian_argv(subcommand: str = "inspect") -> list[str]:
    """The same CLI under Debian's python3 and its python3-grpcio/protobuf/psutil/pyroute2 packages."""
    if not Path(DEBIAN_PYTHON).exists():
        raise Skipped(f"{DEBIAN_PYTHON} missing")
    # What /usr/bin/unplugd runs (packaging/deb/build.sh's entry_point).
    argv = [DEBIAN_PYTHON, "-c", "from unplugd.agent.entry import main; raise SystemExit(main())", subcommand]
    _check_help(argv, env=debian_env())
    return argv


def unplugctl_argv(subcommand: str = "status") -> list[str]:
    return _venv_script("unplugctl", subcommand)
