"""The agent's own footprint for GetAgentInfo: what an operator checks across a fleet.

psutil reads it from /proc/self portably (rss, cpu times, threads, fds, start
time); the agent's targets are a small flat RSS and no CPU at idle, so psutil
is loaded on the first GetAgentInfo only (~0.8 MiB an agent nobody asks need not carry).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from google.protobuf import timestamp_pb2

from unplugd.v1 import agent_service_pb2 as pb

if TYPE_CHECKING:
    import psutil

__all__ = ["agent_resources"]


@cache
def _self() -> psutil.Process:
    import psutil

    return psutil.Process()


def agent_resources(*, leases: int, watchers: int) -> pb.AgentResources:
    me = _self()
    with me.oneshot():
        cpu = me.cpu_times()
        started = timestamp_pb2.Timestamp()
        started.FromNanoseconds(int(me.create_time() * 1e9))
        return pb.AgentResources(
            rss_bytes=me.memory_info().rss,
            cpu_user_seconds=cpu.user,
            cpu_system_seconds=cpu.system,
            threads=me.num_threads(),
            open_fds=me.num_fds(),
            started_at=started,
            leases=leases,
            watchers=watchers,
        )
