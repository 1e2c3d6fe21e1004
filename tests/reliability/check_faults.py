"""Faults, tried many times: things vanishing mid-scan, QEMU killed mid-unplug, a reader that leaves.

- every scenario of tests/unit/test_faults.py (a partition, a holder, a
  whole function, a process, the last process of a mount namespace deleted
  before each step of a scan in turn): how often the function came out
  BUSY, UNKNOWN, READY or absent, and how many answers broke the promise;
- QEMU (TCG, no guest) SIGKILLed at a random moment while unplugctl waits
  for DEVICE_DELETED of a pending unplug: the outcome (HYPERVISOR_LOST, exit
  9) and how long after the kill the wait ended;
- a libvirtd of the check's own restarted while unplugctl waits for a
  pending detach: reconnected, the unplug still PENDING at the timeout;
- `unplugd inspect` of this machine writing into a pipe whose reader is
  gone: exit status and stderr.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tests.integration.qemu import have_qemu, run_qemu
from tests.reliability.registry import Options, Row
from tests.unit.test_faults import SCENARIOS, sweep
from unplugd.host.backends.qmp import QmpBackend
from unplugd.host.cli import unplug_exit
from unplugd.host.orchestrator import Orchestrator, Progress
from unplugd.stdio import EXIT_BROKEN_PIPE

__all__ = ["run"]

KILLS = 10  # QEMU start + kill is about a second each
RESTARTS = 3  # each waits for a detach (5 s in libvirt) and the unplug timeout (15 s)
PIPES = 20
REPO = Path(__file__).resolve().parents[2]


def _vanishing() -> list[Row]:
    rows = []
    for sc in SCENARIOS:
        with tempfile.TemporaryDirectory(prefix="unplugd-faults-") as work:
            result = sweep(sc, Path(work))
        states = ", ".join(f"{k} {v}" for k, v in sorted(result.states.items()))
        unlisted = f" ({result.unlisted} runs: gone before the scan listed it)" if result.unlisted else ""
        rows.append(
            Row(
                f"{sc.name} vanishes before each step of a scan",
                f"{result.steps} scans",
                f"{states}{unlisted}; {len(result.lies)} false answers",
                ok=not result.lies,
                raw={"lies": result.lies[:5]},
            )
        )
    return rows


async def _kill_once(qmp: str, proc: subprocess.Popen[bytes], delay: float) -> tuple[str, int, float]:
    async with QmpBackend(qmp, timeout=10) as be:
        waiting = asyncio.Event()

        def progress(p: Progress) -> None:
            if p.event == "requested":
                waiting.set()

        task = asyncio.ensure_future(
            Orchestrator(be, None).unplug("pxb-net", force=True, timeout=60, progress=progress)
        )
        await asyncio.wait_for(waiting.wait(), 30)
        await asyncio.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        res = await asyncio.wait_for(task, 90)
        return res.outcome.value, unplug_exit(res), time.monotonic() - killed


def _qemu_kills() -> list[Row]:
    if not have_qemu():
        return [Row("QEMU killed while waiting for DEVICE_DELETED", "-", "skipped: no QEMU")]
    outcomes: Counter[str] = Counter()
    after: list[float] = []
    rng = random.Random(8)
    for _ in range(KILLS):
        with run_qemu("q35") as vm:
            outcome, code, took = asyncio.run(_kill_once(vm.qmp, vm.proc, rng.uniform(0, 1.0)))
        outcomes[f"{outcome} (exit {code})"] += 1
        after.append(took)
    ok = set(outcomes) == {"HYPERVISOR_LOST (exit 9)"}
    return [
        Row(
            "QEMU SIGKILLed while unplugctl waits for DEVICE_DELETED (random 0-1 s into the wait)",
            f"{KILLS} runs",
            f"{', '.join(f'{k} x{v}' for k, v in outcomes.items())}; the wait ended "
            f"{min(after) * 1000:.0f}-{max(after) * 1000:.0f} ms after the kill (timeout 60 s)",
            ok=ok,
        )
    ]


def _libvirtd_restarts() -> list[Row]:
    from tests.integration.private_libvirtd import private_libvirtd
    from tests.integration.test_libvirt_restart import _unplug_with_libvirtd_stopped

    outcomes: Counter[str] = Counter()
    reconnected = 0
    with private_libvirtd() as daemon:
        for _ in range(RESTARTS):
            with daemon.domain("q35") as name:
                res, seen = _unplug_with_libvirtd_stopped(daemon, name, restart=True)
            outcomes[f"{res.outcome.value} (exit {unplug_exit(res)})"] += 1
            reconnected += any(p.detail == "connected to libvirt again" for p in seen)
    ok = set(outcomes) == {"PENDING (exit 7)"} and reconnected == RESTARTS
    return [
        Row(
            "libvirtd restarted while unplugctl waits for a pending detach (no guest to eject it)",
            f"{RESTARTS} runs",
            f"reconnected {reconnected}/{RESTARTS}; {', '.join(f'{k} x{v}' for k, v in outcomes.items())}",
            ok=ok,
        )
    ]


def _broken_pipes() -> list[Row]:
    env = {"PYTHONPATH": str(REPO / ".dev"), "PATH": "/usr/bin:/bin"}
    codes: Counter[int] = Counter()
    noisy = 0
    for _ in range(PIPES):
        r, w = os.pipe()
        os.close(r)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "unplugd.agent.cli", "inspect"],
                stdout=w,
                stderr=subprocess.PIPE,
                env=env,
                text=True,
                timeout=120,
                check=False,
            )
        finally:
            os.close(w)
        codes[done.returncode] += 1
        noisy += bool(done.stderr.strip())
    ok = set(codes) == {EXIT_BROKEN_PIPE} and noisy == 0
    return [
        Row(
            "`unplugd inspect` (this machine) into a pipe whose reader left",
            f"{PIPES} runs",
            f"exit {', '.join(f'{c} x{n}' for c, n in codes.items())}; {noisy} with anything on stderr",
            ok=ok,
        )
    ]


def run(options: Options) -> list[Row]:
    return [*_vanishing(), *_qemu_kills(), *_libvirtd_restarts(), *_broken_pipes()]
