"""The host library in a process that has already started, as a management daemon calls it.

    python -m tests.bench.warm_library --qmp SOCK --agent ADDR --runs N [--unplug-qmp SOCK --device ID]

Issue 13's host targets include the CLI's start-up; a daemon (vdsm, nova-compute, a
KubeVirt controller) imports the library once and pays it once. This measures what
is left per call. Each round opens fresh connections (QMP and agent), as a daemon
serving one request would:

- status: Orchestrator.status() (the agent's report and QEMU's topology read at once,
  then the plan), with the time from the agent's answer (parsed) to the plan: what the
  host adds once the guest has answered. Subtracting a separate GetReport's time, as
  for the CLI, would leave a difference of two noisy ~200 ms figures.
- unplug (with --unplug-qmp, a QmpProxy standing in for the guest): Orchestrator.unplug()
  of --device; the monotonic time of the call is printed as `unplug T0` on stdout and
  `over` after it, then one line is read from stdin before the next round (the caller
  puts the fake guest's functions back in between). perf_counter is CLOCK_MONOTONIC: comparable with the
  proxy's clock in the caller's process.

Prints one JSON object last: per round the status's wall and CPU seconds and its
seconds after the agent's answer, and the imports' seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any


class _AnswerTimed:
    """The agent client, noting when its report arrived (parsed): the rest of a status is the host's."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent
        self.answered = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._agent, name)

    async def get_report(self, *args: Any, **kwargs: Any) -> Any:
        report = await self._agent.get_report(*args, **kwargs)
        self.answered = time.perf_counter()
        return report


async def _status_round(qmp: str, agent_addr: str) -> tuple[float, float, float]:
    from unplugd.host.backends.qmp import QmpBackend
    from unplugd.host.client import AgentClient
    from unplugd.host.orchestrator import Orchestrator

    t0, c0 = time.perf_counter(), time.process_time()
    async with AgentClient(agent_addr, timeout=30) as client, QmpBackend(qmp) as backend:
        agent = _AnswerTimed(client)
        plan = await Orchestrator(backend, agent, agent_timeout=30).status()
        done = time.perf_counter()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if not plan.guest_reachable:
        raise RuntimeError(f"guest unreachable: {plan.guest_error}")
    return wall, cpu, done - agent.answered


async def _unplug_round(qmp: str, agent_addr: str, device: str) -> str:
    from unplugd.host.backends.qmp import QmpBackend
    from unplugd.host.client import AgentClient
    from unplugd.host.orchestrator import Orchestrator

    print(f"unplug {time.perf_counter()!r}", flush=True)
    async with AgentClient(agent_addr, timeout=30) as agent, QmpBackend(qmp) as backend:
        result = await Orchestrator(backend, agent, agent_timeout=30).unplug(device, timeout=20)
    return result.outcome.value


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"status": [], "unplug_outcomes": []}
    await _status_round(args.qmp, args.agent)  # warm-up: the first call loads what the calls use
    for _ in range(args.runs):
        out["status"].append(await _status_round(args.qmp, args.agent))
    if args.unplug_qmp:
        for _ in range(args.runs):
            out["unplug_outcomes"].append(await _unplug_round(args.unplug_qmp, args.agent, args.device))
            print("over", flush=True)
            sys.stdin.readline()  # the caller has put the fake guest's functions back
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qmp", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--unplug-qmp", default="")
    parser.add_argument("--device", default="")
    args = parser.parse_args()
    t0 = time.perf_counter()
    import unplugd.host.backends.qmp
    import unplugd.host.client
    import unplugd.host.orchestrator  # noqa: F401

    imports = time.perf_counter() - t0
    out = asyncio.run(_main(args))
    out["imports_s"] = imports
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
