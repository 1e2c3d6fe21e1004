"""Network namespace helpers for integration tests: a fresh netns per test, deleted even on failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import REPO, require_root

# Runs inside the namespace (ip netns exec also remounts /sys for it) and prints the scan as JSON.
# The records are NamedTuples: each becomes a dict, recursively (json would write them as lists).
_COLLECT = """
import json
from unplugd.agent.collectors.net import collect_net
from unplugd.agent.roots import Roots
def plain(x):
    if hasattr(x, "_asdict"):
        return {k: plain(v) for k, v in x._asdict().items()}
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x
net, problems = collect_net(Roots.live_system())
print(json.dumps({**plain(net), "problems": [plain(p) for p in problems]}))
"""


class NetNS:
    def __init__(self, name: str) -> None:
        self.name = name

    def ip(self, *args: str) -> None:
        """Run `ip ARGS` inside the namespace; fail the test with ip's message."""
        proc = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.fail(f"ip -n {self.name} {' '.join(args)}: {proc.stderr.strip()}")

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True, check=False, timeout=timeout
        )

    def collect(self, python: str = sys.executable) -> dict[str, Any]:
        """collect_net() as seen from inside the namespace, decoded from JSON.

        `python` may be another interpreter (Debian's /usr/bin/python3 with its
        own pyroute2); the work tree is put on its path through .dev/.
        """
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO / ".dev")}
        proc = self.run("env", "-i", *(f"{k}={v}" for k, v in env.items()), python, "-c", _COLLECT)
        if proc.returncode != 0:
            pytest.fail(f"collect_net in {self.name} failed: {proc.stderr.strip()}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result


@pytest.fixture
def netns() -> Iterator[NetNS]:
    require_root()
    if shutil.which("ip") is None:
        pytest.skip("iproute2 missing")
    name = f"unplugd-t-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        yield NetNS(name)
    finally:
        # Deleting the namespace also destroys every link created inside it.
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
