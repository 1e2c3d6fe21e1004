"""The agent's own footprint for GetAgentInfo: what an operator checks across a fleet.

psutil reads it from /proc/self portably (rss, cpu times, threads, fds, start
time); the agent's targets are a small flat RSS and no CPU at idle.
"""

from __future__ import annotations

import psutil
from google.protobuf import timestamp_pb2

from unplugd.v1 import agent_service_pb2 as pb

__all__ = ["agent_resources"]

_SELF = psutil.Process()


def agent_resources(*, leases: int, watchers: int) -> pb.AgentResources:
    with _SELF.oneshot():
        cpu = _SELF.cpu_times()
        started = timestamp_pb2.Timestamp()
        started.FromNanoseconds(int(_SELF.create_time() * 1e9))
        return pb.AgentResources(
            rss_bytes=_SELF.memory_info().rss,
            cpu_user_seconds=cpu.user,
            cpu_system_seconds=cpu.system,
            threads=_SELF.num_threads(),
            open_fds=_SELF.num_fds(),
            started_at=started,
            leases=leases,
            watchers=watchers,
        )
