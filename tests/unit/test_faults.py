"""Things vanish mid-scan: at every step of a scan, the report is still produced and never silently READY.

Each scenario is a hand-built guest tree and a victim: paths that disappear
(a partition, a holder, a whole PCI function, a process, the last process of
a mount namespace). A clean scan records every filesystem call the collectors
make; then, for each of those steps k, a fresh copy of the tree is scanned
with the victim deleted from disk just before call k (really deleted: the
collectors see ENOENT from the kernel, dir_fd-relative calls included).

The verdict asked of each run: the function the victim matters to is BUSY or
UNKNOWN where a READY would be a lie (the mount that pins it is still in
mountinfo), or what is correct when the vanishing frees it (a process that
exited holds nothing); the functions the victim does not touch keep their
state (a vanished pid is no reason to doubt everything).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.build_scenarios import Tree
from unplugd.agent import engine, treetext
from unplugd.agent.readiness.policy import evaluate
from unplugd.agent.roots import Roots

ROOT_DISK = "0000:00:02.0"
DISK_FN = "0000:00:06.0"
IDLE_FN = "0000:00:07.0"
OTHER_NS = 4026532999

# The calls the collectors reach the filesystem through (sysio, os.* in the collectors, pathlib, open).
_PATCHED = [
    (os, "open"),
    (os, "listdir"),
    (os, "readlink"),
    (os, "stat"),
    (os, "lstat"),
    (os, "scandir"),
    (builtins, "open"),
    (io, "open"),
]


@dataclass(frozen=True)
class Scenario:
    name: str
    tree: Callable[[], Tree]
    victims: Sequence[str]  # paths under the root that vanish together
    # states allowed for DISK_FN once the victims are gone at some step
    allowed: frozenset[str]
    # paths that appear when the victims vanish (a child forked after the /proc listing)
    appear: Callable[[Tree], None] | None = None
    # The call that first lists the victim: vanishing before it is a world where the victim never
    # existed, which the scan cannot tell from this one (READY may then be right).
    listed_by: str = ""


def _base(t: Tree) -> str:
    """A disk function at 06.0 and an idle disk function at 07.0; returns the disk's sysfs dir."""
    fn = t.pci(DISK_FN)
    ddir = t.disk(t.virtio(fn, 30, "virtio_blk"), "vdb", (252, 16), parts=1)
    t.disk(t.virtio(t.pci(IDLE_FN), 31, "virtio_blk"), "vdc", (252, 32))
    return ddir


def mounted_partition() -> Tree:
    t = Tree()
    _base(t)
    t.mount((252, 17), "/data", "/dev/vdb1")
    return t


def held_by_lvm() -> Tree:
    t = Tree()
    _base(t)
    t.virtual_block("dm-0", (253, 0), slaves=["vdb1"], dm=("vg0-data", "LVM-Xy12Ab34"))
    t.mount((253, 0), "/home", "/dev/mapper/vg0-data")
    return t


def open_by_process() -> Tree:
    t = Tree()
    _base(t)
    t.process(300, "dd")
    t.open_fd(300, 3, "/dev/vdb")
    return t


def mounted_in_a_namespace() -> Tree:
    t = Tree()
    _base(t)
    t.namespace(OTHER_NS, 400, "unshare")
    t.mount((252, 17), "/srv", "/dev/vdb1", ns=OTHER_NS)
    return t


def _forked_child(t: Tree) -> None:
    # pid 400 exits after the /proc listing; its child 401 lives on in the same namespace.
    t.namespace(OTHER_NS, 401, "sleep")
    t.mount((252, 17), "/srv", "/dev/vdb1", ns=OTHER_NS)


_VDB1 = "sys/devices/pci0000:00/0000:00:06.0/virtio30/block/vdb/vdb1"
_DISK_FN_DIR = "sys/devices/pci0000:00/0000:00:06.0"
BUSY_OR_UNKNOWN = frozenset({"BUSY", "UNKNOWN"})

SCENARIOS = [
    # A partition's sysfs entries vanish while mountinfo still shows it mounted.
    Scenario(
        "partition",
        mounted_partition,
        [_VDB1, "sys/class/block/vdb1", "sys/dev/block/252:17", "dev/vdb1"],
        BUSY_OR_UNKNOWN,
        listed_by="listdir sys/class/block",
    ),
    # The holder on top of a partition vanishes while its mount is still listed.
    Scenario(
        "holder",
        held_by_lvm,
        [
            "sys/devices/virtual/block/dm-0",
            "sys/class/block/dm-0",
            "sys/block/dm-0",
            "sys/dev/block/253:0",
            "dev/dm-0",
            "dev/mapper/vg0-data",
        ],
        BUSY_OR_UNKNOWN,
        listed_by="listdir sys/class/block",
    ),
    # The whole function is hot-removed mid-scan (its mount lingers, lazily): gone or not READY.
    Scenario(
        "function",
        mounted_partition,
        [
            _DISK_FN_DIR,
            "sys/bus/pci/devices/0000:00:06.0",
            "sys/block/vdb",
            "sys/class/block/vdb",
            "sys/class/block/vdb1",
            "sys/dev/block/252:16",
            "sys/dev/block/252:17",
            "dev/vdb",
            "dev/vdb1",
        ],
        BUSY_OR_UNKNOWN | {"ABSENT"},
    ),
    # The process holding the disk exits between the /proc listing and reading its fds:
    # it held it (BUSY) or holds nothing any more (READY); both are true.
    Scenario("process", open_by_process, ["proc/300"], frozenset({"BUSY", "READY"})),
    # The only listed process of a mount namespace exits, a child forked before lives on.
    Scenario("namespace", mounted_in_a_namespace, ["proc/400"], BUSY_OR_UNKNOWN, appear=_forked_child),
]


class Vanishing:
    """Counts filesystem calls under `root`; deletes the victims just before call number `at`."""

    def __init__(
        self, root: Path, victims: Sequence[str], at: int | None, appear: Callable[[Path], None] | None = None
    ) -> None:
        self.root = str(root)
        self.victims = [root / v for v in victims]
        self.at = at
        self.appear = appear
        self.calls: list[str] = []
        self.fired = False
        self._originals: dict[tuple[Any, str], Any] = {}
        self._busy = False

    def _touches(self, args: tuple[Any, ...]) -> str | None:
        arg = args[0] if args else None
        if isinstance(arg, int):
            return f"fd:{arg}"  # dir_fd-relative and fd-based calls count as steps too
        text = os.fspath(arg) if isinstance(arg, str | os.PathLike) else None
        return text if text is not None and (text.startswith(self.root) or not text.startswith("/")) else None

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kw: Any) -> Any:
            if not self._busy:
                what = self._touches(args)
                if what is not None:
                    if self.at is not None and len(self.calls) == self.at:
                        self._vanish()
                    self.calls.append(f"{name} {what}")
            return real(*args, **kw)

        return call

    def _vanish(self) -> None:
        self._busy = True
        try:
            for v in self.victims:
                if v.is_symlink() or v.is_file():
                    v.unlink()
                elif v.is_dir():
                    shutil.rmtree(v)
            if self.appear is not None:
                self.appear(Path(self.root))
            self.fired = True
        finally:
            self._busy = False

    @contextmanager
    def active(self) -> Iterator[Vanishing]:
        mp = pytest.MonkeyPatch()
        try:
            for mod, name in _PATCHED:
                mp.setattr(mod, name, self._wrap(name, getattr(mod, name)))
            yield self
        finally:
            mp.undo()


def _states(root: Path) -> dict[str, str]:
    # The tree stands for the live system, whose objects vanish mid-scan: read it as the live system
    # is read (plain os calls, which the Vanishing hooks see), not confined as a capture is.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "beneath", lambda roots: contextlib.nullcontext())
        inventory = engine.scan(Roots.under(root))
    return {str(v.address): v.state.value for v in evaluate(inventory)}


def _unpack(text: str, dest: Path) -> Path:
    treetext.unpack(text, dest)
    return dest


def _appear(sc: Scenario) -> Callable[[Path], None] | None:
    if sc.appear is None:
        return None
    extra = Tree()
    add = sc.appear
    add(extra)
    # Only the new process's entries (its mountinfo is written by text()).
    extra.text()
    wanted = {p: e for p, e in extra.entries.items() if p.startswith("proc/401/")}

    def write(root: Path) -> None:
        treetext.unpack(treetext.pack_entries(list(wanted.values())), root)

    return write


@dataclass
class Sweep:
    steps: int
    states: dict[str, int]  # DISK_FN's state -> how many runs
    lies: list[str]  # runs whose answer broke the promise, and why
    unlisted: int = 0  # runs where the victim was gone before the scan listed it (as if it never was)


def sweep(sc: Scenario, work: Path) -> Sweep:
    """The victim deleted before each step of the scan in turn; what DISK_FN was each time."""
    text = sc.tree().text()
    clean_root = _unpack(text, work / "clean")
    with Vanishing(clean_root, sc.victims, None).active() as rec:
        baseline = _states(clean_root)
    assert baseline[DISK_FN] == "BUSY" and baseline[IDLE_FN] == "READY" and baseline[ROOT_DISK] == "BUSY"
    shutil.rmtree(clean_root)
    appear = _appear(sc)
    listed = next((i for i, c in enumerate(rec.calls) if _names(c, sc.listed_by)), -1) if sc.listed_by else -1
    out = Sweep(len(rec.calls), {}, [])
    for k in range(out.steps):
        root = _unpack(text, work / f"run{k}")
        with Vanishing(root, sc.victims, k, appear).active() as van:
            states = _states(root)
        assert van.fired
        state = states.get(DISK_FN, "ABSENT")
        out.states[state] = out.states.get(state, 0) + 1
        allowed = sc.allowed | ({"READY"} if k <= listed else set())
        out.unlisted += k <= listed
        where = f"{sc.name}: victims gone before step {k} ({van.calls[k]})"
        if state not in allowed:
            out.lies.append(f"{where}: {DISK_FN} {state}")
        # What the victim does not touch keeps its state.
        if states[IDLE_FN] != "READY" or states[ROOT_DISK] != "BUSY":
            out.lies.append(f"{where}: untouched functions {states[IDLE_FN]}, {states[ROOT_DISK]}")
        shutil.rmtree(root)
    return out


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_vanishing_at_every_step(sc: Scenario, tmp_path: Path) -> None:
    result = sweep(sc, tmp_path)
    assert result.steps > 50  # the scan really went through the patched calls
    assert result.lies == []
    # The injection did change what the scan saw for some steps (or the scenario proves nothing).
    assert len(result.states) > 1 or sc.name == "namespace", result.states


def _names(call: str, listed_by: str) -> bool:
    fn, _, path = call.partition(" ")
    want_fn, _, want_path = listed_by.partition(" ")
    return fn == want_fn and path.endswith("/" + want_path)
