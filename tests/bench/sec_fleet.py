"""Section 7 (issue 12): fleet status of 200 domains across several libvirt connections.

The hypervisors: a private libvirtd listening on loopback TCP serving libvirt's test driver, four
node files of 50 domains each (test+tcp://127.0.0.1:PORT/DIR/node-K.xml): four remote connections,
real libvirt RPC, each domain's XML the live XML a real q35 domain (TCG, no guest OS) got from this
libvirtd. The guests: fake agents in a separate process, one unix socket per domain, answering a
canned report that lists every PCI function of that layout as READY (made from the topology).

Measured in one process through host/fleet.py: the fleet (a connection per URI, shared, --jobs 16
at a time) against one domain at a time (a connection each, one after another, what a loop over
domains does), and the loop of `unplugctl status` processes itself (timed on a few, times 200).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.bench import commands
from tests.bench.measure import Timing, spawn, stop, time_command
from tests.bench.results import Row, SectionResult, Skipped, compare

__all__ = ["run"]

KEY = "fleet"
TITLE = "7. fleet status: 200 domains over 4 remote libvirt connections (issue 12)"
DOMAINS = 200
CONNECTIONS = 4
SAMPLED_PROCESSES = 3  # `unplugctl status` processes timed for the per-domain loop (each ~0.5 s)
TIMEOUT_S = 60.0


def _live_xml() -> tuple[Any, Any, str]:
    """A private libvirtd on loopback TCP, and the live XML of a real q35 domain it ran."""
    import libvirt

    from tests.integration.private_libvirtd import private_libvirtd

    daemon_cm = private_libvirtd(tcp=True)
    daemon = daemon_cm.__enter__()
    try:
        with daemon.domain("q35") as name:
            conn = libvirt.open(daemon.uri)
            try:
                xml = str(conn.lookupByName(name).XMLDesc(0))
            finally:
                conn.close()
    except BaseException:
        daemon_cm.__exit__(None, None, None)
        raise
    return daemon_cm, daemon, xml


def _node_files(xml: str, directory: Path) -> list[Path]:
    """CONNECTIONS node files for the test driver, DOMAINS domains in all, each the live XML renamed."""
    one = re.sub(r"<domain type='qemu'[^>]*>", "<domain type='test'>", xml)
    one = re.sub(r"<uuid>[^<]*</uuid>", "", one)
    one = re.sub(r"<name>[^<]*</name>", "<name>{name}</name>", one)
    files = []
    per = DOMAINS // CONNECTIONS
    for k in range(CONNECTIONS):
        doms = "".join(one.replace("{name}", f"vm-{k * per + i:03d}") for i in range(per))
        path = directory / f"node-{k}.xml"
        path.write_text(f"<node>{doms}</node>")
        files.append(path)
    return files


def _report(xml: str) -> bytes:
    from unplugd.host.backends.libvirt import parse_domain_xml
    from unplugd.v1 import agent_service_pb2 as pb
    from unplugd.v1 import report_pb2

    topo = parse_domain_xml(xml).topology
    r = report_pb2.Report(hostname="fleet-guest")
    for slot in topo.slots:
        for f in slot.functions:
            if f.guest_address is not None:
                r.functions.add(
                    address=str(f.guest_address), pci_path=str(f.path), state=report_pb2.FUNCTION_STATE_READY
                )
    return pb.GetReportResponse(report=r).SerializeToString()


async def _fleet(targets: list[Any], agents: dict[Any, Path], jobs: int, shared: bool) -> tuple[float, list[Any]]:
    from unplugd.host.backends.libvirt import LibvirtBackend, in_thread, open_connection
    from unplugd.host.client import AgentClient
    from unplugd.host.fleet import Question, run_fleet
    from unplugd.host.orchestrator import Orchestrator

    t0 = time.perf_counter()
    conns: dict[str, Any] = {}
    if shared:
        uris = sorted({t.uri for t in targets})
        for uri, conn in zip(uris, await asyncio.gather(*(open_connection(u, TIMEOUT_S) for u in uris)), strict=True):
            conns[uri] = conn

    @contextlib.asynccontextmanager
    async def open_(t: Any) -> AsyncIterator[Orchestrator]:
        conn = conns.get(t.uri) or await open_connection(t.uri, TIMEOUT_S)
        try:
            lv = LibvirtBackend(t.domain, uri=t.uri, timeout=TIMEOUT_S, conn=conn)
            async with lv, AgentClient(f"unix:{agents[t]}", timeout=TIMEOUT_S, connect_timeout=TIMEOUT_S) as agent:
                yield Orchestrator(lv, agent, agent_timeout=TIMEOUT_S)
        finally:
            if t.uri not in conns:
                await in_thread(conn.close)

    answers = await run_fleet(targets, open_, Question(), jobs=jobs, deadline=TIMEOUT_S)
    for conn in conns.values():
        await in_thread(conn.close)
    return time.perf_counter() - t0, answers


def _row(
    what: str, samples: list[float], answers: list[Any], ref_s: float | None, note: str = "", ours: str = "fleet"
) -> Row:
    from unplugd.host.fleet import State

    t = Timing(samples_s=samples)
    bad = [a for a in answers if a.state is not State.ANSWERED]
    per = sorted(a.seconds for a in answers)
    note = (
        f"per domain median {per[len(per) // 2] * 1000:.0f} ms, max {per[-1] * 1000:.0f} ms; "
        f"{len(bad)} not answered" + (f" ({bad[0].error})" if bad else "") + (f"; {note}" if note else "")
    )
    return Row(
        what,
        median_ms=t.median_ms,
        min_ms=t.min_ms,
        runs=len(samples),
        versus=compare(t.median_s, ref_s, ours=ours) if ref_s else "",
        note=note,
        raw={"samples_s": samples, "not_answered": len(bad)},
    )


def run(quick: bool) -> SectionResult:
    result = SectionResult(KEY, TITLE)
    t0 = time.monotonic()
    runs = 1 if quick else 3
    try:
        status_argv = commands.unplugctl_argv("status")
        import pytest  # private_libvirtd skips through pytest when root, libvirtd or QEMU are missing

        try:
            daemon_cm, daemon, xml = _live_xml()
        except pytest.skip.Exception as exc:
            raise Skipped(str(exc)) from exc
    except Skipped as exc:
        result.skipped = str(exc)
        return result
    from unplugd.host.fleet import Target

    with contextlib.ExitStack() as stack:
        stack.callback(daemon_cm.__exit__, None, None, None)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="unplugd-bench-fleet-")))
        nodes = _node_files(xml, tmp)
        (tmp / "report.bin").write_bytes(_report(xml))
        (tmp / "agents").mkdir()
        agents_proc = spawn(
            [
                sys.executable,
                "-m",
                "tests.bench.fleet_agents",
                "--dir",
                str(tmp / "agents"),
                "--count",
                str(DOMAINS),
                "--report",
                str(tmp / "report.bin"),
            ],
            cwd=str(commands.REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(stop, agents_proc)
        assert agents_proc.stdout is not None
        if agents_proc.stdout.readline().strip() != b"ready":
            result.skipped = f"the fake agents did not start (exit {agents_proc.poll()})"
            return result
        per = DOMAINS // CONNECTIONS
        targets: list[Target] = []
        agents: dict[Target, Path] = {}
        for k, node in enumerate(nodes):
            uri = f"test+tcp://127.0.0.1:{daemon.tcp_port}{node}"
            for i in range(per):
                t = Target(uri, f"vm-{k * per + i:03d}")
                targets.append(t)
                agents[t] = tmp / "agents" / f"agent-{len(agents)}.sock"

        def measure(jobs: int, shared: bool) -> tuple[list[float], list[Any]]:
            samples: list[float] = []
            answers: list[Any] = []
            for _ in range(runs):
                wall, answers = asyncio.run(_fleet(targets, agents, jobs, shared))
                samples.append(wall)
            return samples, answers

        seq_s, seq_answers = measure(1, shared=False)
        seq = statistics.median(seq_s)
        result.rows.append(
            _row(
                f"one domain at a time: {DOMAINS} domains, a connection each (wall)",
                seq_s,
                seq_answers,
                None,
                "the ratio's baseline",
            )
        )
        s, a = measure(1, shared=True)
        result.rows.append(
            _row(
                f"one domain at a time, {CONNECTIONS} shared connections (wall)",
                s,
                a,
                seq,
                "what sharing the connection alone saves",
                ours="shared",
            )
        )
        for jobs in (16, 64):
            s, a = measure(jobs, shared=True)
            result.rows.append(
                _row(f"fleet --jobs {jobs}: {DOMAINS} domains, {CONNECTIONS} shared connections (wall)", s, a, seq)
            )
        # the shell loop: one `unplugctl status` process per domain, sampled
        t = targets[0]
        argv = [*status_argv, t.domain, "--connect", t.uri, "--agent", f"unix:{agents[t]}", "--json"]
        proc = time_command(argv, SAMPLED_PROCESSES, warmup=1, timeout_s=120)
        loop_s = proc.median_s * DOMAINS
        result.rows.append(
            Row(
                f"`unplugctl status DOMAIN` x {DOMAINS}, one process each (estimated)",
                median_ms=loop_s * 1000,
                runs=SAMPLED_PROCESSES,
                versus=compare(loop_s, seq, ours="process loop"),
                note=f"{proc.median_ms:.0f} ms per process (median of {SAMPLED_PROCESSES}) x {DOMAINS}",
                raw={"samples_s": proc.samples_s},
            )
        )
    result.notes.append(
        f"{CONNECTIONS} test+tcp:// connections to one private libvirtd on loopback (real RPC, test driver), "
        f"{DOMAINS} domains whose XML is the live XML of a real q35 domain; fake agents (a separate process) "
        "answer a canned report listing that layout's functions READY. No network latency: real remote links "
        "add a round trip per call, which the fleet overlaps and the loop pays serially; on loopback the "
        "shared connections, not the concurrency, make the difference (no latency to overlap here)."
    )
    result.seconds = time.monotonic() - t0
    return result
