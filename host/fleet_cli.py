"""unplugctl's fleet commands: the I/O around host/fleet.py.

One libvirt connection per --connect URI (opened concurrently, keepalive on), shared by the
domains on it; each domain's agent through its channel (host/channel.py decides socket path or
virStream). Answers are written as they come: --json one object per line (flushed, so a pipe
sees each at once); text one line per domain in target order at the end. Progress on stderr only
when it is a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, TextIO

from unplugd.host.backends.libvirt import LibvirtBackend, in_thread, open_connection, running_domains
from unplugd.host.cli import UsageError, _tls_files, agent_through_libvirt, plan_json, slot_json
from unplugd.host.client import AgentClient
from unplugd.host.errors import HostError
from unplugd.host.fleet import Answer, Question, Selector, State, Target, run_fleet, summary_exit
from unplugd.host.orchestrator import AgentLike, Orchestrator
from unplugd.host.output import print_line
from unplugd.host.planner import SlotPlan
from unplugd.text import display_text

__all__ = ["answer_json", "answer_line", "run_fleet_command"]


def _match_json(sp: SlotPlan) -> dict[str, Any]:
    return {
        "slotPath": sp.slot_path,
        "devices": [
            {"pciPath": str(fp.path), "alias": fp.host.alias, "targets": list(fp.host.targets), "model": fp.host.model}
            for fp in sp.requested
            if fp.host is not None
        ],
    }


def answer_json(a: Answer, question: Question) -> dict[str, Any]:
    """One domain's line of --json. Pure."""
    doc: dict[str, Any] = {
        "uri": a.target.uri,
        "domain": a.target.domain,
        "state": a.state.value,
        "error": a.error,
        "seconds": round(a.seconds, 3),
    }
    if question.device is not None:
        doc["device"] = question.device
        doc["verdict"] = a.slot.verdict.value if a.slot else None
        doc["check"] = slot_json(a.slot) if a.slot else None
    else:
        doc["status"] = plan_json(a.plan, a.target.domain) if a.plan else None
        if question.unpluggable is not None:
            doc["unpluggable"] = [_match_json(sp) for sp in a.matches]
    return doc


def answer_line(a: Answer, question: Question) -> str | None:
    """One domain's line of text (None: filtered out by --unpluggable). Pure."""
    head = f"{a.target.uri} {a.target.domain}"
    if a.state is not State.ANSWERED and not (a.slot or a.plan):
        return f"{head}: {a.state.value.upper()}: {a.error}"
    if question.device is not None and a.slot is not None:
        return f"{head}: {question.device} {a.slot.slot_path} {a.slot.verdict.value}"
    if question.unpluggable is not None:
        if not a.matches:
            return None
        devices = [
            f"{fp.host.alias or fp.path} ({fp.host.model})" for sp in a.matches for fp in sp.requested if fp.host
        ]
        return f"{head}: UNPLUGGABLE now: {', '.join(devices)}"
    assert a.plan is not None
    counts = Counter(sp.verdict.value for sp in a.plan.slots)
    verdicts = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    guest = "guest agent reachable" if a.plan.guest_reachable else f"guest UNREACHABLE ({a.plan.guest_error})"
    return f"{head}: {guest}; {len(a.plan.slots)} slots: {verdicts}"


class _Progress:
    """`[ 37/200] 2 unreachable 0 failed` on one terminal line of stderr; nothing when not a terminal."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total, self.out, self.done = total, out, 0
        self.counts: Counter[State] = Counter()
        self.live = out.isatty()

    def __call__(self, a: Answer) -> None:
        self.done += 1
        self.counts[a.state] += 1
        if self.live:
            self.out.write(
                f"\r[{self.done:>{len(str(self.total))}}/{self.total}] "
                f"{self.counts[State.UNREACHABLE]} unreachable, {self.counts[State.FAILED]} failed"
            )
            self.out.flush()

    def finish(self) -> None:
        if self.live:
            self.out.write("\n")
            self.out.flush()


async def _targets(args: argparse.Namespace, conns: dict[str, Any]) -> tuple[list[Target], list[Answer]]:
    """The domains to ask on each URI, and the answers already known: URIs that cannot be reached,
    named domains running on none of them."""
    failed: list[Answer] = []

    async def connect(uri: str) -> tuple[str, Any, list[str]]:
        conn = await open_connection(uri, args.hypervisor_timeout)
        try:
            return uri, conn, await running_domains(conn, args.hypervisor_timeout)
        except BaseException:
            await in_thread(conn.close)
            raise

    results = await asyncio.gather(*(connect(u) for u in dict.fromkeys(args.connects)), return_exceptions=True)
    targets: list[Target] = []
    found: set[str] = set()
    for uri, r in zip(dict.fromkeys(args.connects), results, strict=True):
        if isinstance(r, HostError):
            failed.append(Answer(Target(uri, "*"), State.UNREACHABLE, f"cannot connect: {r}"))
            continue
        if isinstance(r, BaseException):
            raise r
        _, conn, running = r
        conns[uri] = conn
        names = running if args.all_domains else [n for n in args.vms if n in running]
        found.update(names)
        targets += [Target(uri, n) for n in names]
    for name in dict.fromkeys(args.vms):
        if name not in found:
            where = ", ".join(conns) or "no reachable connection"
            failed.append(Answer(Target("", name), State.UNREACHABLE, f"not running on {where}"))
    return targets, failed


async def run_fleet_command(args: argparse.Namespace) -> int:
    try:
        selector = Selector.parse(args.unpluggable) if getattr(args, "unpluggable", None) else None
    except ValueError as e:
        raise UsageError(f"--unpluggable {e}") from e
    question = Question(device=args.device, unpluggable=selector)
    tls = _tls_files(args)
    conns: dict[str, Any] = {}
    try:
        targets, early = await _targets(args, conns)

        @contextlib.asynccontextmanager
        async def open_(t: Target) -> AsyncIterator[Orchestrator]:
            async with contextlib.AsyncExitStack() as stack:
                lv = LibvirtBackend(t.domain, uri=t.uri, timeout=args.hypervisor_timeout, conn=conns[t.uri])
                await stack.enter_async_context(lv)
                agent: AgentLike | None = None
                address, relay = await agent_through_libvirt(lv, args)
                if address is not None:
                    client = AgentClient(
                        address, relay=relay, timeout=args.agent_timeout, connect_timeout=args.agent_timeout, tls=tls
                    )
                    agent = await stack.enter_async_context(client)
                yield Orchestrator(lv, agent, agent_timeout=args.agent_timeout)

        progress = _Progress(len(targets) + len(early), sys.stderr)

        def emit(a: Answer) -> None:
            progress(a)
            if args.json:
                print(json.dumps(answer_json(a, question)), flush=True)

        for a in early:
            emit(a)
        answers = await run_fleet(
            targets, open_, question, jobs=args.jobs, deadline=args.domain_timeout, on_answer=emit
        )
        progress.finish()
    finally:
        for conn in conns.values():
            with contextlib.suppress(Exception):
                await in_thread(conn.close)
    everything = early + answers
    if not everything:  # --all-domains where nothing runs: say so rather than print nothing at all
        print_line(f"unplugctl: no running domain on {', '.join(dict.fromkeys(args.connects))}", sys.stderr)
    if not args.json:
        for a in everything:
            line = answer_line(a, question)
            if line is not None:
                print_line(line, sys.stdout)
    if question.unpluggable is not None:
        hits = sum(1 for a in everything if a.matches)
        print(
            display_text(
                f"{hits} of {len(everything)} domain(s) have a device matching {selector} that is UNPLUGGABLE now"
            ),
            file=sys.stderr,
        )
    return summary_exit(everything)
