"""parse_swaps (table) and collect_swaps: partitions through /dev links, swap files through mounts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unplugd.agent.collectors.swaps import collect_swaps, parse_swaps
from unplugd.agent.model import BlockDevice, Mount, ScanProblem, Swap, mount_holding
from unplugd.agent.roots import Roots

HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("", []),
        (
            "/dev/vdb2                               partition\t1048572\t\t0\t\t-2\n",
            [("/dev/vdb2", "partition", 1048572, 0)],
        ),
        (
            "/swap\\040file\tfile\t524284\t1024\t-3\n/dev/dm-1 partition 4 0 10\n",
            [("/swap file", "file", 524284, 1024), ("/dev/dm-1", "partition", 4, 0)],
        ),
        ("/srv/old\\040(deleted) file 8 0 -2\n", [("/srv/old (deleted)", "file", 8, 0)]),
    ],
)
def test_parse_swaps(body: str, expected: list[tuple[str, str, int, int]]) -> None:
    assert parse_swaps(HEADER + body) == expected


def test_parse_swaps_without_header() -> None:
    assert parse_swaps("/dev/vdb2 partition 8 0 -2") == [("/dev/vdb2", "partition", 8, 0)]


@pytest.mark.parametrize(
    "bad",
    [
        "/dev/vdb2 partition",
        "/dev/vdb2 partition big 0 -2",
        "/dev/vdb2 partition 8 -1 -2",
        "/dev/vd\\9b2 partition 8 0",
    ],
)
def test_parse_swaps_malformed_names_the_line(bad: str) -> None:
    got = parse_swaps(HEADER + "/dev/vda3 partition 8 0 -2\n" + bad + "\n")
    assert got[0] == ("/dev/vda3", "partition", 8, 0)
    (problem,) = got[1:]
    assert isinstance(problem, ScanProblem)
    assert "line 3" in problem.object
    assert problem.affects == ("*",)


def _mount(mount_id: int, devno: tuple[int, int], mount_point: str, source: str = "") -> Mount:
    return Mount(mount_id, 1, devno, "/", mount_point, "ext4", source, "rw")


MOUNTS = [
    _mount(27, (254, 0), "/", "/dev/vda"),
    _mount(40, (254, 17), "/srv", "/dev/vdb1"),
    _mount(41, (254, 33), "/srv/data", "/dev/vdc1"),
    _mount(42, (0, 45), "/srvx"),
]


@pytest.mark.parametrize(
    ("path", "mount_id"),
    [
        ("/swapfile", 27),
        ("/srv/swap", 40),
        ("/srv/data/swap", 41),
        ("/srv/database/swap", 40),  # /srv/data is not a component prefix of /srv/database
        ("/srvx/swap", 42),
        ("/srv", 40),
    ],
)
def test_swap_file_mount_longest_component_prefix(path: str, mount_id: int) -> None:
    m = mount_holding(path, MOUNTS)
    assert m is not None
    assert m.mount_id == mount_id


def test_swap_file_mount_stacked_mount_points_last_wins() -> None:
    stacked = [*MOUNTS, _mount(50, (8, 1), "/srv", "/dev/sda1")]
    m = mount_holding("/srv/swap", stacked)
    assert m is not None
    assert m.mount_id == 50
    assert mount_holding("/swap", []) is None


BLOCK = {
    "vdb2": BlockDevice("vdb2", "part", (254, 18), 0, parent="vdb"),
    "dm-0": BlockDevice("dm-0", "dm", (253, 0), 0, dm_name="swap"),
}


@pytest.fixture
def roots(tmp_path: Path) -> Roots:
    r = Roots.under(tmp_path)
    (r.dev / "mapper").mkdir(parents=True)
    r.proc.mkdir()
    (r.dev / "dm-0").write_text("")
    (r.dev / "vdb2").write_text("")
    os.symlink("../dm-0", r.dev / "mapper" / "cryptswap")
    return r


def test_collect_swaps_partition_mapper_link_and_file(roots: Roots) -> None:
    (roots.proc / "swaps").write_text(
        HEADER
        + "/dev/vdb2\tpartition\t1024\t0\t-2\n"
        + "/dev/mapper/cryptswap\tpartition\t2048\t512\t-3\n"
        + "/srv/data/swap\\040file\tfile\t4096\t0\t-4\n"
    )

    swaps, problems = collect_swaps(roots, MOUNTS, BLOCK)

    assert problems == []
    assert swaps == [
        Swap("/dev/vdb2", "partition", (254, 18), 1024, 0),
        Swap("/dev/mapper/cryptswap", "partition", (253, 0), 2048, 512),
        Swap("/srv/data/swap file", "file", (254, 33), 4096, 0),
    ]


def test_collect_swaps_malformed_line_fails_closed_but_keeps_the_rest(roots: Roots) -> None:
    (roots.proc / "swaps").write_text(HEADER + "/dev/vdb2 partition huge 0 -2\n/dev/dm-0 partition 8 0 -3\n")

    swaps, problems = collect_swaps(roots, MOUNTS, BLOCK)

    assert swaps == [Swap("/dev/dm-0", "partition", (253, 0), 8, 0)]
    (problem,) = problems
    assert problem.affects == ("*",)
    assert "line 2" in problem.object


def test_collect_swaps_unresolvable_partition_is_a_problem(roots: Roots) -> None:
    os.symlink("/etc/passwd", roots.dev / "mapper" / "evil")
    (roots.proc / "swaps").write_text(HEADER + "/dev/vdz9 partition 8 0 -2\n/dev/mapper/evil partition 8 0 -3\n")

    swaps, problems = collect_swaps(roots, MOUNTS, BLOCK)

    assert [s.devno for s in swaps] == [None, None]
    assert [p.object for p in problems] == ["/dev/vdz9", "/dev/mapper/evil"]
    assert all(p.affects == ("*",) for p in problems)


def test_collect_swaps_file_without_mount_and_unknown_type(roots: Roots) -> None:
    (roots.proc / "swaps").write_text(HEADER + "/swapfile file 8 0 -2\n/dev/zram0 zswap 8 0 -3\n")

    swaps, problems = collect_swaps(roots, [], BLOCK)

    assert [(s.path, s.devno) for s in swaps] == [("/swapfile", None), ("/dev/zram0", None)]
    assert len(problems) == 2
    assert "unknown swap type" in problems[1].detail


def test_collect_swaps_without_proc_swaps(roots: Roots) -> None:
    swaps, problems = collect_swaps(roots, MOUNTS, BLOCK)
    assert swaps == []
    assert [p.affects for p in problems] == [("*",)]


def test_collect_swaps_no_swap(roots: Roots) -> None:
    (roots.proc / "swaps").write_text(HEADER)
    assert collect_swaps(roots, MOUNTS, BLOCK) == ([], [])


def test_swap_file_mount_sees_mounts_the_agents_namespace_lacks() -> None:
    """The service's namespace need not see a later mount (found on the real kernel): pid 1's does."""
    own, host = 4026532500, 4026531840
    mounts = [
        _mount(1, (8, 1), "/", "/dev/sda1")._replace(namespace=own),
        _mount(2, (8, 1), "/", "/dev/sda1")._replace(namespace=host),
        _mount(3, (252, 48), "/mnt/swapf", "/dev/vdd")._replace(namespace=host),
        _mount(4, (252, 64), "/mnt", "/dev/vde")._replace(namespace=own),
    ]
    m = mount_holding("/mnt/swapf/swapfile", mounts, own)
    assert m is not None and m.mount_id == 3
    m = mount_holding("/swapfile", mounts, own)
    assert m is not None and m.mount_id == 1  # same mount point in two namespaces: the agent's own
