"""The agent as a separate process (`unplugd serve`), so its RSS and CPU are its own.

It serves the live system (or a tree with --root) on a unix socket in a
temporary directory, with a bench config file so /etc/unplugd/config.toml
of this machine cannot change what is measured.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.bench import commands
from tests.bench.measure import spawn, stop

__all__ = ["RunningAgent", "running_agent", "serve_argv"]


@dataclass(frozen=True)
class RunningAgent:
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path

    @property
    def target(self) -> str:
        return f"unix:{self.socket}"

    @property
    def pid(self) -> int:
        return self.proc.pid


def serve_argv() -> list[str]:
    """`unplugd serve`: the venv's console script."""
    return commands.unplugd_argv("serve")


def _wait_ready(agent: RunningAgent, timeout_s: float) -> None:
    import grpc

    deadline = time.monotonic() + timeout_s
    while not agent.socket.exists():
        if agent.proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {agent.proc.returncode}: {_tail(agent.log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the agent did not create {agent.socket} in {timeout_s:.0f} s: {_tail(agent.log)}")
        time.sleep(0.05)
    with grpc.insecure_channel(agent.target) as channel:
        grpc.channel_ready_future(channel).result(timeout=max(1.0, deadline - time.monotonic()))


def _tail(log: Path) -> str:
    try:
        return " / ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    except OSError:
        return "no log"


@contextlib.contextmanager
def running_agent(
    extra: Sequence[str] = (), *, config: str = "", timeout_s: float = 30.0, python: str | None = None
) -> Iterator[RunningAgent]:
    """Start the agent, wait until it answers, stop it (SIGTERM, then SIGKILL) on the way out.

    python: run it under that interpreter with the work tree on PYTHONPATH instead (e.g. Debian's
    /usr/bin/python3 with python3-grpcio 1.51, as in the guest package).
    """
    argv = serve_argv() if python is None else [python, "-m", "unplugd.agent.cli", "serve"]
    env = None
    if python is not None:
        env = {"PYTHONPATH": str(commands.REPO / ".dev"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    with tempfile.TemporaryDirectory(prefix="unplugd-bench-agent-") as tmp:
        sock = Path(tmp) / "agent.sock"
        cfg = Path(tmp) / "config.toml"
        cfg.write_text(config)
        log = Path(tmp) / "agent.log"
        with open(log, "wb") as log_file:
            proc = spawn(
                [*argv, "--config", str(cfg), "--socket", str(sock), "--log-format", "text", *extra],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        agent = RunningAgent(proc, sock, log)
        try:
            _wait_ready(agent, timeout_s)
            yield agent
        finally:
            stop(proc)
