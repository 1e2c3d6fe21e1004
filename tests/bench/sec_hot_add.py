"""Section 8 (issue 11): the seed's case on a real guest, a VM with 128 NICs (16 slots x 8 functions).

A real Debian guest under TCG (tests/vm GuestVM, pc: ACPI hotplug on the root bus) with our packages
installed, its NICs on QEMU's user network with restrict=on (nothing reaches outside):
- boot time; `unplugd inspect --json` timed inside the guest; GetReport round trip over the
  virtio-serial channel; `unplugctl status` and `unplugctl slots` (in-process: no interpreter start);
- `unplugctl plug` of one 8-function NIC slot to guest-confirmed (every function PRESENT with its
  interface) and `unplugctl unplug` of it, each against the same sequence sent by hand over QMP:
  netdev_add x8, device_add functions 1..7 then 0 (then polled until the guest shows 8 interfaces),
  and device_del of function 0 until all 8 DEVICE_DELETED.
--quick: 4 slots x 8 (32 NICs), one run of each.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

from tests.bench.results import Row, SectionResult, part

__all__ = ["run"]

KEY = "hotadd"
TITLE = "8. hot-add: a VM with 128 NICs (16 slots x 8; --quick: 32), plug and unplug of a whole slot (issue 11)"
FUNCTIONS = 8  # a PCI slot's functions: the case that needs multifunction slots
FIRST_SLOT = 0x2  # pc: 0 host bridge, 1 PIIX3
PLUG_SLOT = 0x1C  # free in either size; below the harness' virtio-serial at 0x1e
PLUG_TIMEOUT = 600.0  # TCG on 2 shared cores, 8 virtio-net drivers binding at once


def _nic_slots(slots: int) -> Any:
    """slots x 8 virtio-net functions on pci.0, each on its own user network with restrict=on.

    romfile= (no option ROM): SeaBIOS would otherwise run 128 iPXE ROMs at boot, and has room for only
    a few. vectors=0 (legacy INTx): virtio-net takes 3 MSI-X vectors (config, rx, tx) and one vCPU has
    about 200; with 128 NICs the probes run out (measured: virtio_console's probe, the agent's port,
    failed with ENOSPC after the 128th NIC). The bench's NICs carry no traffic."""
    from tests.vm import Device

    args: list[str] = []
    for s in range(FIRST_SLOT, FIRST_SLOT + slots):
        for f in range(FUNCTIONS):
            qid = f"n{s:02x}{f}"
            mf = ",multifunction=on" if f == 0 else ""
            nic = f"virtio-net-pci,netdev=net-{qid},id={qid},romfile=,vectors=0,addr={s:#x}.{f}{mf}"
            args += ["-netdev", f"user,id=net-{qid},restrict=on", "-device", nic]
    return Device(tuple(args))


def _unplugctl(vm: Any, *args: str) -> tuple[int, str, str]:
    from tests.e2e.real_kernel import unplugctl

    return unplugctl(vm, *args)


def _timed(fn: Callable[[], Any], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _row(what: str, samples: list[float], note: str = "", versus: str = "") -> Row:
    return Row(
        what,
        median_ms=statistics.median(samples) * 1000,
        min_ms=min(samples) * 1000,
        runs=len(samples),
        note=note,
        versus=versus,
        raw={"samples_s": samples},
    )


def _guest_ms(vm: Any, command: str) -> float:
    """A command timed inside the guest (qemu-ga's own round trips left out)."""
    out = vm.exec(f"s=$(date +%s%N); {command} >/dev/null; e=$(date +%s%N); echo $(((e-s)/1000))", check=True,
                  timeout=600).stdout  # fmt: skip
    return int(out.strip()) / 1e6


def _get_report_rtt(vm: Any, runs: int) -> list[float]:
    from unplugd.host.client import AgentClient

    async def go() -> list[float]:
        out = []
        async with AgentClient(f"serial:{vm.agent_socket}", timeout=120, connect_timeout=30) as c:
            await c.get_report()
            for _ in range(runs):
                t0 = time.perf_counter()
                await c.get_report()
                out.append(time.perf_counter() - t0)
        return out

    return asyncio.run(go())


def _specs(tag: str) -> tuple[list[str], list[str]]:
    specs = [f"virtio-net-pci,netdev={tag}b{f},id={tag}{f}" for f in range(FUNCTIONS)]
    netdevs = [f"--netdev=user,id={tag}b{f},restrict=on" for f in range(FUNCTIONS)]
    return specs, netdevs


def _guest_nics_at(vm: Any, slot: int) -> int:
    # a virtio NIC's interface hangs below its virtio device, not the PCI function
    out = vm.exec(f"ls -d /sys/bus/pci/devices/0000:00:{slot:02x}.*/virtio*/net/* 2>/dev/null | wc -l",
                  timeout=60).stdout  # fmt: skip
    return int(out.strip() or 0)


def _by_hand_plug(vm: Any, tag: str) -> tuple[float, float]:
    """The same sequence over QMP by hand: (seconds for the commands, seconds until the guest shows 8 NICs)."""
    t0 = time.perf_counter()
    for f in range(FUNCTIONS):
        vm.qmp("human-monitor-command", {"command-line": f"netdev_add user,id={tag}b{f},restrict=on"})
    for f in [*range(1, FUNCTIONS), 0]:
        args = {"driver": "virtio-net-pci", "netdev": f"{tag}b{f}", "id": f"{tag}{f}", "bus": "pci.0",
                "addr": f"{PLUG_SLOT:#x}.{f}"}  # fmt: skip
        if f == 0:
            args["multifunction"] = "on"
        vm.qmp("device_add", args)
    sent = time.perf_counter() - t0
    deadline = time.monotonic() + PLUG_TIMEOUT
    while _guest_nics_at(vm, PLUG_SLOT) < FUNCTIONS:
        if time.monotonic() > deadline:
            raise RuntimeError("the guest did not show 8 interfaces")
        time.sleep(0.2)  # polling by hand is what a script without the agent does
    return sent, time.perf_counter() - t0


def _by_hand_unplug(vm: Any, tag: str) -> float:
    t0 = time.perf_counter()
    vm.qmp("device_del", {"id": f"{tag}0"})
    for f in range(FUNCTIONS):
        vm.wait_event("DEVICE_DELETED", PLUG_TIMEOUT, device=f"{tag}{f}")
    elapsed = time.perf_counter() - t0
    for f in range(FUNCTIONS):
        with contextlib.suppress(Exception):
            vm.qmp("netdev_del", {"id": f"{tag}b{f}"})
    return elapsed


def run(quick: bool) -> SectionResult:
    result = SectionResult(KEY, TITLE)
    if shutil.which("qemu-system-x86_64") is None:
        result.skipped = "needs qemu-system-x86_64"
        return result
    from tests.e2e.real_kernel import CONFIG
    from tests.vm import GuestVM

    slots = 4 if quick else 16
    runs = 1 if quick else 3
    nics = slots * FUNCTIONS
    t0 = time.monotonic()
    vm = GuestVM("pc", (), [_nic_slots(slots)], memory_mb=2048, config=CONFIG, name="unplugd-bench-hotadd")
    with vm:
        boot = vm.wait_booted(timeout=1800)
        result.rows.append(Row(f"boot, {nics} NICs in {slots} slots x 8 (TCG)", value=f"{boot:.0f} s",
                               note="qemu-ga answering and systemd finished"))  # fmt: skip
        count = vm.exec("ls -d /sys/class/net/en* | wc -l", check=True).stdout.strip()
        result.notes.append(f"the guest shows {count} of {nics} NICs as interfaces")

        def inspect() -> None:
            samples = [_guest_ms(vm, "unplugd inspect --json") for _ in range(runs)]
            result.rows.append(_row("`unplugd inspect --json` in the guest", samples, note="timed inside the guest"))

        def rtt() -> None:
            result.rows.append(_row("GetReport round trip (virtio-serial)", _get_report_rtt(vm, runs * 3)))

        def cli(command: str) -> Callable[[], None]:
            def measure() -> None:
                def once() -> None:
                    rc, _, err = _unplugctl(vm, command)
                    if rc != 0:
                        raise RuntimeError(f"unplugctl {command} exited {rc}: {err.strip()[-200:]}")

                once()  # warm: the first call connects the relay and imports the backends
                result.rows.append(_row(f"`unplugctl {command}` (in-process)", _timed(once, runs)))

            return measure

        part(result, "inspect", inspect)
        part(result, "GetReport", rtt)
        part(result, "status", cli("status"))
        part(result, "slots", cli("slots"))

        def plug_unplug() -> None:
            specs, netdevs = _specs("hp")
            t = time.perf_counter()
            rc, out, _ = _unplugctl(vm, "plug", *specs, *netdevs, "--slot", f"pci.0:{PLUG_SLOT:#x}",
                                    "--timeout", str(PLUG_TIMEOUT))  # fmt: skip
            plugged = time.perf_counter() - t
            if rc != 0:
                raise RuntimeError(f"plug exited {rc}: {out.strip()[-300:]}")
            what = "plug 8-function NIC slot -> every function PRESENT (unplugctl)"
            result.rows.append(Row(what, value=f"{plugged:.1f} s", note="device_add x8 + the agent's confirmation"))
            t = time.perf_counter()
            rc, out, _ = _unplugctl(vm, "unplug", f"0000:00/{PLUG_SLOT:02x}", "--timeout", str(PLUG_TIMEOUT))
            unplugged = time.perf_counter() - t
            if rc != 0:
                raise RuntimeError(f"unplug exited {rc}: {out.strip()[-300:]}")
            what = "unplug that slot -> all gone, guest confirmed (unplugctl)"
            result.rows.append(Row(what, value=f"{unplugged:.1f} s", note="check, device_del, 8 DEVICE_DELETED, agent"))

        def by_hand() -> None:
            hand_sent, hand_seen = _by_hand_plug(vm, "bh")
            result.rows.append(Row("the same 8 device_adds by hand over QMP", value=f"{hand_sent * 1000:.0f} ms",
                                   note=f"8 interfaces seen in the guest (polled via qemu-ga) after "
                                        f"{hand_seen:.1f} s; nothing confirms drivers or rolls back"))  # fmt: skip
            hand_del = _by_hand_unplug(vm, "bh")
            result.rows.append(Row("device_del by hand + 8 DEVICE_DELETED", value=f"{hand_del:.1f} s",
                                   note="no check before, no guest confirmation after"))  # fmt: skip

        part(result, "plug/unplug", plug_unplug)
        part(result, "by hand", by_hand)
        with contextlib.suppress(Exception):
            result.notes.append(f"unplugd's agent RSS in the guest: {_agent_rss(vm)}")
    result.seconds = time.monotonic() - t0
    return result


def _agent_rss(vm: Any) -> str:
    out = vm.exec("grep VmRSS /proc/$(systemctl show -p MainPID --value unplugd)/status", timeout=30).stdout
    return " ".join(out.split()[1:]) or "?"
