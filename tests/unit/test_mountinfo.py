"""parse_mountinfo (table) and collect_mounts over hand-built /proc trees."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from unplugd.agent.collectors.mounts import collect_mounts, parse_mnt_ns, parse_mountinfo
from unplugd.agent.errors import ParseError
from unplugd.agent.model import Mount
from unplugd.agent.roots import Roots
from unplugd.text import unescape_octal

ROOT_LINE = "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            ROOT_LINE,
            Mount(27, 1, (254, 0), "/", "/", "ext4", "/dev/vda", "rw,relatime"),
        ),
        (  # no optional fields at all
            "22 27 0:21 / /proc rw,relatime - proc proc rw",
            Mount(22, 27, (0, 21), "/", "/proc", "proc", "proc", "rw,relatime"),
        ),
        (  # several optional fields
            "36 35 98:0 /mnt1 /mnt/parent rw,noatime shared:1 master:2 propagate_from:3"
            " - ext3 /dev/root rw,errors=continue",
            Mount(36, 35, (98, 0), "/mnt1", "/mnt/parent", "ext3", "/dev/root", "rw,noatime"),
        ),
        (  # a bind mount of a subtree, with a space in both paths
            r"88 27 259:1 /data/my\040dir /srv/bind\040here rw shared:5 - xfs /dev/nvme0n1p1 rw",
            Mount(88, 27, (259, 1), "/data/my dir", "/srv/bind here", "xfs", "/dev/nvme0n1p1", "rw"),
        ),
        (  # tab, newline and backslash escapes
            r"90 27 7:0 / /mnt/a\011b\012c\134d rw - ext4 /dev/loop0 rw",
            Mount(90, 27, (7, 0), "/", "/mnt/a\tb\nc\\d", "ext4", "/dev/loop0", "rw"),
        ),
        (  # a source with a space and non-ASCII bytes
            r"91 27 0:50 / /mnt/caf\303\251 rw - fuse.sshfs user@host:/my\040files rw",
            Mount(91, 27, (0, 50), "/", "/mnt/café", "fuse.sshfs", "user@host:/my files", "rw"),
        ),
        (  # an empty source shows as two spaces in a row
            "92 27 0:51 / /mnt/t rw - tmpfs  rw,size=4k",
            Mount(92, 27, (0, 51), "/", "/mnt/t", "tmpfs", "", "rw"),
        ),
        (  # btrfs subvolume: 0:NN devno, the source names the device
            "93 27 0:33 /@home /home rw - btrfs /dev/vdb2 rw,subvol=/@home",
            Mount(93, 27, (0, 33), "/@home", "/home", "btrfs", "/dev/vdb2", "rw"),
        ),
    ],
)
def test_parse_mountinfo_lines(line: str, expected: Mount) -> None:
    assert parse_mountinfo(line + "\n") == [expected]


def test_parse_mountinfo_tags_namespace_and_skips_blank_lines() -> None:
    text = ROOT_LINE + "\n\n22 27 0:21 / /proc rw - proc proc rw\n"
    parsed = parse_mountinfo(text, namespace=4026531840, namespace_pid=812)
    assert [(m.mount_id, m.namespace, m.namespace_pid) for m in parsed] == [
        (27, 4026531840, 812),
        (22, 4026531840, 812),
    ]
    assert parse_mountinfo("") == []


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("27 1 254:0 / / rw,relatime", "separator"),  # truncated before '-'
        ("27 1 254:0 / / rw - ext4", "fewer than 3"),  # truncated after '-'
        ("x 1 254:0 / / rw - ext4 /dev/vda rw", "non-numeric"),
        ("27 -1 254:0 / / rw - ext4 /dev/vda rw", "non-numeric"),
        ("27 1 254 / / rw - ext4 /dev/vda rw", "device number"),
        (r"27 1 254:0 / /mnt/a\04 rw - ext4 /dev/vda rw", "bad escape"),
        (r"27 1 254:0 / /mnt/a\x20b rw - ext4 /dev/vda rw", "bad escape"),
        (r"27 1 254:0 / /mnt/a\ rw - ext4 /dev/vda rw", "bad escape"),
        (r"27 1 254:0 / /mnt/a\089 rw - ext4 /dev/vda rw", "bad escape"),
        ("27 1 254:0 /", "separator"),
    ],
)
def test_malformed_line_raises_parse_error_naming_the_line(bad: str, why: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_mountinfo(ROOT_LINE + "\n" + bad + "\n", source="mountinfo of mnt:[1]")
    assert "line 2" in str(info.value)
    assert why in str(info.value)
    assert "mountinfo of mnt:[1]" in str(info.value)


@pytest.mark.parametrize(
    ("text", "plain"),
    [("a", "a"), (r"a\040b", "a b"), (r"\134\134", "\\\\"), (r"\101\102", "AB"), (r"\303\251", "é")],
)
def test_unescape_octal(text: str, plain: str) -> None:
    assert unescape_octal(text) == plain


def test_parse_mnt_ns() -> None:
    assert parse_mnt_ns("mnt:[4026531840]\n") == 4026531840
    for bad in ("net:[4026531840]", "mnt:[]", "mnt:4026531840", ""):
        with pytest.raises(ValueError):
            parse_mnt_ns(bad)


OWN = 4026531840
OTHER = 4026532001

OWN_TABLE = """\
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
22 27 0:21 / /proc rw - proc proc rw
40 27 254:16 / /srv rw shared:9 - ext4 /dev/vdb rw
"""
OTHER_TABLE = """\
500 499 254:0 / / rw - ext4 /dev/vda rw
501 500 7:1 /sub /mnt/private\\040data rw - ext4 /dev/loop1p1 rw
"""


class Proc:
    def __init__(self, base: Path) -> None:
        self.proc = base / "proc"
        self.proc.mkdir()
        self.roots = Roots.under(base)

    def pid(self, pid: int, ns: int | None, mountinfo: str | None) -> Path:
        d = self.proc / str(pid)
        (d / "ns").mkdir(parents=True)
        if ns is not None:
            os.symlink(f"mnt:[{ns}]", d / "ns" / "mnt")
        if mountinfo is not None:
            (d / "mountinfo").write_text(mountinfo)
        return d

    def self_is(self, pid: int) -> None:
        os.symlink(str(pid), self.proc / "self")


@pytest.fixture
def proc(tmp_path: Path) -> Proc:
    return Proc(tmp_path)


def test_collect_mounts_every_namespace_once(proc: Proc) -> None:
    proc.pid(1, OWN, OWN_TABLE)
    proc.pid(100, OWN, OWN_TABLE)
    proc.pid(200, OTHER, OTHER_TABLE)
    proc.pid(201, OTHER, "garbage that is never read\n")  # a second pid of a namespace already read
    proc.self_is(100)
    (proc.proc / "stat").write_text("cpu 0\n")  # non-pid entries are ignored

    scan, problems = collect_mounts(proc.roots)

    assert problems == []
    assert scan.own_namespace == OWN
    assert scan.root_devno == (254, 0)
    assert [(m.mount_id, m.namespace, m.namespace_pid) for m in scan.mounts] == [
        (27, OWN, 100),
        (22, OWN, 100),
        (40, OWN, 100),
        (500, OTHER, 200),
        (501, OTHER, 200),
    ]
    private = [m for m in scan.mounts if m.devno == (7, 1)]
    assert [(m.mount_point, m.root, m.namespace) for m in private] == [("/mnt/private data", "/sub", OTHER)]
    assert [m.mount_id for m in scan.own_mounts()] == [27, 22, 40]


def test_vanished_first_pid_falls_back_to_the_next(proc: Proc) -> None:
    proc.pid(1, OWN, OWN_TABLE)
    proc.self_is(1)
    proc.pid(200, OTHER, None)  # exited between readlink and read
    proc.pid(300, OTHER, OTHER_TABLE)

    scan, problems = collect_mounts(proc.roots)

    assert problems == []
    assert {m.namespace_pid for m in scan.mounts if m.namespace == OTHER} == {300}


def test_malformed_mountinfo_fails_closed_for_that_namespace_only(proc: Proc) -> None:
    proc.pid(1, OWN, OWN_TABLE)
    proc.self_is(1)
    proc.pid(200, OTHER, OTHER_TABLE + "502 500 7:2 / /x rw\n")

    scan, problems = collect_mounts(proc.roots)

    assert [m.namespace for m in scan.mounts] == [OWN] * 3
    (problem,) = problems
    assert problem.affects == ("*",)
    assert f"mnt:[{OTHER}]" in problem.object
    assert "line 3" in problem.detail


def test_unreadable_mountinfo_is_a_problem(proc: Proc) -> None:
    proc.pid(1, OWN, OWN_TABLE)
    proc.self_is(1)
    d = proc.pid(200, OTHER, None)
    (d / "mountinfo").mkdir()  # EISDIR: readable by nobody, like EACCES

    problems = collect_mounts(proc.roots).problems

    (problem,) = problems
    assert problem.affects == ("*",)
    assert f"mnt:[{OTHER}]" in problem.object


def _deny_ns_links(monkeypatch: pytest.MonkeyPatch, pids: set[str]) -> None:
    """readlink of /proc/PID/ns/mnt fails with EACCES for pids, as ptrace rules make it."""
    real = os.readlink

    def readlink(path: str | os.PathLike[str]) -> str:
        p = Path(path)
        if p.name == "mnt" and p.parent.parent.name in pids:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real(path)

    monkeypatch.setattr("os.readlink", readlink)


def test_denied_ns_link_still_reads_the_mountinfo(proc: Proc, monkeypatch: pytest.MonkeyPatch) -> None:
    """ns/mnt needs ptrace access, mountinfo does not: group by mount ids instead."""
    proc.pid(1, None, OWN_TABLE)  # same namespace as ours (same mount ids)
    proc.pid(2, None, OTHER_TABLE)  # a namespace nobody else is in
    proc.pid(3, None, OTHER_TABLE)  # the same one again
    proc.pid(100, OWN, OWN_TABLE)
    proc.self_is(100)
    _deny_ns_links(monkeypatch, {"1", "2", "3"})
    scan, problems = collect_mounts(proc.roots)

    assert problems == []
    assert [(m.mount_id, m.namespace, m.namespace_pid) for m in scan.mounts] == [
        (27, OWN, 100),
        (22, OWN, 100),
        (40, OWN, 100),
        (500, 0, 2),
        (501, 0, 2),
    ]


def test_denied_ns_link_and_mountinfo_fail_closed(proc: Proc, monkeypatch: pytest.MonkeyPatch) -> None:
    proc.pid(1, None, None)
    (proc.proc / "1" / "mountinfo").mkdir()
    proc.pid(100, OWN, OWN_TABLE)
    proc.self_is(100)
    _deny_ns_links(monkeypatch, {"1"})
    problems = collect_mounts(proc.roots).problems

    (problem,) = problems
    assert problem.affects == ("*",)
    assert "1 process(es)" in problem.detail


def test_malformed_ns_link_is_a_problem(proc: Proc) -> None:
    proc.pid(1, OWN, OWN_TABLE)
    proc.self_is(1)
    d = proc.pid(7, None, OTHER_TABLE)
    os.symlink("mnt:[oops]", d / "ns" / "mnt")

    problems = collect_mounts(proc.roots).problems

    assert [p.object for p in problems] == [str(d / "ns" / "mnt")]
    assert problems[0].affects == ("*",)


def test_no_self_link_is_a_problem_but_other_namespaces_are_read(proc: Proc) -> None:
    proc.pid(200, OTHER, OTHER_TABLE)

    scan, problems = collect_mounts(proc.roots)

    assert scan.own_namespace == 0
    assert scan.root_devno is None
    assert len(scan.mounts) == 2
    assert [p.affects for p in problems] == [("*",)]
    assert "agent's mount namespace" in problems[0].detail


def test_stacked_root_mounts_pick_the_visible_one(proc: Proc) -> None:
    table = (
        "1 1 0:2 / / rw - rootfs rootfs rw\n"
        "27 1 254:1 / / rw - ext4 /dev/vda1 rw\n"
        "22 27 0:21 / /proc rw - proc proc rw\n"
    )
    proc.pid(1, OWN, table)
    proc.self_is(1)

    scan = collect_mounts(proc.roots).value

    assert scan.root_devno == (254, 1)


def test_own_namespace_without_root_mount_is_a_problem(proc: Proc) -> None:
    proc.pid(1, OWN, "22 27 0:21 / /proc rw - proc proc rw\n")
    proc.self_is(1)

    scan, problems = collect_mounts(proc.roots)

    assert scan.root_devno is None
    assert [p.detail for p in problems] == ["no mount on / in the agent's namespace"]


def test_no_proc_at_all(tmp_path: Path) -> None:
    scan, problems = collect_mounts(Roots.under(tmp_path))
    assert scan.mounts == []
    assert problems and all(p.affects == ("*",) for p in problems)


def test_live_system_reads_own_namespace() -> None:
    scan = collect_mounts(Roots.live_system()).value
    assert scan.own_namespace == parse_mnt_ns(os.readlink("/proc/self/ns/mnt"))
    assert scan.root_devno == (os.major(os.stat("/").st_dev), os.minor(os.stat("/").st_dev))
    assert any(m.mount_point == "/" and m.namespace == scan.own_namespace for m in scan.mounts)


def test_namespace_zero_from_a_capture_is_read_per_pid(proc: Proc) -> None:
    """A capture writes mnt:[0] when it could not tell; each such pid's table is read and deduplicated."""
    proc.pid(1, 0, OWN_TABLE)  # really our namespace
    proc.pid(2, 0, OTHER_TABLE)  # really another one
    proc.pid(100, OWN, OWN_TABLE)
    proc.self_is(100)

    scan, problems = collect_mounts(proc.roots)

    assert problems == []
    assert [(m.mount_id, m.namespace, m.namespace_pid) for m in scan.mounts if m.namespace != OWN] == [
        (500, 0, 2),
        (501, 0, 2),
    ]
