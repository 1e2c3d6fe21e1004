"""What the packages must hold, from the source tree: one list for the .deb, .rpm and wheel tests.

Every file git knows under a directory that pyproject.toml's package-dir maps into `unplugd` is
installed at its import path, except the few named in NOT_SHIPPED. A file added to agent/, host/ or
proto/unplugd that a build leaves out therefore fails those tests, whatever its kind.
"""

from __future__ import annotations

import subprocess
import tomllib

from tests.conftest import REPO

__all__ = ["AGENT", "HOST", "NOT_SHIPPED", "shipped_sources", "tracked_files"]

# Where each side lives below site-packages: a guest's packages hold nothing under HOST, a host's
# nothing under AGENT.
AGENT = "unplugd/agent/"
HOST = "unplugd/host/"

# Source files no package installs, each with why.
NOT_SHIPPED = {
    # the virtio-serial session protocol's design note: for readers of the source, not a runtime file
    "agent/transports/PROTOCOL.md",
}


def tracked_files() -> list[str]:
    """What a clean checkout holds: tracked files, plus new ones not yet committed (not ignored)."""
    out = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
        capture_output=True,
        check=True,
    ).stdout
    return sorted(f for f in out.decode().split("\0") if f and (REPO / f).is_file())


def shipped_sources() -> dict[str, str]:
    """Source file (repo path) -> its installed path below site-packages, e.g. agent/cli.py -> unplugd/agent/cli.py."""
    mapping: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    longest_first = sorted(mapping.items(), key=lambda kv: -len(kv[1]))
    found: dict[str, str] = {}
    for rel in tracked_files():
        if rel in NOT_SHIPPED or "__pycache__" in rel.split("/"):
            continue
        for pkg, src in longest_first:
            if rel.startswith(src + "/"):
                found[rel] = pkg.replace(".", "/") + rel.removeprefix(src)
                break
    return found
