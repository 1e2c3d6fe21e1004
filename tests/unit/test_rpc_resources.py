"""rpc/resources.py: the /proc parsers, and the live figures against psutil's reading of the same process."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil
import pytest

from unplugd.agent.errors import ParseError, ReadError
from unplugd.agent.rpc.resources import (
    agent_resources,
    parse_btime,
    parse_starttime,
    parse_statm_rss,
    parse_threads,
)


@pytest.mark.parametrize(
    ("text", "page", "expected"),
    [("2712 1024 560 1 0 400 0\n", 4096, 4 * 2**20), ("10 3 1 1 0 1 0", 65536, 3 * 65536)],
)
def test_parse_statm_rss(text: str, page: int, expected: int) -> None:
    assert parse_statm_rss(text, page) == expected


@pytest.mark.parametrize("text", ["", "2712", "2712 x 560"])
def test_parse_statm_rss_rejects_garbage(text: str) -> None:
    with pytest.raises(ParseError):
        parse_statm_rss(text, 4096)


STAT_TAIL = " S 1 100 100 0 -1 4194560 500 0 0 0 7 3 0 0 20 0 9 0 123456 1000000 256 " + " ".join(["0"] * 30)


@pytest.mark.parametrize(
    ("comm", "expected"),
    [("python3", 123456), ("a b) (c", 123456), (")", 123456)],  # a command may hold spaces and parentheses
)
def test_parse_starttime(comm: str, expected: int) -> None:
    assert parse_starttime(f"4242 ({comm}){STAT_TAIL}\n") == expected


@pytest.mark.parametrize(
    "text",
    ["", "4242 (x) S 1 2 3", "4242 x S " + "1 " * 30, "4242 (x) S 1 100 100 0 -1 4 5 0 0 0 7 3 0 0 20 0 9 0 soon"],
)
def test_parse_starttime_rejects_garbage(text: str) -> None:
    with pytest.raises(ParseError):
        parse_starttime(text)


def test_parse_threads_and_btime() -> None:
    assert parse_threads("Name:\tx\nState:\tS\nThreads:\t12\nSigQ:\t0/1\n") == 12
    assert parse_btime("cpu  1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n") == 1700000000
    with pytest.raises(ParseError):
        parse_threads("Name:\tx\nThreads:\tmany\n")
    with pytest.raises(ParseError):
        parse_btime("cpu  1 2 3\nbtime\n")


def test_live_figures_match_psutil() -> None:
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        me = psutil.Process()
        with me.oneshot():
            rss, threads, fds, created = me.memory_info().rss, me.num_threads(), me.num_fds(), me.create_time()
        res = agent_resources(leases=2, watchers=1)
        assert 0.8 < res.rss_bytes / rss < 1.25
        assert res.threads == threads >= 2
        assert abs(res.open_fds - fds) <= 2  # listing fd/ opens a descriptor of its own, both ways
        assert abs(res.started_at.ToNanoseconds() / 1e9 - created) < 0.05
        assert res.started_at.ToNanoseconds() / 1e9 <= time.time()
        assert (res.leases, res.watchers) == (2, 1)
        cpu = os.times()
        assert 0 < res.cpu_user_seconds + res.cpu_system_seconds <= cpu.user + cpu.system
    finally:
        stop.set()
        worker.join()


def test_unreadable_proc_is_an_error_not_zeroes(tmp_path: Path) -> None:
    with pytest.raises(ReadError):
        agent_resources(leases=0, watchers=0, proc=tmp_path)
