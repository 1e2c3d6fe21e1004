"""Shared test helpers: repo paths and the tiers (unit, integration, e2e)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.real_kernel import FIGURES
from tests.vm.shared import run_dir_for

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


# The modules that boot VMs, longest first (their times in a two-worker run, 2-15 min each under
# TCG on a busy machine). Under xdist (`make test`) they start first, each on the next free worker,
# so the long ones run side by side instead of one worker finishing alone at the end. The second
# needs no installed guest (it installs the package itself), so it does not wait for the first's.
_SLOW_FIRST = (
    "test_real_kernel_controllers.py",
    "test_package_lifecycle.py",
    "test_real_kernel_q35.py",
    "test_hot_add.py",
    "test_release_e2e.py",
    "test_real_kernel_pc.py",
    "test_vm_boot.py",
    "test_unplugctl_e2e.py",
    "test_libvirt_remote_e2e.py",
    "test_libvirt_e2e.py",
    "test_libvirt_remote.py",
    "test_libvirt_restart.py",
    "test_libvirt_backend.py",
    "test_rpm_package.py",
    "test_python_dist.py",
)


def _xdist_controller(config: pytest.Config) -> bool:
    return config.pluginmanager.hasplugin("xdist") and (config.getoption("numprocesses", None) or 0) > 0


def pytest_configure(config: pytest.Config) -> None:
    # Name the run here so this process knows the directory its workers share (tests/vm/shared.py).
    if _xdist_controller(config) and not hasattr(config, "workerinput") and config.option.testrunuid is None:
        config.option.testrunuid = uuid.uuid4().hex


def pytest_unconfigure(config: pytest.Config) -> None:
    if _xdist_controller(config) and not hasattr(config, "workerinput") and config.option.testrunuid:
        shutil.rmtree(run_dir_for(config.option.testrunuid), ignore_errors=True)


# The VM figures the e2e tests collect (boot and scenario times, latencies) are printed at the end,
# never asserted. Under xdist they are gathered in the workers: each hands its own to the controller.
_FIGURES_KEY = "unplugd_vm_figures"


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[_FIGURES_KEY] = list(FIGURES)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest alone does not know it
def pytest_testnodedown(node: Any, error: object) -> None:
    FIGURES.extend(getattr(node, "workeroutput", {}).get(_FIGURES_KEY, []))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("VM figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


# What the guest said when a test on it failed: the agent's journal and the unit's state, attached to the
# failure's report. A guest agent that stops answering is otherwise a mystery by the time anyone looks.
_GUEST_DIAGNOSTICS = (
    "systemctl show unplugd.service -p ActiveState,SubState,NRestarts,ExecMainStartTimestampMonotonic; "
    "journalctl -b -u unplugd.service --no-pager -o short-monotonic | tail -n 60; "
    "journalctl -b --no-pager -o short-monotonic | grep -E 'virtio_console|unplugd.rules|Failed' | tail -n 20"
)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and call.when == "call":
        from tests.vm.guest import GuestVM

        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, GuestVM) and value.running:
                try:
                    text = value.exec(_GUEST_DIAGNOSTICS, timeout=60).stdout
                except Exception as exc:  # the guest may be what failed; the test's own error stands
                    text = f"could not ask the guest: {exc}"
                report.sections.append((f"guest {name}: unplugd", text))
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "e2e" in parts:
            item.add_marker(pytest.mark.e2e)
    if hasattr(config, "workerinput"):  # an xdist worker: the controller schedules in this order
        rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
        items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: modules stay whole


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def require_vm_tools() -> None:
    """What booting a test guest needs: root, QEMU and debootstrap (packaging/dev/system-deps.sh)."""
    require_root()
    if shutil.which("qemu-system-x86_64") is None or shutil.which("debootstrap") is None:
        pytest.skip("needs qemu-system-x86 and debootstrap (packaging/dev/system-deps.sh)")
