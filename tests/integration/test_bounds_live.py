"""Bounded resources, live: 2,000 mount namespaces against an agent capped at 256 mountinfo files.

`unplugd serve` (its own process) with [watch] max_namespace_fds = 256 and a
1 s rescan tick, one WatchReport subscriber. 2,000 `unshare -m` sleepers
appear: the agent's fds must grow by at most the cap, a bind mount in a
namespace past the cap must still reach the subscriber (through the rescan),
and once the crowd is gone the fds must come back. The full-size figures
(10,000 namespaces and processes) are `make reliability`'s.

Also the load run, short: 5 s of 200 GetReport clients with 100 watchers,
over unix and the virtio-serial bridge: zero errors, fds back afterwards.
"""

from __future__ import annotations

from dataclasses import replace

from tests.bench.agent_proc import running_agent
from tests.bench.sec_agent_service import _root_function
from tests.bench.watch_probe import WatchRecorder
from tests.conftest import require_root
from tests.reliability import check_load
from tests.reliability.check_namespaces import mount_dirs, settled, split_by_file, time_mount_event
from tests.reliability.crowd import crowd
from tests.reliability.registry import Options

NAMESPACES = 2000
CAP = 256
SLACK_FDS = 8  # a connection or two and a scan's transient file may be open when sampled


def test_fds_stay_under_the_cap_and_a_late_namespace_is_still_seen() -> None:
    require_root()
    config = f"[watch]\nmax_namespace_fds = {CAP}\nfd_rescan_seconds = 1.0\n"
    with mount_dirs() as dirs, running_agent(config=config, timeout_s=60) as agent:
        address = _root_function(agent)
        watch = WatchRecorder(agent.target)
        try:
            assert watch.next(30) is not None
            before = settled(agent.pid)
            with crowd(NAMESPACES, namespaces=True) as spaces:
                during = settled(agent.pid)
                assert during.fds - before.fds <= CAP + SLACK_FDS, (before, during)
                watched, unwatched = split_by_file(agent.pid, spaces.pids)
                assert 0 < len(watched) <= CAP and len(unwatched) >= NAMESPACES - CAP
                seen = time_mount_event(watch, unwatched[-1], dirs / "src", dirs / "dst0", address)
                assert seen is not None, "a mount in a namespace past the cap never reached the watcher"
            after = settled(agent.pid)
            assert after.fds <= before.fds + SLACK_FDS, (before, after)
        finally:
            watch.close()


def test_short_load_run_has_no_errors_and_gives_fds_back() -> None:
    require_root()
    rows = check_load.run(replace(Options(), duration_s=5.0))
    assert rows and all(r.ok for r in rows), [(r.tried, r.happened) for r in rows if not r.ok]
    for r in rows:
        if "calls" in r.raw:
            assert r.raw["after"]["fds"] <= r.raw["before"]["fds"] + SLACK_FDS, r.happened
