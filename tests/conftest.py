"""Shared test helpers: repo paths and the tiers (unit, integration, e2e)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "e2e" in parts:
            item.add_marker(pytest.mark.e2e)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def require_vm_tools() -> None:
    """What booting a test guest needs: root, QEMU and debootstrap (packaging/dev/system-deps.sh)."""
    require_root()
    if shutil.which("qemu-system-x86_64") is None or shutil.which("debootstrap") is None:
        pytest.skip("needs qemu-system-x86 and debootstrap (packaging/dev/system-deps.sh)")
