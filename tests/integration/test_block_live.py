"""Block, mount and swap collectors and the O_EXCL probe against real loop devices (root only)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.loopdev import (
    LoopDisk,
    loop_disk,
    mounted_in_private_namespace,
    require_tools,
    run,
    swapped_on,
    wait_for,
)
from unplugd.agent.capture import capture
from unplugd.agent.collectors.block import collect_block, find_block_node, probe_exclusive
from unplugd.agent.collectors.mounts import collect_mounts
from unplugd.agent.collectors.pci import collect_pci
from unplugd.agent.collectors.swaps import collect_swaps
from unplugd.agent.model import BlockDevice, DevNo, Mount
from unplugd.agent.roots import Roots

LIVE = Roots.live_system()
TABLE = "label: gpt\n,32M,L\n,,S\n"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[LoopDisk]:
    require_tools()
    with loop_disk(tmp_path, TABLE) as d:
        run("mkfs.ext4", "-q", "-F", str(d.part_node(0)))
        run("mkswap", str(d.part_node(1)))
        yield d


def _rdev(node: Path) -> DevNo:
    st = os.stat(node)
    assert stat.S_ISBLK(st.st_mode)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def _mine(disk: LoopDisk) -> list[BlockDevice]:
    devices, _ = collect_block(LIVE)
    return [devices[n] for n in (disk.disk, *disk.parts)]


def _busy(disk: LoopDisk) -> frozenset[str]:
    busy, problems = probe_exclusive(LIVE, _mine(disk))
    assert problems == []
    return busy


def test_collect_block_sees_disk_and_partitions(disk: LoopDisk) -> None:
    devices, problems = collect_block(LIVE)

    assert not [p for p in problems if set(p.affects) & {disk.disk, *disk.parts}]
    whole = devices[disk.disk]
    assert whole.kind == "loop"
    assert whole.devno == _rdev(disk.node)
    assert whole.backing_file == str(disk.image)
    assert whole.size_bytes == 64 << 20
    for i, name in enumerate(disk.parts):
        part = devices[name]
        assert part.kind == "part"
        assert part.parent == disk.disk
        assert part.devno == _rdev(disk.part_node(i))
    assert devices[disk.parts[0]].size_bytes == 32 << 20


def test_mount_in_private_namespace_only_there_and_exclusive_busy(disk: LoopDisk, tmp_path: Path) -> None:
    devno = _rdev(disk.part_node(0))
    assert _busy(disk) == frozenset()

    with mounted_in_private_namespace(disk.part_node(0), tmp_path / "mnt point") as holder:
        scan = collect_mounts(LIVE).value
        found = [m for m in scan.mounts if m.devno == devno]
        assert len(found) == 1
        (m,) = found
        assert m.mount_point == str(tmp_path / "mnt point")  # \040 unescaped
        assert m.namespace not in (0, scan.own_namespace)
        assert m.namespace == int(os.readlink(f"/proc/{holder.pid}/ns/mnt")[5:-1])
        assert m.fstype == "ext4"
        assert not [x for x in scan.own_mounts() if x.devno == devno]
        # A mounted partition claims itself and, through bd_may_claim, its whole disk.
        assert _busy(disk) == {disk.disk, disk.parts[0]}
        # The agent's own lease claims are skipped, not reported.
        busy, _ = probe_exclusive(LIVE, _mine(disk), skip={disk.disk})
        assert busy == {disk.parts[0]}

    # The namespace dies with its last process; its mounts go with it (asynchronously).
    wait_for(lambda: _busy(disk) == frozenset(), what="release after the namespace is gone")
    assert not [m for m in collect_mounts(LIVE).value.mounts if m.devno == devno]


def test_swap_partition_is_found_and_claims_the_disk(disk: LoopDisk) -> None:
    devno = _rdev(disk.part_node(1))
    with swapped_on(disk.part_node(1)):
        block, _ = collect_block(LIVE)
        scan = collect_mounts(LIVE).value
        swaps, problems = collect_swaps(LIVE, scan.own_mounts(), block)
        mine = [s for s in swaps if s.devno == devno]
        assert [(s.path, s.kind) for s in mine] == [(str(disk.part_node(1)), "partition")]
        assert mine[0].size_kib > 0
        assert problems == []
        assert _busy(disk) == {disk.disk, disk.parts[1]}
    assert _busy(disk) == frozenset()
    block, _ = collect_block(LIVE)
    swaps, _ = collect_swaps(LIVE, collect_mounts(LIVE).value.own_mounts(), block)
    assert not [s for s in swaps if s.devno == devno]


def test_swap_file_resolves_to_its_filesystem(disk: LoopDisk, tmp_path: Path) -> None:
    mnt = tmp_path / "fs"
    mnt.mkdir()
    run("mount", str(disk.part_node(0)), str(mnt))
    try:
        swapfile = mnt / "swap file"
        run("dd", "if=/dev/zero", f"of={swapfile}", "bs=1M", "count=8", "status=none")
        swapfile.chmod(0o600)
        run("mkswap", str(swapfile))
        with swapped_on(swapfile):
            block, _ = collect_block(LIVE)
            swaps, problems = collect_swaps(LIVE, collect_mounts(LIVE).value.own_mounts(), block)
            mine = [s for s in swaps if s.path == str(swapfile)]
            assert [(s.kind, s.devno) for s in mine] == [("file", _rdev(disk.part_node(0)))]
            assert problems == []
    finally:
        run("umount", str(mnt))


def test_plain_open_is_not_an_exclusive_claim(disk: LoopDisk) -> None:
    fd = os.open(disk.node, os.O_RDONLY)
    try:
        assert _busy(disk) == frozenset()
    finally:
        os.close(fd)


def test_exclusive_claim_on_the_disk_blocks_mount_of_a_partition(disk: LoopDisk, tmp_path: Path) -> None:
    """What PrepareUnplug relies on: holding O_EXCL on the disk keeps its partitions unmountable."""
    fd = os.open(disk.node, os.O_RDONLY | os.O_EXCL)
    try:
        mnt = tmp_path / "m"
        mnt.mkdir()
        with pytest.raises(OSError) as info:
            probe_fd = os.open(disk.part_node(0), os.O_RDONLY | os.O_EXCL)
            os.close(probe_fd)
        assert info.value.errno == errno.EBUSY
        mount = subprocess.run(["mount", str(disk.part_node(0)), str(mnt)], check=False, capture_output=True)
        assert mount.returncode != 0
        # The holder itself is skipped by name: the probe must not count the agent's own claim.
        busy, _ = probe_exclusive(LIVE, _mine(disk), skip={disk.disk})
        assert busy == set(disk.parts)
    finally:
        os.close(fd)
        with contextlib.suppress(Exception):
            run("umount", str(tmp_path / "m"))


def test_probe_opens_only_the_node_with_the_right_number(disk: LoopDisk, tmp_path: Path) -> None:
    """A private /dev where the names lie: the probe trusts st_rdev, never the name."""
    roots = Roots.under(tmp_path / "fake")._replace(sys=LIVE.sys, live=True)
    (roots.dev / "block").mkdir(parents=True)
    whole, p1, p2 = _mine(disk)
    # /dev/<disk> is really partition 2; the by-number link of p1 is right.
    os.mknod(roots.dev / whole.name, 0o600 | stat.S_IFBLK, os.makedev(*p2.devno))
    os.mknod(roots.dev / "real-p1", 0o600 | stat.S_IFBLK, os.makedev(*p1.devno))
    os.symlink("../real-p1", roots.dev / "block" / f"{p1.devno[0]}:{p1.devno[1]}")

    assert find_block_node(roots, whole) is None
    assert find_block_node(roots, p1) == roots.dev / "real-p1"

    with swapped_on(disk.part_node(1)):
        busy, problems = probe_exclusive(roots, [whole, p1, p2])
    # p2 (swapped) is not probed through the lying name: no node for it, a problem instead.
    assert busy == frozenset()
    assert sorted(p.affects for p in problems) == [(whole.name,), (p2.name,)]


def test_live_pci_functions_list_their_disks() -> None:
    """Every disk whose sysfs device sits below a PCI function is listed on that function."""
    functions, problems = collect_pci(LIVE)
    assert functions
    assert not [p for p in problems if p.affects != ("*",)]
    by_bdf = {str(f.address): f for f in functions}
    checked = 0
    for entry in Path("/sys/block").iterdir():
        real = Path(os.path.realpath(entry)).parts
        bdfs = [p for p in real if p.count(":") == 2 and "." in p]
        if not bdfs:
            continue
        assert entry.name in by_bdf[bdfs[-1]].block_devices
        checked += 1
    if not checked:
        pytest.skip("no PCI-attached disk on this machine")


def test_captured_tree_gives_the_collectors_the_same_answers(disk: LoopDisk, tmp_path: Path) -> None:
    """`unplugd capture` then the collectors on the copy: the same functions, devices, mounts and swaps."""
    with (
        mounted_in_private_namespace(disk.part_node(0), tmp_path / "mnt"),
        swapped_on(disk.part_node(1)),
    ):
        capture(tmp_path / "tree")
        live_block = collect_block(LIVE)
        live_mounts = collect_mounts(LIVE).value
        live_swaps = collect_swaps(LIVE, live_mounts.own_mounts(), live_block[0])
    captured = Roots.under(tmp_path / "tree")

    assert collect_pci(captured) == collect_pci(LIVE)
    cap_block = collect_block(captured)
    assert cap_block[0][disk.disk] == live_block[0][disk.disk]
    assert cap_block[0][disk.parts[0]] == live_block[0][disk.parts[0]]
    cap_mounts = collect_mounts(captured).value
    assert cap_mounts.own_namespace == live_mounts.own_namespace
    assert cap_mounts.root_devno == live_mounts.root_devno
    p1 = live_block[0][disk.parts[0]].devno

    def private(scan_mounts: list[Mount]) -> list[tuple[str, int]]:
        return [(m.mount_point, m.namespace) for m in scan_mounts if m.devno == p1]

    assert private(cap_mounts.mounts) == private(live_mounts.mounts) != []
    cap_swaps = collect_swaps(captured, cap_mounts.own_mounts(), cap_block[0])
    p2 = live_block[0][disk.parts[1]].devno
    assert [s for s in cap_swaps[0] if s.devno == p2] == [s for s in live_swaps[0] if s.devno == p2] != []
    # No kernel behind a captured tree: the probe says nothing.
    assert probe_exclusive(captured, cap_block[0].values()) == (frozenset(), [])
