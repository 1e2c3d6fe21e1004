"""One host process asking N VMs for their status at once, through the host library.

    python -m tests.bench.many_vms --dir DIR --count N

For each VM: QmpBackend(DIR/qmp-I.sock) + AgentClient(unix:DIR/agent-I.sock)
-> Orchestrator.status(), all concurrently in one asyncio loop. Prints one
JSON object: wall time, per-VM latencies, failures, slots seen.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import time
from pathlib import Path
from typing import Any


async def _one(directory: Path, i: int, timeout: float) -> tuple[float, int, str]:
    from unplugd.host.backends.qmp import QmpBackend
    from unplugd.host.client import AgentClient
    from unplugd.host.orchestrator import Orchestrator

    t0 = time.perf_counter()
    try:
        async with (
            QmpBackend(str(directory / f"qmp-{i}.sock"), timeout=timeout) as backend,
            AgentClient(f"unix:{directory / f'agent-{i}.sock'}", timeout=timeout, connect_timeout=timeout) as agent,
        ):
            plan = await Orchestrator(backend, agent, agent_timeout=timeout).status()
    except Exception as exc:
        return time.perf_counter() - t0, 0, f"{type(exc).__name__}: {exc}"
    error = "" if plan.guest_reachable else f"guest unreachable: {plan.guest_error}"
    return time.perf_counter() - t0, len(plan.slots), error


async def _all(directory: Path, count: int, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_one(directory, i, timeout) for i in range(count)))
    wall = time.perf_counter() - t0
    errors = [e for _, _, e in results if e]
    return {
        "count": count,
        "wall_s": wall,
        "latencies_s": sorted(t for t, _, _ in results),
        "slots": sorted({s for _, s, _ in results}),
        "failures": len(errors),
        "first_errors": errors[:3],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    t_import = time.perf_counter()
    for name in ("unplugd.host.backends.qmp", "unplugd.host.client", "unplugd.host.orchestrator"):
        importlib.import_module(name)  # import cost reported apart from the queries
    imports = time.perf_counter() - t_import
    out = asyncio.run(_all(args.dir, args.count, args.timeout))
    out["imports_s"] = imports
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
