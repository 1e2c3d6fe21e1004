"""What of unplugd exists in the tree yet: each finder returns it or raises Skipped(why).

Other parts are built in parallel; a section asks here and prints
"skipped: <why>" instead of failing while a piece is missing.
"""

from __future__ import annotations

import importlib
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.bench.results import Skipped

__all__ = [
    "DEBIAN_PYTHON",
    "REPO",
    "VENV_BIN",
    "debian_env",
    "engine_inspect",
    "module",
    "unplugctl_argv",
    "unplugd_argv",
    "unplugd_debian_argv",
]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
DEBIAN_PYTHON = "/usr/bin/python3"


def module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise Skipped(f"{name} does not exist yet ({exc.name} missing)") from exc
    except Exception as exc:  # a half-written module of another engineer
        raise Skipped(f"{name} does not import: {type(exc).__name__}: {exc}") from exc


def attr(mod: ModuleType, name: str) -> Any:
    if not hasattr(mod, name):
        raise Skipped(f"{mod.__name__}.{name} does not exist yet")
    return getattr(mod, name)


def engine_inspect() -> Callable[..., Any]:
    """unplugd.agent.engine.inspect(roots, devices=(), *, leased={}, own_claims=()) -> Report."""
    return attr(module("unplugd.agent.engine"), "inspect")  # type: ignore[no-any-return]


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


def unplugd_argv(subcommand: str = "inspect") -> list[str]:
    """The venv's console script, checked to know the subcommand."""
    exe = VENV_BIN / "unplugd"
    if not exe.exists():
        raise Skipped(f"{exe} missing (run packaging/dev/venv.sh)")
    module("unplugd.agent.cli")
    argv = [str(exe), subcommand]
    _check_help(argv)
    return argv


def debian_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / ".dev")
    return env


def unplugd_debian_argv(subcommand: str = "inspect") -> list[str]:
    """The same CLI under Debian's python3 and its python3-grpcio/protobuf/psutil/pyroute2 packages."""
    if not Path(DEBIAN_PYTHON).exists():
        raise Skipped(f"{DEBIAN_PYTHON} missing")
    argv = [DEBIAN_PYTHON, "-c", "from unplugd.agent.cli import main; raise SystemExit(main())", subcommand]
    _check_help(argv, env=debian_env())
    return argv


def unplugctl_argv(subcommand: str = "status") -> list[str]:
    exe = VENV_BIN / "unplugctl"
    if not exe.exists():
        raise Skipped(f"{exe} missing (run packaging/dev/venv.sh)")
    module("unplugd.host.cli")
    argv = [str(exe), subcommand]
    _check_help(argv)
    return argv
