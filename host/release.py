"""The release step: ask the guest to let a slot go (RequestRelease: its release hooks), then unplug.

    check the slot -> RequestRelease(every guest function of the slot, timeout)
    -> each function RELEASED, STILL_BUSY or NO_HOOK, with each hook's result
    -> (unplug --release) when every one is RELEASED: Orchestrator.unplug with a lease, as usual

The whole slot is asked for, since the whole slot leaves. Nothing is unplugged unless the guest
says every function of it is READY; the unplug then prepares a lease and checks again, so a use
that returns between the release and the lease still refuses it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, cast

import grpc

from unplugd.host.client import RELEASE_MARGIN, AgentCallFailed, AgentClientError
from unplugd.host.exitcodes import Exit
from unplugd.host.orchestrator import Orchestrator, Progress, UnplugResult
from unplugd.host.planner import GuestReason, SlotPlan, Verdict
from unplugd.reason_codes import code_name
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import report_pb2

__all__ = [
    "FunctionRelease",
    "HookOutcome",
    "ReleaseAgent",
    "ReleaseResult",
    "functions_from",
    "release_exit",
    "release_json",
    "release_slot",
    "unplug_released",
]


class ReleaseAgent(Protocol):
    async def request_release(
        self, devices: Sequence[str], deadline_seconds: float, *, timeout: float | None = None
    ) -> pb.RequestReleaseResponse: ...


@dataclass(frozen=True)
class HookOutcome:
    name: str
    status: str  # EXITED | KILLED | TIMED_OUT | REFUSED | FAILED_TO_START | SKIPPED
    exit_code: int = 0
    signal: int = 0
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "EXITED" and self.exit_code == 0

    def summary(self) -> str:
        """One line: how it ended."""
        how = {
            "EXITED": f"exit {self.exit_code}",
            "KILLED": f"killed by signal {self.signal}",
            "TIMED_OUT": "timed out",
            "REFUSED": "REFUSED, not run",
            "FAILED_TO_START": "could not start",
            "SKIPPED": "skipped",
        }.get(self.status, self.status)
        took = f" after {self.seconds:.1f} s" if self.status in ("EXITED", "KILLED", "TIMED_OUT") else ""
        return f"{how}{took}" + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class FunctionRelease:
    address: str
    pci_path: str
    outcome: str  # RELEASED | STILL_BUSY | NO_HOOK
    state: str  # READY | BUSY | UNKNOWN
    reasons: tuple[GuestReason, ...] = ()
    hooks: tuple[HookOutcome, ...] = ()


@dataclass(frozen=True)
class ReleaseResult:
    plan: SlotPlan
    functions: tuple[FunctionRelease, ...] = ()
    error: str = ""  # why the guest could not be asked, or refused
    disabled: bool = False  # the guest's config does not allow RequestRelease

    @property
    def released(self) -> bool:
        return not self.error and bool(self.functions) and all(f.outcome == "RELEASED" for f in self.functions)

    @property
    def message(self) -> str:
        if self.error:
            return self.error
        if self.released:
            return f"the guest released slot {self.plan.slot_path}"
        left = [
            f"{f.address} {f.outcome}"
            + (f" ({'; '.join(r.detail for r in f.reasons if r.blocking)})" if f.reasons else "")
            for f in self.functions
            if f.outcome != "RELEASED"
        ]
        return f"the guest did not release slot {self.plan.slot_path}: " + ", ".join(left)


# ------------------------------------------------------------------------------------------ pure


def _name(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:  # a newer agent's value
        return f"{prefix}{value}"


def functions_from(response: pb.RequestReleaseResponse) -> tuple[FunctionRelease, ...]:
    """The agent's answer in the host's terms (guest text stays as the wire carries it)."""
    out = []
    for f in response.functions:
        hooks = tuple(
            HookOutcome(
                h.name,
                _name(pb.HookStatus, h.status, "HOOK_STATUS_"),
                h.exit_code,
                h.signal,
                h.stdout,
                h.stderr,
                h.stdout_truncated or h.stderr_truncated,
                h.detail,
                h.seconds,
            )
            for h in f.hooks
        )
        reasons = tuple(GuestReason(code_name(r.code), r.detail, r.blocking, r.object) for r in f.reasons)
        out.append(
            FunctionRelease(
                f.address,
                f.pci_path,
                _name(pb.ReleaseOutcome, f.outcome, "RELEASE_OUTCOME_"),
                _name(report_pb2.FunctionState, f.state, "FUNCTION_STATE_"),
                reasons,
                hooks,
            )
        )
    return tuple(out)


def hook_lines(f: FunctionRelease) -> list[str]:
    """Progress lines for one function: each hook's result, then the last lines of its stderr."""
    lines = []
    for h in f.hooks:
        lines.append(f"{f.address}: hook {h.name}: {h.summary()}")
        lines += [f"{f.address}:   {line}" for line in h.stderr.splitlines()[-STDERR_LINES:]]
    lines.append(f"{f.address}: {f.outcome} ({f.state})")
    return lines


# Hook stderr lines shown in progress (all of it is in --json): the end is where the error is.
STDERR_LINES = 5


def release_exit(r: ReleaseResult) -> Exit:
    if r.released:
        return Exit.OK
    if r.disabled:
        return Exit.RELEASE_DISABLED
    if r.error:
        return Exit.GUEST_UNREACHABLE
    return Exit.BLOCKED_BY_GUEST


def _hook_json(h: HookOutcome) -> dict[str, Any]:
    return {
        "name": h.name,
        "status": h.status,
        "exitCode": h.exit_code,
        "signal": h.signal,
        "stdout": h.stdout,
        "stderr": h.stderr,
        "truncated": h.truncated,
        "detail": h.detail,
        "seconds": h.seconds,
    }


def release_json(r: ReleaseResult) -> dict[str, Any]:
    return {
        "slotPath": r.plan.slot_path,
        "released": r.released,
        "message": r.message,
        "disabled": r.disabled,
        "functions": [
            {
                "address": f.address,
                "pciPath": f.pci_path,
                "outcome": f.outcome,
                "state": f.state,
                "reasons": [
                    {"code": x.code, "detail": x.detail, "blocking": x.blocking, "object": x.object} for x in f.reasons
                ],
                "hooks": [_hook_json(h) for h in f.hooks],
            }
            for f in r.functions
        ],
    }


# ------------------------------------------------------------------------------------------ the step


async def release_slot(
    orch: Orchestrator, device: str, *, timeout: float, progress: Callable[[Progress], None] | None = None
) -> ReleaseResult:
    """Ask the guest to release the slot of `device` within `timeout` seconds."""
    start = time.monotonic()
    sp = await orch.check(device)
    devices = sp.guest_devices()
    agent = cast(ReleaseAgent | None, orch.agent)  # AgentClient; AgentLike names only what unplug calls
    if agent is None or not devices:
        # an agent that did not answer is named with its reason (the plan's finding); one that answered
        # without the slot's functions is not "unreachable"
        unreachable = [f.detail for f in sp.findings if f.verdict is Verdict.GUEST_UNREACHABLE]
        return ReleaseResult(
            sp,
            error="the guest agent is unreachable: no agent address given"
            if agent is None
            else (unreachable[0] if unreachable else "the guest reports no function of this slot"),
        )
    try:
        response = await asyncio.wait_for(agent.request_release(devices, timeout), timeout + RELEASE_MARGIN + 1)
    except AgentCallFailed as e:
        if e.code == grpc.StatusCode.PERMISSION_DENIED:
            return ReleaseResult(sp, error=f"the guest does not allow it: {e.details}", disabled=True)
        return ReleaseResult(sp, error=str(e))
    except (AgentClientError, TimeoutError, OSError) as e:
        return ReleaseResult(sp, error=str(e) or type(e).__name__)
    result = ReleaseResult(sp, functions_from(response))
    if progress is not None:
        for f in result.functions:
            for line in hook_lines(f):
                progress(Progress("release", line, elapsed=time.monotonic() - start))
    return result


def _later(progress: Callable[[Progress], None] | None, offset: float) -> Callable[[Progress], None] | None:
    """`progress` for a step that starts `offset` seconds into the command: its elapsed times go on
    from the release's instead of starting again at zero."""
    if progress is None:
        return None
    report = progress
    return lambda p: report(replace(p, elapsed=p.elapsed + offset))


async def unplug_released(
    orch: Orchestrator,
    device: str,
    *,
    timeout: float,
    with_companions: bool = False,
    force: bool = False,
    dry_run: bool = False,
    progress: Callable[[Progress], None] | None = None,
) -> tuple[ReleaseResult, UnplugResult | None]:
    """`unplug --release`: the release, then (only when every function was released) the unplug
    with a lease; None when nothing was unplugged."""
    start = time.monotonic()
    released = await release_slot(orch, device, timeout=timeout, progress=progress)
    if not released.released:
        return released, None
    unplug = await orch.unplug(
        device,
        with_companions=with_companions,
        prepare=True,
        force=force,
        dry_run=dry_run,
        timeout=timeout,
        progress=_later(progress, time.monotonic() - start),
    )
    return released, unplug
