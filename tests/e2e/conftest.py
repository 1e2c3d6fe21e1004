"""End-to-end tier: print the VM figures the tests collected (boot and scenario times, latencies)."""

from __future__ import annotations

import pytest

from tests.e2e.real_kernel import FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("real-kernel VM figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
