"""The shared watcher: change detection, debounce, subscribers, and WatchReport over gRPC."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.unit.rpc_fakes import DISK_FN, NIC_FN, FakeEngine, cancel, next_message, running_server
from unplugd.agent.config import Config, ServerConfig
from unplugd.agent.daemon.events import EventSources, MountNamespaces, parse_ns_inode
from unplugd.agent.roots import Roots
from unplugd.agent.rpc.watch import ChangeWatcher, ReportHub, Update, changed_between, filter_report, function_keys
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import report_pb2

BUSY, READY = report_pb2.FUNCTION_STATE_BUSY, report_pb2.FUNCTION_STATE_READY


class Box:
    def __init__(self, value: object) -> None:
        self.value = value
        self.lock = threading.Lock()

    def get(self) -> object:
        with self.lock:
            return self.value


class Seen(list[object]):
    """What a watcher reported, and an event set on each report."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def __call__(self, value: object) -> None:
        self.append(value)
        self.event.set()


def test_watcher_emits_only_on_change_and_within_a_second() -> None:
    box = Box(1)
    seen = Seen()
    event = seen.event
    w: ChangeWatcher[object] = ChangeWatcher(box.get, seen, sources=EventSources.none, debounce=0.05, rescan_seconds=60)
    w.start()
    try:
        assert w.wait_ready(5) and seen == [1]
        scans = w.scans
        w.poke()
        time.sleep(0.3)
        assert w.scans == scans + 1 and seen == [1]  # looked again, nothing changed, said nothing
        event.clear()
        box.value = 2
        t0 = time.monotonic()
        w.poke()
        assert event.wait(1.0)
        assert time.monotonic() - t0 < 1.0 and seen == [1, 2]
    finally:
        w.stop()


def test_watcher_debounces_bursts() -> None:
    box = Box(0)
    seen = Seen()
    w: ChangeWatcher[object] = ChangeWatcher(box.get, seen, sources=EventSources.none, debounce=0.2, rescan_seconds=60)
    w.start()
    try:
        assert w.wait_ready(5)
        before = w.scans
        for i in range(200):
            box.value = i
            w.poke()
        time.sleep(0.6)
        assert w.scans - before <= 2
        assert seen[-1] == 199
    finally:
        w.stop()


def test_watcher_rescans_on_its_slow_tick_without_events() -> None:
    box = Box("a")
    seen = Seen()
    event = seen.event
    w: ChangeWatcher[object] = ChangeWatcher(box.get, seen, sources=EventSources.none, debounce=0, rescan_seconds=0.3)
    w.start()
    try:
        assert w.wait_ready(5)
        event.clear()
        box.value = "b"
        assert event.wait(2)
        assert seen == ["a", "b"]
    finally:
        w.stop()


def test_watcher_survives_failing_snapshots() -> None:
    calls = {"n": 0}
    errors: list[Exception] = []

    def snap() -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("vanished mid-scan")
        return calls["n"] >= 3

    seen = Seen()
    event = seen.event
    w: ChangeWatcher[object] = ChangeWatcher(
        snap, seen, sources=EventSources.none, debounce=0, rescan_seconds=60, on_error=errors.append
    )
    w.start()
    try:
        assert w.wait_ready(5)
        w.poke()
        time.sleep(0.2)
        event.clear()
        w.poke()
        assert event.wait(2)
        assert seen == [False, True] and len(errors) == 1
    finally:
        w.stop()


def _report(**states: int) -> report_pb2.Report:
    r = report_pb2.Report()
    for addr, state in states.items():
        r.functions.add(address=addr, state=state)
        r.slots.add(address=addr[:-2], functions=[addr])
    return r


def test_function_keys_and_changed_between() -> None:
    a = function_keys(_report(x=READY, y=BUSY))
    b = function_keys(_report(x=READY, y=READY))
    assert changed_between(None, a) == ["x", "y"]
    assert changed_between(a, a) == []
    assert changed_between(a, b) == ["y"]
    assert changed_between(a, function_keys(_report(x=READY))) == ["y"]  # a function left
    with_reason = _report(x=READY, y=BUSY)
    with_reason.functions[1].reasons.add(code=report_pb2.REASON_CODE_MOUNTED, detail="on /a")
    assert changed_between(a, function_keys(with_reason)) == ["y"]
    newer = _report(x=READY, y=BUSY)
    newer.generated_at.seconds = 99  # only the time differs: no change
    assert changed_between(a, function_keys(newer)) == []


def test_filter_report() -> None:
    r = _report(**{"0000:00:06.0": READY, "0000:00:07.0": BUSY})
    assert filter_report(r, None) is r
    only = filter_report(r, {"0000:00:07.0"})
    assert [f.address for f in only.functions] == ["0000:00:07.0"]
    assert [s.address for s in only.slots] == ["0000:00:07"]
    assert len(r.functions) == 2  # the original is untouched


def test_hub_shares_one_scanner_and_stops_with_the_last_subscriber() -> None:
    box = Box(_report(a=READY))
    hub = ReportHub(box.get, sources=EventSources.none, debounce=0.01, rescan_seconds=60)  # type: ignore[arg-type]
    first = hub.subscribe()
    got = first.next(timeout=5)
    assert isinstance(got, Update) and got.report.functions[0].state == READY
    second = hub.subscribe()
    assert isinstance(second.next(timeout=5), Update)  # the current report at once
    scans = hub.scans
    box.value = _report(a=BUSY)
    hub.poke()
    for sub in (first, second):
        upd = sub.next(timeout=2)
        assert isinstance(upd, Update) and upd.report.functions[0].state == BUSY
    assert hub.scans <= scans + 2  # one scan serves both (plus the late joiner's look)
    first.close()
    assert hub.running
    second.close()
    assert not hub.running
    assert first.next(timeout=0.01) is None


def test_hub_reports_a_failing_first_scan_and_close_ends_streams() -> None:
    def broken() -> report_pb2.Report:
        raise RuntimeError("engine down")

    hub = ReportHub(broken, sources=EventSources.none, rescan_seconds=60)
    sub = hub.subscribe()
    assert isinstance(sub.next(timeout=5), RuntimeError)
    hub.close()
    assert sub.next(timeout=1) is None
    assert hub.subscribe().next(timeout=1) is None  # closed hubs take no one


# -- WatchReport over gRPC -------------------------------------------------------------


def _next(stream: grpc.CallIterator[pb.WatchReportResponse], timeout: float = 2.0) -> pb.WatchReportResponse:
    """The next message, failing the test when none arrives in time."""
    box: list[object] = []
    t = threading.Thread(target=lambda: box.append(next_message(stream)), daemon=True)
    t.start()
    t.join(timeout)
    assert box, f"no WatchReport message within {timeout}s"
    msg = box[0]
    assert isinstance(msg, pb.WatchReportResponse)
    return msg


def test_watch_report_initial_then_changes(tmp_path: Path) -> None:
    engine = FakeEngine()
    with running_server(tmp_path, engine) as (server, stub):
        stream = stub.WatchReport(pb.WatchReportRequest(), timeout=30)
        first = _next(stream)
        assert first.initial and list(first.changed) == [str(DISK_FN), str(NIC_FN)]
        engine.set_state(DISK_FN, BUSY)
        t0 = time.monotonic()
        server.hub.poke()
        change = _next(stream)
        assert time.monotonic() - t0 < 1.0
        assert not change.initial and list(change.changed) == [str(DISK_FN)]
        assert change.report.functions[0].state == BUSY
        cancel(stream)
        deadline = time.monotonic() + 5
        while server.hub.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server.hub.running  # the last subscriber left: no scanner runs


def test_watch_report_filtered_and_leases_show(tmp_path: Path) -> None:
    engine = FakeEngine()
    with running_server(tmp_path, engine, mutations=True) as (_, stub):
        stream = stub.WatchReport(pb.WatchReportRequest(devices=["eth1"]), timeout=30)
        first = _next(stream)
        assert [f.address for f in first.report.functions] == [str(NIC_FN)]
        engine.set_state(DISK_FN, BUSY)  # not watched: no message for it
        grant = stub.PrepareUnplug(pb.PrepareUnplugRequest(devices=["eth1"]), timeout=5)
        change = _next(stream)
        assert list(change.changed) == [str(NIC_FN)]
        assert [r.code for r in change.report.functions[0].reasons] == [report_pb2.REASON_CODE_LEASED]
        stub.ReleaseUnplug(pb.ReleaseUnplugRequest(lease_id=grant.lease_id), timeout=5)
        assert list(_next(stream).report.functions[0].reasons) == []
        cancel(stream)


def test_watch_report_unknown_device_and_too_many_watchers(tmp_path: Path) -> None:
    cfg = Config(server=ServerConfig(max_workers=4, max_watchers=1))
    with running_server(tmp_path, config=cfg) as (_, stub):
        with pytest.raises(grpc.RpcError) as err:
            next_message(stub.WatchReport(pb.WatchReportRequest(devices=["../x"]), timeout=5))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        one = stub.WatchReport(pb.WatchReportRequest(), timeout=30)
        _next(one)
        with pytest.raises(grpc.RpcError) as err:
            next_message(stub.WatchReport(pb.WatchReportRequest(), timeout=5))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.GetReport(pb.GetReportRequest(), timeout=5).report.functions  # unary calls still served
        cancel(one)


def test_server_stop_ends_watch_streams(tmp_path: Path) -> None:
    with running_server(tmp_path) as (server, stub):
        stream = stub.WatchReport(pb.WatchReportRequest(), timeout=30)
        _next(stream)
        server.hub.close()
        with pytest.raises(StopIteration):
            next_message(stream)


# -- event sources ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("mnt:[4026531841]", 4026531841),
        ("mnt:[]", None),
        ("mnt:4026531841", None),
        ("", None),
        ("mnt:[12a]", None),
        ("net:[7]", 7),
    ],
)
def test_parse_ns_inode(text: str, want: int | None) -> None:
    assert parse_ns_inode(text) == want


def test_mount_namespaces_one_file_per_namespace(tmp_path: Path) -> None:
    def proc(pid: int, ns: str | None) -> None:
        d = tmp_path / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "mountinfo").write_text("")
        if ns is not None:
            os.symlink(ns, d / "ns" / "mnt")

    proc(1, "mnt:[100]")
    proc(2, "mnt:[100]")
    proc(3, "mnt:[200]")
    proc(4, None)  # a kernel thread
    proc(5, "garbage")
    (tmp_path / "self").mkdir()
    ns = MountNamespaces(tmp_path)
    opened, closed = ns.refresh()
    assert sorted(ns.files) == [100, 200] and len(opened) == 2 and closed == []
    assert ns.refresh() == ([], [])
    for f in (tmp_path / "3").rglob("*"):
        if f.is_file() or f.is_symlink():
            f.unlink()
    opened, closed = ns.refresh()
    assert sorted(ns.files) == [100] and opened == [] and len(closed) == 1
    ns.close()
    assert ns.files == {}


def test_mount_namespaces_hold_at_most_max_files_oldest_first(tmp_path: Path) -> None:
    def proc(pid: int, ns: int) -> None:
        d = tmp_path / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "mountinfo").write_text("")
        os.symlink(f"mnt:[{ns}]", d / "ns" / "mnt")

    for pid, ino in ((1, 100), (2, 100), (30, 101), (400, 102)):  # the system's own
        proc(pid, ino)
    for i in range(20):  # a user's crowd of namespaces
        proc(1000 + i, 5000 + i)
    ns = MountNamespaces(tmp_path, max_files=3)
    opened, _ = ns.refresh()
    assert len(opened) == 3 and len(ns.files) == 3
    assert sorted(ns.files) == [100, 101, 102]  # the lowest pids come first
    assert ns.full and ns.unwatched == 20
    assert ns.add_pid(1019) is None  # no room: left to the rescan
    assert len(ns.files) == 3
    # A watched namespace dies: its slot goes to one that had none.
    for f in (tmp_path / "400").rglob("*"):
        if f.is_file() or f.is_symlink():
            f.unlink()
    opened, closed = ns.refresh()
    assert len(closed) == 1 and len(opened) == 1 and len(ns.files) == 3 and ns.unwatched == 19
    ns.close()


def test_event_sources_hold_no_more_namespace_fds_than_the_cap() -> None:
    """Live: this machine's namespaces, capped at 1 mountinfo file."""

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    sources = EventSources(Roots.live_system(), udev=False, netlink=False, proc_connector=False, max_namespace_fds=1)
    try:
        assert sources.namespaces == 1
        assert fds() - before == 1 + 2  # one mountinfo and the wake pipe
    finally:
        sources.close()
    assert fds() == before


def _proc_event(what: int, pid: int, tgid: int, *, idx: int = 1) -> bytes:
    import struct

    event = struct.pack("=IIQII", what, 0, 0, pid, tgid) + b"\0" * 8
    cn = struct.pack("=IIIIHH", idx, 1, 0, 0, len(event), 0) + event
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn


def test_parse_proc_events() -> None:
    from unplugd.agent.daemon.events import PROC_EVENT_EXEC, PROC_EVENT_EXIT, parse_proc_events

    fork = 0x1
    two = _proc_event(PROC_EVENT_EXEC, 10, 10) + _proc_event(PROC_EVENT_EXIT, 11, 11)
    assert parse_proc_events([two]) == [(PROC_EVENT_EXEC, 10), (PROC_EVENT_EXIT, 11)]
    assert parse_proc_events([_proc_event(PROC_EVENT_EXIT, 12, 11)]) == []  # a thread, not the process
    assert parse_proc_events([_proc_event(fork, 1, 1)]) == []
    assert parse_proc_events([_proc_event(PROC_EVENT_EXEC, 1, 1, idx=9)]) == []  # another connector
    whole = _proc_event(PROC_EVENT_EXEC, 5, 5)
    assert parse_proc_events([whole[:-4], b"", b"\xff" * 7]) == []  # truncated and garbage
    bad_len = b"\x04\x00\x00\x00" + whole[4:]
    assert parse_proc_events([bad_len]) == []


def test_a_driver_or_an_object_appearing_is_a_change() -> None:
    """A hot-added NIC: the function first, then its driver, then its interface, READY all along
    (`unplugctl plug` waits on WatchReport for exactly these)."""
    bare = _report(x=READY)
    bound = _report(x=READY)
    bound.functions[0].driver = "virtio-pci"
    named = _report(x=READY)
    named.functions[0].driver = "virtio-pci"
    named.functions[0].net_interfaces.add(name="ens2")
    disk = _report(x=READY)
    disk.functions[0].driver = "virtio-pci"
    disk.functions[0].block_devices.add(name="vdb")
    keys = [function_keys(r) for r in (bare, bound, named, disk)]
    assert [changed_between(a, b) for a, b in itertools.pairwise(keys)] == [["x"], ["x"], ["x"]]
