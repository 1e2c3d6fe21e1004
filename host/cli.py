"""unplugctl: is it safe to hot-unplug this PCI device from the VM, and do it.

Library code lives in planner/orchestrator; this module parses arguments,
opens the hypervisor backend and the agent client, prints, and maps results
to exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import AsyncIterator, Sequence

from unplugd.host.errors import AmbiguousDevice, DeviceNotFound, HostError
from unplugd.host.exitcodes import Exit
from unplugd.host.output import print_line, progress_line
from unplugd.host.usage import EPILOG, command_parser, parser
from unplugd.leaselabel import lease_label
from unplugd.stdio import broken_pipe, flush_stdout, log_to_stderr

# Start-up is part of every command's time: `--help` and a usage error import only the
# standard library and usage.py; asyncio, grpc, protobuf and the planner come with the
# command that needs them (inside the functions below). Not even typing and dataclasses
# (~4 and ~12 ms of a ~40 ms --help): mypy takes any name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TextIO

    from unplugd.host.backends.libvirt import LibvirtBackend
    from unplugd.host.client import AgentAddress, TlsFiles
    from unplugd.host.orchestrator import AgentLike, Backend, Orchestrator, UnplugResult
    from unplugd.host.planner import FunctionPlan, Plan, SlotPlan, Verdict
    from unplugd.host.relays import Relay

__all__ = ["EPILOG", "EXIT", "main", "open_session", "parser"]  # noqa: F822 (EXIT: __getattr__ below)


@functools.cache
def _exit_by_verdict() -> dict[Verdict, int]:
    """check / wait-ready / a refused unplug exit with the verdict's code."""
    from unplugd.host.planner import Verdict

    return {
        Verdict.UNPLUGGABLE: Exit.OK,
        Verdict.BLOCKED_BY_GUEST: Exit.BLOCKED_BY_GUEST,
        Verdict.GUEST_UNREACHABLE: Exit.GUEST_UNREACHABLE,
        Verdict.NOT_HOTPLUGGABLE: Exit.NOT_HOTPLUGGABLE,
        Verdict.NEEDS_COMPANIONS: Exit.NEEDS_COMPANIONS,
    }


def __getattr__(name: str) -> dict[Verdict, int]:
    """`cli.EXIT`, built when first asked for: it needs the planner, which `--help` does not."""
    if name == "EXIT":
        return _exit_by_verdict()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


EXIT_FAILURE, EXIT_USAGE, EXIT_PENDING, EXIT_UNCONFIRMED = Exit.FAILURE, Exit.USAGE, Exit.PENDING, Exit.UNCONFIRMED
EXIT_HYPERVISOR_LOST = Exit.HYPERVISOR_LOST


class UsageError(HostError):
    pass


class Session:
    """What open_session yields: the VM's backend, its agent client (None: unreachable) and its name."""

    def __init__(self, backend: Backend, agent: AgentLike | None, vm: str) -> None:
        self.backend = backend
        self.agent = agent
        self.vm = vm


@contextlib.asynccontextmanager
async def open_session(args: argparse.Namespace) -> AsyncIterator[Session]:
    """The backend and agent client for the VM the arguments name. Tests replace this.

    An agent named on the command line is opened first and, for a command that reads the report
    first, asked for it at once (AgentClient.start_report): the agent scans while this process
    imports and connects the backend and reads the topology.
    """
    from unplugd.host.client import AgentClient

    async with contextlib.AsyncExitStack() as stack:

        async def open_agent(address: str | AgentAddress, relay: Relay | None) -> AgentLike:
            try:
                client = AgentClient(
                    address,
                    relay=relay,
                    timeout=args.agent_timeout,
                    connect_timeout=args.agent_timeout,
                    tls=_tls_files(args),
                )
            except ValueError as e:  # the parser's reasons begin with the address itself: say it once
                why = str(e).removeprefix(f"{str(address)!r}: ")
                raise UsageError(f"bad agent address {str(address)!r}: {why}") from e
            agent = await stack.enter_async_context(client)
            if _reads_report_first(args):
                await client.start_report(timeout=args.agent_timeout)
            return agent

        backend: Backend
        agent: AgentLike | None = await open_agent(args.agent, None) if args.agent else None
        if args.qmp:
            from unplugd.host.backends.qmp import QmpBackend

            qmp = QmpBackend(args.qmp, timeout=args.hypervisor_timeout)
            await stack.enter_async_context(qmp)
            backend, vm = qmp, args.vm or args.qmp
        else:
            from unplugd.host.backends.libvirt import LibvirtBackend

            lv = LibvirtBackend(args.vm, uri=args.connect, timeout=args.hypervisor_timeout)
            await stack.enter_async_context(lv)
            backend, vm = lv, args.vm
            if not args.agent:
                address, relay = await agent_through_libvirt(lv, args)
                agent = await open_agent(address, relay) if address else None
        yield Session(backend, agent, vm)


async def agent_through_libvirt(
    lv: LibvirtBackend, args: argparse.Namespace
) -> tuple[AgentAddress | None, Relay | None]:
    """The domain's agent channel: its socket path, or a virStream through libvirt (host/channel.py)."""
    from unplugd.host.backends.libvirt import AGENT_CHANNEL
    from unplugd.host.channel import ChannelRelay, route
    from unplugd.host.client import AgentAddress

    path = await lv.agent_channel()
    how = route(lv.uri, args.agent_channel, path)
    if how is None or path is None:
        return None, None
    if how == "socket":
        return AgentAddress("serial", path=path), None
    label = f"{AGENT_CHANNEL} of {lv.domain_name} on {lv.uri}"
    # the relay gives up a little before the client, so that its reason reaches the caller (as in client.py)
    relay = ChannelRelay(lv.open_channel, label, force=args.force_channel, connect_timeout=args.agent_timeout * 0.8)
    return AgentAddress("channel", path=label), relay


def _reads_report_first(args: argparse.Namespace) -> bool:
    """status, check and unplug begin with the guest's full report (Orchestrator.snapshot); the hook-first
    paths (release, unplug --release), wait-ready's watch and the hot-add commands do not."""
    return args.command in ("status", "check", "unplug") and not getattr(args, "release", False)


def _tls_files(args: argparse.Namespace) -> TlsFiles | None:
    """Mutual TLS for tcp: agents needs all three files or none."""
    from unplugd.host.client import TlsFiles

    given = [args.tls_ca, args.tls_cert, args.tls_key]
    if not any(given):
        return None
    if not all(given):
        raise UsageError("mutual TLS needs --tls-ca, --tls-cert and --tls-key together")
    return TlsFiles(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


# ------------------------------------------------------------------ output


def _function_json(fp: FunctionPlan) -> dict[str, Any]:
    h, g = fp.host, fp.guest
    return {
        "pciPath": str(fp.path),
        "name": fp.name,
        "requested": fp.requested,
        "behindBridge": fp.behind_bridge,
        "host": None
        if h is None
        else {
            "model": h.model,
            "id": h.qemu_id,
            "alias": h.alias,
            "targets": list(h.targets),
            "qomPath": h.qom_path,
            "hotpluggable": h.hotpluggable,
            "address": str(h.guest_address) if h.guest_address else None,
        },
        "guest": None
        if g is None
        else {
            "address": g.address,
            "driver": g.driver,
            "blockDevices": list(g.block_devices),
            "netInterfaces": list(g.net_interfaces),
            "reasons": [
                {"code": r.code, "detail": r.detail, "blocking": r.blocking, "object": r.object} for r in g.reasons
            ],
        },
        "guestState": fp.guest_state,
    }


def slot_json(sp: SlotPlan) -> dict[str, Any]:
    bus = sp.slot.bus if sp.slot else None
    return {
        "slotPath": sp.slot_path,
        "verdict": sp.verdict.value,
        "bus": None if bus is None else {"kind": bus.kind.value, "name": bus.name, "mechanism": bus.mechanism},
        "hotpluggable": sp.hotplug.supported,
        "hotplugReason": sp.hotplug.reason,
        "multifunction": bool(sp.slot and sp.slot.multifunction),
        "findings": [
            {"verdict": f.verdict.value, "detail": f.detail, "pciPath": str(f.path) if f.path else None}
            for f in sp.findings
        ],
        "functions": [_function_json(fp) for fp in sp.functions],
        "steps": [
            {
                "step": s.kind.value,
                "detail": s.detail,
                "target": s.target.name if s.target else None,
                "viaMonitor": s.via_monitor,
                "pciPaths": [str(p) for p in s.paths],
            }
            for s in sp.steps
        ],
    }


def plan_json(p: Plan, vm: str) -> dict[str, Any]:
    return {
        "vm": vm,
        "guestReachable": p.guest_reachable,
        "guestError": p.guest_error,
        "slots": [slot_json(s) for s in p.slots],
        "guestOnly": [{"address": g.address, "pciPath": str(g.path)} for g in p.guest_only],
        "hostOnly": [{"name": f.name, "pciPath": str(f.path)} for f in p.host_only],
        "guestProblems": list(p.guest_problems),
    }


def result_json(r: UnplugResult) -> dict[str, Any]:
    return {
        "outcome": r.outcome.value,
        "message": r.message,
        "plan": slot_json(r.plan) if r.plan else None,
        "functions": [
            {
                "pciPath": str(f.path),
                "name": f.name,
                "requested": f.requested,
                "removed": f.removed,
                "guestGone": f.guest_gone,
            }
            for f in r.functions
        ],
        "overridden": [{"verdict": f.verdict.value, "detail": f.detail} for f in r.overridden],
        # the label, never the id: a credential, and this output ends up in logs (unplugd.leaselabel)
        "leaseLabel": lease_label(r.lease_id) if r.lease_id else "",
        "leaseReleased": r.lease_released,
        "notes": list(r.notes),
        "timings": r.timings,
    }


def _print_lines(lines: list[str], out: TextIO) -> None:
    """Lines from host/render.py: escaped piece by piece there, so only its own colour codes remain."""
    out.write("".join(f"{line}\n" for line in lines))


def _print_slot(sp: SlotPlan, out: TextIO, *, steps: bool = False) -> None:
    from unplugd.host import render

    colour = render.wants_colour(out, os.environ)
    _print_lines(render.slot_lines(sp, verbose=True, colour=colour, steps=steps), out)


def print_plan(p: Plan, vm: str, out: TextIO, *, show_all: bool = False, verbose: bool = False) -> None:
    from unplugd.host import render

    colour = render.wants_colour(out, os.environ)
    _print_lines(render.plan_lines(p, vm, show_all=show_all, verbose=verbose, colour=colour), out)


def print_result(r: UnplugResult, out: TextIO) -> None:
    from unplugd.host.orchestrator import Outcome

    if r.plan is not None:
        _print_slot(r.plan, out, steps=r.outcome is Outcome.DRY_RUN)
    for finding in r.overridden:
        print_line(f"FORCED: overriding {finding.verdict.value}: {finding.detail}", out)
    for f in r.functions:
        gone = {True: "gone from the guest", False: "STILL IN THE GUEST", None: "guest not confirmed"}[f.guest_gone]
        state = "removed" if f.removed else "NOT removed"
        print_line(f"  {f.name} ({f.path}): {state}, {gone}", out)
    for n in r.notes:
        print_line(f"  note: {n}", out)
    print_line(f"{r.outcome.value}: {r.message}", out)


def _print_json(doc: dict[str, Any]) -> None:
    """Indented for a person at a terminal; one line for a program. The same document either way:
    indenting takes json's pure-Python encoder, ~6x slower than its C one (50 ms on a 256-function
    VM's status here: most of what unplugctl itself spends printing)."""
    import json

    print(json.dumps(doc, indent=2 if sys.stdout.isatty() else None))


# ------------------------------------------------------------------ commands


def unplug_exit(r: UnplugResult) -> int:
    from unplugd.host.orchestrator import Outcome

    if r.outcome in (Outcome.UNPLUGGED, Outcome.DRY_RUN):
        return Exit.OK
    if r.outcome in (Outcome.REFUSED, Outcome.GUEST_CHANGED) and r.plan is not None:
        return _exit_by_verdict()[r.plan.verdict]
    if r.outcome is Outcome.PENDING:
        return EXIT_PENDING
    if r.outcome is Outcome.UNPLUGGED_UNCONFIRMED:
        return EXIT_UNCONFIRMED
    if r.outcome is Outcome.HYPERVISOR_LOST:
        return EXIT_HYPERVISOR_LOST
    return EXIT_FAILURE


async def run(args: argparse.Namespace) -> int:
    if getattr(args, "fleet", False):
        from unplugd.host.fleet_cli import run_fleet_command

        return await run_fleet_command(args)
    async with open_session(args) as s:
        # imported once the session is open: the agent may be scanning for us meanwhile (open_session)
        from unplugd.host.orchestrator import Orchestrator

        EXIT = _exit_by_verdict()
        orch = Orchestrator(s.backend, s.agent, agent_timeout=args.agent_timeout)
        if args.command in ("slots", "plug"):
            from unplugd.host.cli_plug import run_hot_add

            return await run_hot_add(args, orch, s.vm, print_json=_print_json)
        if args.command == "status":
            p = await orch.status()
            if args.json:
                _print_json(plan_json(p, s.vm))
            else:
                print_plan(p, s.vm, sys.stdout, show_all=args.all, verbose=args.verbose)
            return 0
        if args.command == "check":
            sp = await orch.check(args.device)
            if args.json:
                _print_json(slot_json(sp))
            else:
                _print_slot(sp, sys.stdout, steps=True)  # every finding too (verbose)
            return EXIT[sp.verdict]
        if args.command == "wait-ready":
            sp = await orch.wait_ready(args.device, timeout=args.timeout, progress=None if args.json else progress_line)
            if args.json:
                _print_json(slot_json(sp))
            else:
                _print_slot(sp, sys.stdout)  # verbose: its findings say why it ended so
                print(sp.verdict.value)
            return EXIT[sp.verdict]
        if args.command == "release" or args.release:
            return await _release(orch, args)
        r = await orch.unplug(
            args.device,
            with_companions=args.with_companions,
            prepare=args.prepare,
            force=args.force,
            dry_run=args.dry_run,
            timeout=args.timeout,
            progress=progress_line,
        )
        if args.json:
            _print_json(result_json(r))
        else:
            print_result(r, sys.stdout)
        return unplug_exit(r)


async def _release(orch: Orchestrator, args: argparse.Namespace) -> int:
    """`release`, and `unplug --release`: the guest's hooks first (host/release.py)."""
    from unplugd.host.release import release_exit, release_json, release_slot, unplug_released

    if args.command == "release":
        rel, r = await release_slot(orch, args.device, timeout=args.timeout, progress=progress_line), None
    else:
        rel, r = await unplug_released(
            orch,
            args.device,
            timeout=args.timeout,
            with_companions=args.with_companions,
            force=args.force,
            dry_run=args.dry_run,
            progress=progress_line,
        )
    if args.json:
        doc = (
            release_json(rel)
            if args.command == "release"
            else {"release": release_json(rel), "unplug": result_json(r) if r else None}
        )
        _print_json(doc)
    else:
        if r is not None:
            print_result(r, sys.stdout)
        print_line(("RELEASED: " if rel.released else "NOT RELEASED: ") + rel.message, sys.stdout)
    return unplug_exit(r) if r is not None else release_exit(rel)


def _split_target(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    t: list[str] = args.target
    want = 0 if args.command in ("status", "slots") else 1
    args.connects = args.connect or ["qemu:///system"]
    args.connect = args.connects[0]
    args.fleet = _is_fleet(args)
    if args.fleet:
        if args.qmp:
            p.error("fleet commands (several VMs or --connect URIs, --all-domains, --unpluggable) are libvirt's")
        if getattr(args, "unpluggable", None) and args.command != "status":
            p.error("--unpluggable is a status option")
        domains = t[: len(t) - want]
        if len(t) < want or (not domains and not args.all_domains) or (domains and args.all_domains):
            p.error(f"{args.command} over a fleet takes --all-domains or VM..." + (" and then DEVICE" if want else ""))
        args.vms, args.vm, args.device = domains, None, t[-1] if want else None
        return
    if len(args.connects) > 1:
        p.error(f"{args.command} takes one --connect URI")
    if args.command == "plug":
        from unplugd.host.cli_plug import split_plug_target

        split_plug_target(p, args)
        return
    if args.qmp and len(t) == want:
        args.vm = None
    elif len(t) == want + 1:
        args.vm = t[0]
    else:
        form = "VM" if want == 0 else "VM DEVICE"
        p.error(f"{args.command} takes {form}" + (" (VM may be omitted with --qmp)" if args.qmp else ""))
    args.device = t[-1] if want else None


def _is_fleet(args: argparse.Namespace) -> bool:
    """status/check over several domains: more than one VM or URI, --all-domains or --unpluggable."""
    if args.command not in ("status", "check"):
        return False
    vms = len(args.target) - (0 if args.command == "status" else 1)
    return bool(args.all_domains or len(args.connects) > 1 or vms > 1 or getattr(args, "unpluggable", None))


def main(argv: Sequence[str] | None = None) -> int:
    code = _command(argv)
    if argv is None:
        # The process's own command line: the process ends when this returns. Its finalization
        # collects garbage over every object left, twice (the report, the plan and their JSON
        # among them), though reference counting frees them all the same: frozen, the collector
        # skips them (-38 M instructions of a 256-function status, ~4%). The output is flushed and
        # the agent's lease released before this point; only finalizers of objects in reference
        # cycles go unrun, which Python does not promise at exit either. Not for a caller in a
        # process that goes on (tests): nothing frozen is ever collected.
        import gc

        gc.freeze()
    return code


async def _terminable(args: argparse.Namespace) -> int:
    """run(args), ended by SIGTERM (systemd, a management daemon stopping us) as asyncio.run ends it on
    SIGINT: cancelled, so that every `finally` runs (a --prepare lease released, an interrupted wait
    said), where SIGTERM's default killed the process with the guest's lease held until it expired.
    A second SIGTERM kills at once."""
    import asyncio
    import signal

    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None

    def terminate() -> None:
        loop.remove_signal_handler(signal.SIGTERM)
        task.cancel()

    # not in the main thread (a caller's own thread) there are no signal handlers to add
    with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, terminate)
    return await run(args)


def _command(argv: Sequence[str] | None) -> int:
    p = parser(lazy=True)
    try:
        args = p.parse_args(argv)
        _split_target(command_parser(p, args.command), args)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    import logging  # not before: `--help` and a usage error do without it (~8 ms, see the top)

    # escaped: with -v, the orchestrator's and the relays' messages carry guest text
    log_to_stderr("%(levelname)s %(message)s", "INFO" if args.verbose else "WARNING")
    # qemu.qmp logs a failed connect at ERROR before raising; the error we print says it once.
    logging.getLogger("qemu.qmp").setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    import asyncio

    try:
        code = asyncio.run(_terminable(args))
        flush_stdout()
        return code
    except asyncio.CancelledError:  # SIGTERM (_terminable); every `finally` ran
        return Exit.TERMINATED
    except BrokenPipeError:  # `unplugctl status ... | head -1`: the reader left; end quietly
        return broken_pipe()
    except (DeviceNotFound, AmbiguousDevice, UsageError) as e:
        print_line(f"unplugctl: {e}", sys.stderr)
        return EXIT_USAGE
    except HostError as e:
        # a bad device spec (plug) is a usage error; devicespec is imported here, not before every command
        from unplugd.host.devicespec import SpecError

        print_line(f"unplugctl: {e}", sys.stderr)
        return EXIT_USAGE if isinstance(e, SpecError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return Exit.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
