"""collect_block, resolve_dev_path and probe_exclusive on hand-built trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unplugd.agent.collectors import block
from unplugd.agent.collectors.block import (
    collect_block,
    devno_index,
    find_block_node,
    parse_sectors,
    probe_exclusive,
)
from unplugd.agent.collectors.devlinks import resolve_dev_path
from unplugd.agent.errors import ReadError, Vanished
from unplugd.agent.model import BlockDevice
from unplugd.agent.roots import Roots
from unplugd.agent.sysio import listdir, read_text, read_text_or


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class BlockTree:
    """sys/devices/... block directories plus the sys/class/block links, as the kernel lays them out."""

    def __init__(self, base: Path) -> None:
        self.sys = base / "sys"
        (self.sys / "class" / "block").mkdir(parents=True)
        self.roots = Roots.under(base)

    def device(self, parent_dir: str, name: str, devno: str, sectors: int = 2048) -> Path:
        d = self.sys / parent_dir / name
        _write(d / "dev", devno + "\n")
        _write(d / "size", f"{sectors}\n")
        (d / "holders").mkdir()
        (d / "slaves").mkdir()
        os.symlink(f"../../{parent_dir}/{name}", self.sys / "class" / "block" / name)
        return d

    def disk(self, name: str, devno: str, under: str = "devices/pci0000:00/0000:00:02.0/virtio1/block") -> Path:
        return self.device(under, name, devno)

    def part(self, disk: Path, name: str, devno: str, number: int = 1) -> Path:
        d = self.device(str(disk.relative_to(self.sys)), name, devno, sectors=1024)
        _write(d / "partition", f"{number}\n")
        return d


def stack(upper: Path, lower: Path) -> None:
    """upper is built on lower: lower/holders/upper and upper/slaves/lower."""
    os.symlink(f"../../{upper.name}", lower / "holders" / upper.name)
    os.symlink(f"../../{lower.name}", upper / "slaves" / lower.name)


@pytest.fixture
def tree(tmp_path: Path) -> BlockTree:
    return BlockTree(tmp_path)


def test_disk_partitions_and_stack(tree: BlockTree) -> None:
    vdb = tree.disk("vdb", "254:16")
    vdb1 = tree.part(vdb, "vdb1", "254:17")
    vdb2 = tree.part(vdb, "vdb2", "254:18", number=2)
    crypt = tree.device("devices/virtual/block", "dm-0", "253:0")
    _write(crypt / "dm" / "name", "luks-data\n")
    _write(crypt / "dm" / "uuid", "CRYPT-LUKS2-abc-luks-data\n")
    lv = tree.device("devices/virtual/block", "dm-1", "253:1")
    _write(lv / "dm" / "name", "vg-lv\n")
    _write(lv / "dm" / "uuid", "LVM-xyz\n")
    md = tree.device("devices/virtual/block", "md0", "9:0")
    _write(md / "md" / "level", "raid1\n")
    stack(crypt, vdb1)
    stack(lv, crypt)
    stack(md, vdb2)

    devices, problems = collect_block(tree.roots)

    assert problems == []
    assert devices["vdb"] == BlockDevice("vdb", "disk", (254, 16), 2048 * 512)
    assert devices["vdb1"] == BlockDevice("vdb1", "part", (254, 17), 1024 * 512, parent="vdb", holders=("dm-0",))
    assert devices["vdb2"].parent == "vdb"
    assert devices["vdb2"].holders == ("md0",)
    assert devices["dm-0"].kind == "dm"
    assert devices["dm-0"].dm_name == "luks-data"
    assert devices["dm-0"].dm_uuid == "CRYPT-LUKS2-abc-luks-data"
    assert devices["dm-0"].slaves == ("vdb1",)
    assert devices["dm-0"].holders == ("dm-1",)
    assert devices["dm-0"].label == "dm-0 (luks-data)"
    assert devices["dm-1"].slaves == ("dm-0",)
    assert devices["md0"] == BlockDevice("md0", "md", (9, 0), 2048 * 512, slaves=("vdb2",), md_level="raid1")
    assert devno_index(devices)[(254, 17)] == "vdb1"


def test_loop_devices_bound_and_unbound(tree: BlockTree) -> None:
    bound = tree.device("devices/virtual/block", "loop0", "7:0")
    _write(bound / "loop" / "backing_file", "/srv/disk image.img\n")
    tree.device("devices/virtual/block", "loop1", "7:1", sectors=0)
    part = tree.part(bound, "loop0p1", "259:0")
    assert part.is_dir()

    devices, problems = collect_block(tree.roots)

    assert problems == []
    assert devices["loop0"].kind == "loop"
    assert devices["loop0"].backing_file == "/srv/disk image.img"
    assert devices["loop1"] == BlockDevice("loop1", "loop", (7, 1), 0)
    assert devices["loop0p1"].kind == "part"
    assert devices["loop0p1"].parent == "loop0"


def test_fallback_to_sys_block(tmp_path: Path) -> None:
    disk = tmp_path / "sys" / "block" / "sda"
    _write(disk / "dev", "8:0\n")
    _write(disk / "size", "100\n")
    _write(disk / "sda1" / "dev", "8:1\n")
    _write(disk / "sda1" / "size", "50\n")
    _write(disk / "sda1" / "partition", "1\n")

    devices, problems = collect_block(Roots.under(tmp_path))

    assert problems == []
    assert devices["sda"] == BlockDevice("sda", "disk", (8, 0), 51200)
    assert devices["sda1"] == BlockDevice("sda1", "part", (8, 1), 25600, parent="sda")


def test_malformed_and_vanished_devices_are_problems(tree: BlockTree) -> None:
    tree.disk("vda", "254:0")
    bad = tree.disk("vdb", "254:16")
    (bad / "dev").write_text("254-16\n")
    worse = tree.disk("vdc", "254:32")
    (worse / "size").write_text("lots\n")
    os.symlink("../../devices/virtual/block/gone", tree.sys / "class" / "block" / "gone")
    odd = tree.disk("vdd", "254:48")
    (odd / "dev").unlink()
    (odd / "dev").mkdir()  # unreadable like EACCES would be

    devices, problems = collect_block(tree.roots)

    assert list(devices) == ["vda"]
    assert sorted(p.affects for p in problems) == [("gone",), ("vdb",), ("vdc",), ("vdd",)]
    by = {p.affects[0]: p.detail for p in problems}
    assert "vanished" in by["gone"]
    assert "254-16" in by["vdb"]
    assert "lots" in by["vdc"]


def test_unreadable_holders_are_a_problem(tree: BlockTree) -> None:
    vda = tree.disk("vda", "254:0")
    (vda / "holders").rmdir()
    (vda / "holders").write_text("")  # listdir of a file: ENOTDIR is not "empty"

    devices, problems = collect_block(tree.roots)

    # ENOTDIR reads as vanished: the device is skipped and named.
    assert "vda" not in devices
    assert [p.affects for p in problems] == [("vda",)]


def test_empty_tree(tmp_path: Path) -> None:
    assert collect_block(Roots.under(tmp_path)) == ({}, [])


@pytest.mark.parametrize(("text", "size"), [("0\n", 0), ("2048", 1048576), (" 8 \n", 4096)])
def test_parse_sectors(text: str, size: int) -> None:
    assert parse_sectors(text) == size


@pytest.mark.parametrize("text", ["", "-1", "1.5", "0x10", "lots"])
def test_parse_sectors_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_sectors(text)


@pytest.fixture
def dev(tmp_path: Path) -> Path:
    d = tmp_path / "dev"
    (d / "mapper").mkdir(parents=True)
    (d / "block").mkdir()
    (d / "dm-0").write_text("")
    (d / "vdb2").write_text("")
    os.symlink("../dm-0", d / "mapper" / "swap")
    os.symlink("/dev/dm-0", d / "mapper" / "abs")
    os.symlink("../vdb2", d / "block" / "254:18")
    os.symlink("../../etc/passwd", d / "block" / "1:1")
    os.symlink("/etc/passwd", d / "outside")
    os.symlink("loop-b", d / "loop-a")
    os.symlink("loop-a", d / "loop-b")
    os.symlink("mapper", d / "mapdir")
    return d


@pytest.mark.parametrize(
    ("live_path", "resolved"),
    [
        ("/dev/dm-0", "dm-0"),
        ("/dev/mapper/swap", "dm-0"),
        ("/dev/mapper/abs", "dm-0"),
        ("/dev/mapdir/swap", "dm-0"),
        ("/dev/block/254:18", "vdb2"),
        ("/dev/mapper/../vdb2", "vdb2"),
        ("/dev//./vdb2", "vdb2"),
        ("/dev/block/1:1", None),  # climbs out of /dev
        ("/dev/outside", None),  # absolute link elsewhere
        ("/dev/../etc/shadow", None),
        ("/dev/loop-a", None),  # a link cycle
        ("/dev/missing", None),
        ("/etc/shadow", None),
        ("/dev", None),
        ("/dev/", None),
    ],
)
def test_resolve_dev_path(dev: Path, live_path: str, resolved: str | None) -> None:
    assert resolve_dev_path(dev, live_path) == resolved


def test_probe_exclusive_is_empty_on_captured_trees(tree: BlockTree) -> None:
    tree.disk("vda", "254:0")
    devices, _ = collect_block(tree.roots)
    assert probe_exclusive(tree.roots, devices.values()) == (frozenset(), [])


def _live_roots(tmp_path: Path) -> Roots:
    return Roots.under(tmp_path)._replace(live=True)


def test_probe_never_opens_a_node_that_is_not_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    roots = _live_roots(tmp_path)
    (roots.dev / "block").mkdir(parents=True)
    _write(tmp_path / "etc" / "shadow", "secret\n")
    # A name and a by-number link that both lead to a regular file; and a hostile kernel name.
    os.symlink("../../etc/shadow", roots.dev / "block" / "254:0")
    _write(roots.dev / "vda", "not a block node\n")
    _write(roots.sys / "dev" / "block" / "254:0" / "dev", "254:0\n")
    _write(roots.sys / "dev" / "block" / "254:1" / "dev", "254:1\n")
    devices = [BlockDevice("vda", "disk", (254, 0), 0), BlockDevice("../../etc/shadow", "part", (254, 1), 0)]
    opened: list[object] = []
    monkeypatch.setattr(block, "_probe_one", lambda node, dev: opened.append(node))

    busy, problems = probe_exclusive(roots, devices)

    assert opened == []
    assert busy == frozenset()
    assert sorted(p.affects for p in problems) == [("../../etc/shadow",), ("vda",)]
    assert all("no block node" in p.detail for p in problems)


def test_probe_skips_vanished_and_claimed_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    roots = _live_roots(tmp_path)
    roots.dev.mkdir()
    devices = [BlockDevice("vdz", "disk", (254, 99), 0), BlockDevice("vdb", "disk", (254, 16), 0)]
    called: list[str] = []
    monkeypatch.setattr(block, "find_block_node", lambda r, d: called.append(d.name))

    busy, problems = probe_exclusive(roots, devices, skip={"vdb"})

    # vdz has no sys/dev/block entry any more: gone since collect_block, not a problem.
    assert (busy, problems) == (frozenset(), [])
    assert called == ["vdz"]


def test_find_block_node_requires_block_node_with_matching_number(tmp_path: Path) -> None:
    roots = _live_roots(tmp_path)
    roots.dev.mkdir()
    (roots.dev / "vda").write_text("")
    assert find_block_node(roots, BlockDevice("vda", "disk", (254, 0), 0)) is None


def test_read_text_reads_small_and_large_files(tmp_path: Path) -> None:
    small = tmp_path / "dev"
    small.write_text("254:0\n")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 100_000 + b"\xff")
    assert read_text(str(small)) == "254:0\n"
    text = read_text(str(big))
    assert len(text) == 100_001
    assert text.encode("utf-8", "surrogateescape")[-1] == 0xFF
    assert read_text_or(str(tmp_path / "absent"), "none") == "none"
    with pytest.raises(Vanished):
        read_text(str(tmp_path / "absent"))
    with pytest.raises(ReadError):
        read_text(str(tmp_path))  # EISDIR
    assert listdir(str(tmp_path / "absent")) == []
    assert listdir(str(tmp_path)) == ["big", "dev"]


# --------------------------------------------------------------------------- NVMe multipath (issue 15)

CTRL = {
    "nvme1": "devices/pci0000:00/0000:00:10.1/0000:02:00.0/nvme",
    "nvme2": "devices/pci0000:00/0000:00:10.2/0000:03:00.0/nvme",
}
SUBSYS = "devices/virtual/nvme-subsystem/nvme-subsys2"


def nvme_subsystem(tree: BlockTree, *, paths: dict[str, str], nsid: str = "1", multipath_dir: bool = False) -> Path:
    """The layout Debian 12's kernel (6.1) shows, recorded in the test guest: head nvme2n1 under the
    subsystem (its `device` link names it), the subsystem's links to its controllers, and below each
    controller a hidden path device with no `dev`, whose `device` link names the controller.

    paths: path device name -> controller; multipath_dir: also give the head a multipath/ directory of
    links, as newer kernels do.
    """
    sdir = tree.sys / SUBSYS
    sdir.mkdir(parents=True)
    os.symlink("../../../../class/nvme-subsystem", sdir / "subsystem")
    for ctrl, parent in CTRL.items():
        (tree.sys / parent / ctrl).mkdir(parents=True)
        os.symlink(f"../../../{parent.removeprefix('devices/')}/{ctrl}", sdir / ctrl)
    head = tree.device(SUBSYS, "nvme2n1", "259:1")
    _write(head / "nsid", "1\n")
    _write(head / "hidden", "0\n")
    os.symlink("../../nvme-subsys2", head / "device")
    for name, ctrl in paths.items():
        p = tree.sys / CTRL[ctrl] / ctrl / name
        _write(p / "hidden", "1\n")
        _write(p / "nsid", nsid + "\n")
        _write(p / "size", "2048\n")
        (p / "holders").mkdir()
        os.symlink(f"../../{ctrl}", p / "device")
        os.symlink(f"../../{CTRL[ctrl]}/{ctrl}/{name}", tree.sys / "class" / "block" / name)
        if multipath_dir:
            (head / "multipath").mkdir(exist_ok=True)
            os.symlink(f"../../../../../pci0000:00/{CTRL[ctrl].split('/', 2)[2]}/{ctrl}/{name}",
                       head / "multipath" / name)  # fmt: skip
    return head


WHERE = {
    "nvme2c1n1": "/sys/devices/pci0000:00/0000:00:10.1/0000:02:00.0/nvme/nvme1/nvme2c1n1",
    "nvme2c2n1": "/sys/devices/pci0000:00/0000:00:10.2/0000:03:00.0/nvme/nvme2/nvme2c2n1",
}


@pytest.mark.parametrize("multipath_dir", [False, True], ids=["6.1: subsystem links", "multipath/ links"])
def test_nvme_head_runs_over_its_hidden_paths_which_are_no_devices(tree: BlockTree, multipath_dir: bool) -> None:
    nvme_subsystem(tree, paths={"nvme2c1n1": "nvme1", "nvme2c2n1": "nvme2"}, multipath_dir=multipath_dir)
    devices, problems = collect_block(tree.roots)
    assert problems == []  # a path device has no dev: it is not "vanished during the scan"
    assert list(devices) == ["nvme2n1"]
    assert devices["nvme2n1"].multipath == (WHERE["nvme2c1n1"], WHERE["nvme2c2n1"])
    assert devices["nvme2n1"].devno == (259, 1)


def test_a_path_of_another_namespace_is_not_the_heads(tree: BlockTree) -> None:
    nvme_subsystem(tree, paths={"nvme2c1n1": "nvme1"})
    other = tree.sys / CTRL["nvme2"] / "nvme2" / "nvme2c2n2"  # namespace 2 through the second controller
    _write(other / "hidden", "1\n")
    _write(other / "nsid", "2\n")
    os.symlink("../../nvme2", other / "device")
    os.symlink(f"../../{CTRL['nvme2']}/nvme2/nvme2c2n2", tree.sys / "class" / "block" / "nvme2c2n2")
    devices, problems = collect_block(tree.roots)
    assert (devices["nvme2n1"].multipath, problems) == ((WHERE["nvme2c1n1"],), [])


def test_a_head_with_no_path_found_fails_closed(tree: BlockTree) -> None:
    nvme_subsystem(tree, paths={"nvme2c1n1": "nvme1"}, nsid="7")
    devices, problems = collect_block(tree.roots)
    assert devices["nvme2n1"].multipath == ()
    (p,) = problems
    assert p.affects == ("*",) and "no path found" in p.detail


def test_a_device_without_dev_that_is_not_hidden_is_a_problem_not_vanished(tree: BlockTree) -> None:
    odd = tree.disk("vdz", "254:0")
    (odd / "dev").unlink()
    devices, problems = collect_block(tree.roots)
    assert devices == {}
    assert [(p.affects, "no device number" in p.detail, "vanished" in p.detail) for p in problems] == [
        (("vdz",), True, False)
    ]


def test_udev_disk_links_name_their_devices(tree: BlockTree) -> None:
    tree.disk("sdb", "8:16")
    tree.part(tree.sys / "devices/pci0000:00/0000:00:02.0/virtio1/block/sdb", "sdb1", "8:17")
    dev = tree.sys.parent / "dev"
    (dev / "disk" / "by-id").mkdir(parents=True)
    (dev / "disk" / "by-path").mkdir(parents=True)
    for node in ("sdb", "sdb1"):
        (dev / node).write_text("")
    os.symlink("../../sdb", dev / "disk/by-id/ata-QEMU_HARDDISK_sata0")
    os.symlink("../../sdb1", dev / "disk/by-id/ata-QEMU_HARDDISK_sata0-part1")
    os.symlink("../../sdb", dev / "disk/by-path/pci-0000:05:00.0-ata-1")
    os.symlink("../../../../etc/shadow", dev / "disk/by-id/escape")  # leaves /dev: names nothing
    os.symlink("../../gone", dev / "disk/by-id/dangling")
    devices, problems = collect_block(tree.roots)
    assert problems == []
    assert devices["sdb"].links == (
        "/dev/disk/by-id/ata-QEMU_HARDDISK_sata0",
        "/dev/disk/by-path/pci-0000:05:00.0-ata-1",
    )
    assert devices["sdb1"].links == ("/dev/disk/by-id/ata-QEMU_HARDDISK_sata0-part1",)
