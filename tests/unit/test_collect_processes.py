"""scan_processes on tmp trees: captured mode (fd links as text), live matching by devno, vanishing and denial."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from unplugd.agent.collectors.devlinks import resolve_dev_path
from unplugd.agent.collectors.processes import scan_files_on, scan_processes
from unplugd.agent.model import DeviceNode
from unplugd.agent.roots import Roots

VDB1 = DeviceNode("/dev/vdb1", (252, 17), "block")
DM0 = DeviceNode("/dev/dm-0", (253, 0), "block")
HIDRAW = DeviceNode("/dev/hidraw0", (241, 0), "char")


def add_process(base: Path, pid: int, comm: str, fds: dict[int, str], *, as_text: bool = False) -> Path:
    """proc/PID with comm and fd/N links whose text is the given target (or small files holding it)."""
    piddir = base / "proc" / str(pid)
    fd_dir = piddir / "fd"
    fd_dir.mkdir(parents=True)
    (piddir / "comm").write_text(comm + "\n")
    for n, target in fds.items():
        if as_text:
            (fd_dir / str(n)).write_text(target + "\n")
        else:
            (fd_dir / str(n)).symlink_to(target)
    return piddir


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    dev = tmp_path / "dev"
    (dev / "mapper").mkdir(parents=True)
    (dev / "disk" / "by-uuid").mkdir(parents=True)
    (dev / "vdb1").touch()
    (dev / "dm-0").touch()
    (dev / "mapper" / "vg-data").symlink_to("../dm-0")
    (dev / "disk" / "by-uuid" / "1234").symlink_to("../../vdb1")
    (dev / "escape").symlink_to("../../etc")
    (dev / "loop-a").symlink_to("loop-b")
    (dev / "loop-b").symlink_to("loop-a")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "self").symlink_to("1")  # not numeric: never scanned
    return tmp_path


def test_captured_tree_matches_by_resolved_node_path(tree: Path) -> None:
    add_process(tree, 100, "postgres", {0: "/dev/null", 3: "/dev/vdb1", 4: "/var/lib/pg/base/1", 5: "pipe:[9]"})
    add_process(tree, 101, "lvm-user", {7: "/dev/mapper/vg-data"})
    add_process(tree, 102, "by-uuid", {9: "/dev/disk/by-uuid/1234"})
    add_process(tree, 103, "decoy", {1: "/dev/vdb11", 2: "/dev/vdb", 3: "/dev/../dev/escape/vdb1", 4: "/dev/loop-a"})
    scan, problems = scan_processes(Roots.under(tree), [VDB1, DM0])
    got = [(r.pid, r.command, r.fd, r.devno, r.kind, r.target) for r in scan.open_refs]
    assert got == [
        (100, "postgres", 3, (252, 17), "block", "/dev/vdb1"),
        (101, "lvm-user", 7, (253, 0), "block", "/dev/mapper/vg-data"),
        (102, "by-uuid", 9, (252, 17), "block", "/dev/disk/by-uuid/1234"),
    ]
    assert problems == []


def test_captured_fds_stored_as_text_files(tree: Path) -> None:
    add_process(tree, 200, "dd", {3: "/dev/vdb1", 4: "socket:[555]"}, as_text=True)
    scan = scan_processes(Roots.under(tree), [VDB1], socket_inodes={555}).value
    assert [(r.pid, r.fd) for r in scan.open_refs] == [(200, 3)]
    assert scan.socket_owners == {555: [(200, "dd")]}


def test_socket_owners_only_for_wanted_inodes(tree: Path) -> None:
    add_process(tree, 300, "nginx", {3: "socket:[1001]", 4: "socket:[1002]", 5: "socket:[junk]"})
    add_process(tree, 301, "worker", {3: "socket:[1001]"})
    scan = scan_processes(Roots.under(tree), [], socket_inodes=[1001]).value
    assert scan.socket_owners == {1001: [(300, "nginx"), (301, "worker")]}
    assert scan.open_refs == []


def test_nothing_wanted_reads_no_fds(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_process(tree, 100, "x", {3: "/dev/vdb1"})

    def fail(*_a: object, **_k: object) -> str:
        raise AssertionError("readlink called although nothing is wanted")

    monkeypatch.setattr(os, "readlink", fail)
    scan, problems = scan_processes(Roots.under(tree), [])
    assert (scan.open_refs, scan.socket_owners, problems) == ([], {}, [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/dev/vdb1", "vdb1"),
        ("/dev/mapper/vg-data", "dm-0"),
        ("/dev/disk/by-uuid/1234", "vdb1"),
        ("/dev//./vdb1", "vdb1"),
        ("/dev/mapper/../vdb1", "vdb1"),
        ("/dev/not-in-tree", "not-in-tree"),
        ("/dev/escape/passwd", None),
        ("/dev/../etc/shadow", None),
        ("/dev/loop-a", None),
        ("/etc/passwd", None),
        ("/dev/", None),
    ],
)
def test_resolve_dev_path_takes_absent_nodes_as_named(tree: Path, text: str, expected: str | None) -> None:
    """fd link text in a captured tree, which holds only some nodes: absent ones are taken as named."""
    assert resolve_dev_path(tree / "dev", text, missing_ok=True) == expected


def test_absolute_symlink_inside_dev_is_followed(tree: Path) -> None:
    (tree / "dev" / "root").symlink_to("/dev/vdb1")
    assert resolve_dev_path(tree / "dev", "/dev/root", missing_ok=True) == "vdb1"


def test_pid_vanishing_before_its_fd_dir_opens_is_skipped(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_process(tree, 100, "gone", {3: "/dev/vdb1"})
    add_process(tree, 101, "stays", {3: "/dev/vdb1"})
    real_open = os.open

    def flaky_open(path: str, flags: int, *args: object, **kwargs: object) -> int:
        if str(path).endswith("/100/fd"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", flaky_open)
    scan, problems = scan_processes(Roots.under(tree), [VDB1])
    assert [r.pid for r in scan.open_refs] == [101]
    assert problems == []


def test_fd_closed_between_listing_and_readlink_is_skipped(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_process(tree, 100, "busy", {3: "/dev/vdb1", 4: "/dev/dm-0"})
    real_readlink = os.readlink

    def flaky_readlink(path: str, *, dir_fd: int | None = None) -> str:
        if path == "3":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return real_readlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "readlink", flaky_readlink)
    scan, problems = scan_processes(Roots.under(tree), [VDB1, DM0])
    assert [(r.pid, r.fd) for r in scan.open_refs] == [(100, 4)]
    assert problems == []


def test_process_exiting_before_comm_is_read_holds_nothing(tree: Path) -> None:
    piddir = add_process(tree, 100, "exiting", {3: "/dev/vdb1"})
    (piddir / "comm").unlink()
    assert scan_processes(Roots.under(tree), [VDB1]).value.open_refs == []


@pytest.mark.parametrize("where", ["open", "listdir", "readlink"])
def test_permission_denied_is_a_problem_affecting_everything(
    tree: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    add_process(tree, 100, "hidden", {3: "/dev/vdb1"})
    add_process(tree, 101, "visible", {3: "/dev/vdb1"})
    real = getattr(os, where)

    def denied(path: object, *args: object, **kwargs: object) -> object:
        target = str(path)
        # the fd table of pid 100, not its comm (read to name it in the problem)
        in_100 = ("/100/" in target and not target.endswith("/comm")) or (
            where != "open" and _fd_dir_of(args, kwargs, path) == "100"
        )
        if in_100:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, where, denied)
    scan, problems = scan_processes(Roots.under(tree), [VDB1])
    assert [r.pid for r in scan.open_refs] == [101]
    assert [(p.object, p.affects) for p in problems] == [("/proc/100/fd", ("*",))]
    assert "Permission denied" in problems[0].detail
    assert "pid 100 (hidden)" in problems[0].detail


def _fd_dir_of(args: tuple[object, ...], kwargs: dict[str, object], path: object) -> str:
    """For listdir(fd) / readlink(name, dir_fd=fd): which pid directory the descriptor is open on."""
    fd = kwargs.get("dir_fd", path if isinstance(path, int) else None)
    if not isinstance(fd, int):
        return ""
    return Path(os.readlink(f"/proc/self/fd/{fd}")).parent.name


def test_unlistable_proc_is_a_problem(tmp_path: Path) -> None:
    scan, problems = scan_processes(Roots.under(tmp_path / "nothing"), [VDB1])
    assert scan.open_refs == []
    assert [(p.object, p.affects) for p in problems] == [("/proc", ("*",))]


def _live_roots(base: Path) -> Roots:
    return Roots(sys=base / "sys", proc=base / "proc", dev=base / "dev", live=True, base=base)


def test_live_matches_by_device_number_not_by_name(tmp_path: Path) -> None:
    # Live, the fd entry is stat()ed: it follows to the node actually opened. Here the "fd links"
    # point at this machine's /dev/null, whatever name they carry in the wanted list.
    st = os.stat("/dev/null")
    null_devno = (os.major(st.st_rdev), os.minor(st.st_rdev))
    add_process(tmp_path, 400, "holder", {0: "/dev/null", 1: "/dev/does-not-exist"})
    add_process(tmp_path, 401, "elsewhere", {5: str(tmp_path / "dev" / "null")})
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "null").symlink_to("/dev/null")  # a container root's dev/: text differs, node is the same
    roots = _live_roots(tmp_path)

    renamed = DeviceNode("/dev/some-other-name", null_devno, "char")
    scan = scan_processes(roots, [renamed]).value
    assert [(r.pid, r.fd, r.devno, r.kind) for r in scan.open_refs] == [
        (400, 0, null_devno, "char"),
        (401, 5, null_devno, "char"),
    ]
    assert scan.open_refs[0].target == "/dev/null"

    # The same number as a block device is another device.
    assert scan_processes(roots, [DeviceNode("/dev/null", null_devno, "block")]).value.open_refs == []
    # A name alone never matches: /dev/does-not-exist cannot be stat()ed.
    ghost = DeviceNode("/dev/does-not-exist", (252, 99), "block")
    assert scan_processes(roots, [ghost]).value.open_refs == []


def test_live_a_node_under_a_devtmpfs_mounted_elsewhere_is_stat_ed(tmp_path: Path) -> None:
    """`unshare -Urm; mount --rbind /dev /tmp/d`: the fd reads "/tmp/d/null", in no dev/ directory.
    Given the devtmpfs mount points (device_dirs), such a text is stat()ed like a /dev/ one."""
    st = os.stat("/dev/null")
    null = DeviceNode("/dev/null", (os.major(st.st_rdev), os.minor(st.st_rdev)), "char")
    bound = tmp_path / "elsewhere"
    bound.mkdir()
    (bound / "null").symlink_to("/dev/null")  # what opening it through the bound /dev reaches
    (tmp_path / "one-node").symlink_to("/dev/null")  # one node bound onto a file
    add_process(tmp_path, 600, "hidden", {3: str(bound / "null"), 4: str(tmp_path / "one-node")})
    roots = _live_roots(tmp_path)

    assert scan_processes(roots, [null]).value.open_refs == []  # the text alone: not a device path
    dirs = [str(bound), str(tmp_path / "one-node"), "/dev"]
    refs = scan_processes(roots, [null], device_dirs=dirs).value.open_refs
    assert [(r.pid, r.fd, r.target) for r in refs] == [
        (600, 3, str(bound / "null")),
        (600, 4, str(tmp_path / "one-node")),
    ]


def test_live_any_devtmpfs_elsewhere_has_every_path_fd_stat_ed_whatever_its_text(tmp_path: Path) -> None:
    """The mount point's text need not be a prefix of the fd's: mountinfo escapes what the link
    text does not, and a user may make thousands of such mounts. So one is enough for a stat() of
    every path fd, and none of the texts need agree."""
    st = os.stat("/dev/null")
    null = DeviceNode("/dev/null", (os.major(st.st_rdev), os.minor(st.st_rdev)), "char")
    (tmp_path / "odd\nname").symlink_to("/dev/null")
    (tmp_path / "a-file").write_text("")
    add_process(tmp_path, 610, "hidden", {3: str(tmp_path / "odd\nname"), 4: str(tmp_path / "a-file")})
    roots = _live_roots(tmp_path)
    refs = scan_processes(roots, [null], device_dirs=["/somewhere/else"]).value.open_refs
    assert [(r.pid, r.fd) for r in refs] == [(610, 3)]
    assert scan_processes(roots, [null], device_dirs=["/dev/pts", "/"]).value.open_refs == []


def test_live_a_devtmpfs_at_a_namespace_root_does_not_make_every_file_a_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kdevtmpfs's namespace has devtmpfs at "/" on every machine: taken as a prefix, every open
    file of every process would be stat()ed."""
    st = os.stat("/dev/null")
    null = DeviceNode("/dev/null", (os.major(st.st_rdev), os.minor(st.st_rdev)), "char")
    add_process(tmp_path, 700, "reader", {3: str(tmp_path / "a-file")})
    statted: list[object] = []
    real_stat = os.stat

    def counting_stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        statted.append(path)
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", counting_stat)
    assert scan_processes(_live_roots(tmp_path), [null], device_dirs=["/", "/dev"]).value.open_refs == []
    assert statted == []


def test_live_stat_failure_other_than_vanishing_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.stat("/dev/null")
    null = DeviceNode("/dev/null", (os.major(st.st_rdev), os.minor(st.st_rdev)), "char")
    add_process(tmp_path, 500, "guarded", {0: "/dev/null"})
    add_process(tmp_path, 501, "gone-fd", {0: "/dev/null"})
    real_stat = os.stat

    def flaky_stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        owner = _fd_dir_of(args, kwargs, path)
        if owner == "500":
            raise PermissionError(errno.EACCES, "Permission denied")
        if owner == "501":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", flaky_stat)
    scan, problems = scan_processes(_live_roots(tmp_path), [null])
    assert scan.open_refs == []
    assert [(p.object, p.affects) for p in problems] == [("/proc/500/fd", ("*",))]


def test_files_on_a_filesystem_are_found_by_its_device_number(tmp_path: Path) -> None:
    """Live: this process's open file and nothing on another device number; never on a captured tree."""
    st = os.stat(tmp_path)
    devno = (os.major(st.st_dev), os.minor(st.st_dev))
    path = tmp_path / "held"
    path.write_text("x")
    with open(path) as held:
        refs, problems = scan_files_on(Roots.live_system(), {devno})
        assert problems == []
        mine = [r for r in refs if r.pid == os.getpid() and r.fd == held.fileno()]
        assert [(r.kind, r.devno, r.target) for r in mine] == [("file", devno, str(path))]
        assert all(r.devno == devno for r in refs)
        other = scan_files_on(Roots.live_system(), {(devno[0], devno[1] + 1000)}).value
        assert not any(r.pid == os.getpid() and r.fd == held.fileno() for r in other)
    assert scan_files_on(Roots.under(tmp_path), {devno}) == ([], [])
