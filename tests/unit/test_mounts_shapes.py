"""Thousands of copied namespaces: a copy is not parsed again, but its mounts are its own."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_mountinfo import OTHER, OTHER_TABLE, OWN, OWN_TABLE, Proc
from unplugd.agent.collectors.mounts import collect_mounts


def _renumbered(table: str, by: int) -> str:
    """The same table with other mount and parent ids: what `unshare -m` makes."""
    out = []
    for line in table.splitlines():
        mid, parent, rest = line.split(" ", 2)
        out.append(f"{int(mid) + by} {int(parent) + by} {rest}")
    return "\n".join(out) + "\n"


def test_copied_namespaces_keep_their_own_ids_and_share_the_first_ones_strings(tmp_path: Path) -> None:
    proc = Proc(tmp_path)
    proc.pid(1, OWN, OWN_TABLE)
    proc.self_is(1)
    proc.pid(200, OTHER, OTHER_TABLE)
    proc.pid(300, OTHER + 1, _renumbered(OTHER_TABLE, 1000))
    proc.pid(400, OTHER + 2, _renumbered(OTHER_TABLE, 2000))

    scan, problems = collect_mounts(proc.roots)

    assert problems == []
    by_ns = {ns: [m for m in scan.mounts if m.namespace == ns] for ns in (OTHER, OTHER + 1, OTHER + 2)}
    first, copy, third = by_ns[OTHER], by_ns[OTHER + 1], by_ns[OTHER + 2]
    assert [(m.mount_id, m.parent_id, m.namespace_pid) for m in copy] == [(1500, 1499, 300), (1501, 1500, 300)]
    assert [(m.mount_id, m.namespace_pid) for m in third] == [(2500, 400), (2501, 400)]
    for a, b in zip(first, copy, strict=True):
        assert (a.devno, a.root, a.mount_point, a.fstype, a.source, a.options) == (
            b.devno,
            b.root,
            b.mount_point,
            b.fstype,
            b.source,
            b.options,
        )
        assert a.mount_point is b.mount_point  # shared, not a second copy
    assert copy[1].mount_point == "/mnt/private data"  # unescaped as when parsed


def test_a_copy_with_one_line_changed_is_parsed_on_its_own(tmp_path: Path) -> None:
    proc = Proc(tmp_path)
    proc.pid(1, OWN, OWN_TABLE)
    proc.self_is(1)
    proc.pid(200, OTHER, OTHER_TABLE)
    proc.pid(300, OTHER + 1, _renumbered(OTHER_TABLE, 1000).replace("/mnt/private\\040data", "/elsewhere"))
    proc.pid(400, OTHER + 2, _renumbered(OTHER_TABLE, 2000) + "x y\n")  # malformed: not taken for a copy

    scan, problems = collect_mounts(proc.roots)

    assert {m.mount_point for m in scan.mounts if m.namespace == OTHER + 1} == {"/", "/elsewhere"}
    assert [m for m in scan.mounts if m.namespace == OTHER + 2] == []
    (problem,) = problems
    assert f"mnt:[{OTHER + 2}]" in problem.object


def test_other_namespaces_keep_only_mounts_that_can_pin_a_device(tmp_path: Path) -> None:
    proc = Proc(tmp_path)
    proc.pid(1, OWN, OWN_TABLE)
    proc.self_is(1)
    other = OTHER_TABLE + (
        "502 500 0:21 / /proc rw - proc proc rw\n"
        "503 500 0:30 / /tmp rw - tmpfs tmpfs rw\n"
        "504 500 0:45 /@home /home rw - btrfs /dev/vdc rw\n"  # anonymous number, named by its source
        "505 500 0:4 net:[4026532300] /run/netns/peer rw - nsfs nsfs rw\n"  # who holds a moved NIC
        # /dev, or one node, bound elsewhere: processes.py stat()s fds while such a mount exists
        "506 500 0:6 / /tmp/d rw - devtmpfs devtmpfs rw\n"
        "507 500 0:6 /loop0 /tmp/one-node rw - devtmpfs devtmpfs rw\n"
    )
    proc.pid(200, OTHER, other)
    proc.pid(300, OTHER + 1, _renumbered(other, 1000))  # a copy: the same mounts kept

    scan, problems = collect_mounts(proc.roots)

    assert problems == []
    assert {m.mount_point for m in scan.mounts if m.namespace == OWN} == {"/", "/proc", "/srv"}  # whole
    for ns in (OTHER, OTHER + 1):
        assert {m.mount_point for m in scan.mounts if m.namespace == ns} == {
            "/",
            "/mnt/private data",
            "/home",
            "/run/netns/peer",
            "/tmp/d",
            "/tmp/one-node",
        }
    assert [m.mount_id for m in scan.mounts if m.namespace == OTHER + 1] == [1500, 1501, 1504, 1505, 1506, 1507]
