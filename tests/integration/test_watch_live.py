"""The watcher on real kernel objects: each change wakes it through events, not the slow rescan.

Loop devices are no PCI functions, so the watcher runs on the real Inventory
(engine.scan) with a fingerprint of the objects a test makes: mounts of its
loop partitions, or the state of its veth pair. The report a subscriber gets
is derived from that same Inventory; the rescan tick is set to a minute, so
only events can explain a wake-up well within it. (How soon is a benchmark's
figure, `make bench`, not this test's: on a loaded 2-core machine running two
test workers and TCG guests a wake-up can wait seconds for a core.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.loopdev import LoopDisk, loop_disk, require_tools, run
from tests.integration.netns import NetNS, netns  # noqa: F401 (fixture)
from unplugd.agent import engine
from unplugd.agent.daemon.events import EventSources
from unplugd.agent.model import Inventory, parse_devno
from unplugd.agent.roots import Roots
from unplugd.agent.rpc.watch import ChangeWatcher

# A sixth of the 60 s rescan tick: only an event wakes the watcher this soon; the rest is margin
# for a loaded machine.
LIMIT = 10.0


class Changes:
    """What the watcher reported, with the monotonic time of each report."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: list[tuple[float, object]] = []

    def __call__(self, value: object) -> None:
        with self.cond:
            self.items.append((time.monotonic(), value))
            self.cond.notify_all()

    def wait_for(self, want: object, since: float, timeout: float = 2 * LIMIT) -> float:
        """Seconds from `since` until a report equal to `want` arrived."""
        with self.cond:
            ok = self.cond.wait_for(lambda: any(t >= since and v == want for t, v in self.items), timeout)
            assert ok, f"no report {want!r} within {timeout}s; got {self.items[-3:]!r}"
            return next(t for t, v in self.items if t >= since and v == want) - since


def _mounts_of(disk: LoopDisk) -> object:
    devnos = {parse_devno(Path(f"/sys/class/block/{p}/dev").read_text()) for p in disk.parts}

    def fingerprint(inv: Inventory) -> object:
        return tuple(sorted((m.mount_point, m.namespace) for m in inv.mounts if m.devno in devnos))

    return fingerprint


@contextlib.contextmanager
def watching(fingerprint: object) -> Iterator[tuple[Changes, ChangeWatcher[object]]]:
    roots = Roots.live_system()
    changes = Changes()
    watcher: ChangeWatcher[object] = ChangeWatcher(
        lambda: fingerprint(engine.scan(roots)),  # type: ignore[operator]
        changes,
        sources=lambda: EventSources(roots),
        debounce=0.1,
        rescan_seconds=60,
    )
    watcher.start()
    try:
        assert watcher.wait_ready(10)
        yield changes, watcher
    finally:
        watcher.stop()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[LoopDisk]:
    require_tools()
    with loop_disk(tmp_path, "label: dos\n,16M,L\n,,L\n") as d:
        for part in d.parts:
            run("mkfs.ext4", "-q", "-F", str(d.part_node(0 if part.endswith("p1") else 1)))
        yield d


@contextlib.contextmanager
def namespace_holder() -> Iterator[subprocess.Popen[str]]:
    """A process in a new private mount namespace that mounts what it reads on stdin."""
    proc = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'echo ready; while read -r op a b; do if [ "$op" = m ]; then mount "$a" "$b"; else umount "$a"; fi; '
            "echo done; done",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def _say(proc: subprocess.Popen[str], line: str) -> float:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done"
    return time.monotonic()


def _ns_of(pid: int) -> int:
    return int(os.readlink(f"/proc/{pid}/ns/mnt").split("[")[1].rstrip("]"))


def test_mount_and_umount_in_an_existing_namespace(disk: LoopDisk, tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    with namespace_holder() as holder, watching(_mounts_of(disk)) as (changes, _):
        ns = _ns_of(holder.pid)
        done = _say(holder, f"m {disk.part_node(0)} {mp}")
        assert changes.wait_for(((str(mp), ns),), done - 0.05) < LIMIT
        done = _say(holder, f"u {mp} -")
        assert changes.wait_for((), done - 0.05) < LIMIT


def test_mount_in_a_namespace_born_after_the_watcher_started(disk: LoopDisk, tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    with watching(_mounts_of(disk)) as (changes, watcher):
        if watcher._sources is None or "proc-connector" not in watcher._sources.kinds:
            pytest.skip("no proc connector here: new namespaces are found on the slow rescan only")
        with namespace_holder() as holder:
            done = _say(holder, f"m {disk.part_node(1)} {mp}")
            took = changes.wait_for(((str(mp), _ns_of(holder.pid)),), done - 0.05)
            if took >= LIMIT:
                pytest.fail(f"took {took:.2f}s; sources: {watcher._sources.kinds if watcher._sources else None}")
        # The holder was killed: its namespace and the mount in it go away.
        gone = time.monotonic()
        assert changes.wait_for((), gone - 0.05) < LIMIT


_NET_WATCH = """
import json, sys, time
from unplugd.agent import engine
from unplugd.agent.roots import Roots
from unplugd.agent.daemon.events import EventSources
from unplugd.agent.rpc.watch import ChangeWatcher
names = sys.argv[1:]
roots = Roots.live_system()
def fingerprint():
    inv = engine.scan(roots)
    return {n: [inv.interfaces[n].admin_up, sorted(str(a) for a in inv.interfaces[n].addresses if a.family == 2)]
            for n in names if n in inv.interfaces}
def report(value):
    print(json.dumps({"t": time.monotonic(), "v": value}), flush=True)
w = ChangeWatcher(fingerprint, report, sources=lambda: EventSources(roots, mounts=False),
                  debounce=0.1, rescan_seconds=60)
w.start()
w.wait_ready(10)
print(json.dumps({"ready": w._sources.kinds}), flush=True)
sys.stdin.read()
w.stop()
"""


class NetWatcher:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def next_report(self, timeout: float = 2 * LIMIT) -> tuple[float, dict[str, object]]:
        box: list[str] = []
        assert self.proc.stdout is not None
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        assert box and box[0], "the watcher in the namespace said nothing"
        msg = json.loads(box[0])
        return float(msg["t"]), msg["v"]


def test_link_down_and_address_removal_in_a_netns(netns: NetNS) -> None:  # noqa: F811
    netns.ip("link", "add", "uw0", "type", "veth", "peer", "name", "uw1")
    netns.ip("link", "set", "uw0", "up")
    netns.ip("link", "set", "uw1", "up")
    netns.ip("addr", "add", "192.0.2.1/24", "dev", "uw0")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, sys.executable, "-c", _NET_WATCH, "uw0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(REPO / ".dev"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    try:
        assert proc.stdout is not None
        watcher = NetWatcher(proc)
        _, first = watcher.next_report(timeout=20)  # the first snapshot comes before "ready"
        assert first == {"uw0": [True, ["192.0.2.1/24"]]}
        ready = json.loads(proc.stdout.readline())
        assert "netlink" in ready["ready"], ready

        t0 = time.monotonic()
        netns.ip("addr", "del", "192.0.2.1/24", "dev", "uw0")
        t, value = watcher.next_report()
        assert value == {"uw0": [True, []]}
        assert t - t0 < LIMIT

        t0 = time.monotonic()
        netns.ip("link", "set", "uw0", "down")
        t, value = watcher.next_report()
        assert value == {"uw0": [False, []]}
        assert t - t0 < LIMIT
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
