"""collect_pci against hand-built sysfs trees laid out like the real one (links kept as links)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unplugd.agent.collectors.pci import (
    class_name,
    collect_pci,
    parse_hex_id,
    parse_pci_ids,
    parse_pci_path,
    parse_slot_address,
)
from unplugd.agent.model import DeviceNode, PciFunction
from unplugd.agent.roots import Roots
from unplugd.pci import PciAddress, PciPath

VIRTIO = 0x1AF4


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


class Tree:
    """A sysfs under tmp_path/sys with the kernel's link shapes."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.sys = base / "sys"
        (self.sys / "bus" / "pci" / "devices").mkdir(parents=True)
        self.roots = Roots.under(base)

    def function(
        self,
        *chain: str,
        vendor: int = VIRTIO,
        device: int = 0x1042,
        klass: int = 0x010000,
        driver: str | None = "virtio-pci",
        root: str = "pci0000:00",
    ) -> Path:
        """Create devices/<root>/<chain...> and its bus/pci/devices link; the last BDF is the function."""
        rel = "/".join(("devices", root, *chain))
        d = self.sys / rel
        d.mkdir(parents=True)
        _write(d / "vendor", f"0x{vendor:04x}\n")
        _write(d / "device", f"0x{device:04x}\n")
        _write(d / "class", f"0x{klass:06x}\n")
        if driver:
            _link(d / "driver", f"{'../' * (len(chain) + 2)}bus/pci/drivers/{driver}")
        _link(d / "subsystem", f"{'../' * (len(chain) + 2)}bus/pci")
        _link(self.sys / "bus" / "pci" / "devices" / chain[-1], f"../../../{rel}")
        return d

    def child(self, fdir: Path, rel: str, driver: str | None = None, subsystem: str | None = None) -> Path:
        d = fdir / rel
        d.mkdir(parents=True)
        depth = len(d.relative_to(self.sys).parts)
        if driver:
            _link(d / "driver", f"{'../' * depth}bus/{subsystem or 'virtio'}/drivers/{driver}")
        if subsystem:
            _link(d / "subsystem", f"{'../' * depth}{subsystem}")
        return d

    def node(self, d: Path, devno: str, devtype: str | None, block: bool, partition: bool = False) -> None:
        d.mkdir(parents=True, exist_ok=True)
        major, minor = devno.split(":")
        _write(d / "dev", devno + "\n")
        uevent = f"MAJOR={major}\nMINOR={minor}\nDEVNAME={d.name}\n" + (f"DEVTYPE={devtype}\n" if devtype else "")
        _write(d / "uevent", uevent)
        if block:
            _link(d / "subsystem", f"{'../' * len(d.relative_to(self.sys).parts[:-1])}class/block")
        if partition:
            _write(d / "partition", "1\n")
        (d / "power").mkdir()
        (d / "holders").mkdir()

    def slot(self, name: str, address: str, controls: bool = True) -> None:
        d = self.sys / "bus" / "pci" / "slots" / name
        _write(d / "address", address + "\n")
        if controls:
            _write(d / "power", "1\n")
            _write(d / "adapter", "1\n")


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


def _by_bdf(functions: list[PciFunction]) -> dict[str, PciFunction]:
    return {str(f.address): f for f in functions}


def test_virtio_blk_function_like_this_machine(tree: Tree) -> None:
    fdir = tree.function("0000:00:02.0", klass=0x010000)
    virtio = tree.child(fdir, "virtio1", driver="virtio_blk", subsystem="bus/virtio")
    tree.node(virtio / "block" / "vda", "254:0", "disk", block=True)
    tree.node(virtio / "block" / "vda" / "vda1", "254:1", "partition", block=True, partition=True)

    functions, problems = collect_pci(tree.roots)

    assert problems == []
    (f,) = functions
    assert f.address == PciAddress(0, 0, 2, 0)
    assert str(f.path) == "0000:00/02.0"
    assert (f.vendor_id, f.device_id, f.class_code) == (VIRTIO, 0x1042, 0x010000)
    assert f.driver == "virtio-pci"
    assert f.subdrivers == ("virtio_blk",)
    assert f.block_devices == ("vda",)
    assert f.device_nodes == (
        DeviceNode("/dev/vda", (254, 0), "block"),
        DeviceNode("/dev/vda1", (254, 1), "block"),
    )
    assert f.class_name == "storage (SCSI)"
    assert f.sysfs_path == "/sys/devices/pci0000:00/0000:00:02.0"
    assert not f.is_bridge
    assert f.hotplug_slot is None
    assert f.vendor_name is None


def test_network_interface_is_found_and_not_descended(tree: Tree) -> None:
    fdir = tree.function("0000:00:03.0", device=0x1041, klass=0x020000)
    virtio = tree.child(fdir, "virtio2", driver="virtio_net")
    eth = virtio / "net" / "eth0"
    _write(eth / "address", "52:54:00:12:34:56\n")
    # A `dev` file deep inside an interface's queues must not count as a device node.
    _write(eth / "queues" / "rx-0" / "dev", "1:2\n")

    (f,), problems = collect_pci(tree.roots)

    assert problems == []
    assert f.net_interfaces == ("eth0",)
    assert f.device_nodes == ()
    assert f.block_devices == ()
    assert f.class_name == "network (Ethernet)"


def test_device_behind_bridge_gets_path_through_the_bridge(tree: Tree) -> None:
    bridge = tree.function("0000:00:03.0", vendor=0x1B36, device=0x0001, klass=0x060400, driver=None)
    child = tree.function("0000:00:03.0", "0000:01:05.0")
    tree.node(tree.child(child, "virtio3", driver="virtio_blk") / "block" / "vdb", "254:16", "disk", block=True)
    assert bridge.is_dir()

    functions, problems = collect_pci(tree.roots)

    assert problems == []
    by = _by_bdf(functions)
    assert str(by["0000:00:03.0"].path) == "0000:00/03.0"
    assert by["0000:00:03.0"].is_bridge
    assert by["0000:00:03.0"].class_name == "bridge (PCI bridge)"
    behind = by["0000:01:05.0"]
    assert behind.path == PciPath(0, 0, ((3, 0), (5, 0)))
    assert str(behind.path) == "0000:00/03.0/05.0"
    assert behind.path.parent == by["0000:00:03.0"].path
    # The bridge does not swallow its child's disk: the child is a function of its own.
    assert by["0000:00:03.0"].block_devices == ()
    assert by["0000:00:03.0"].device_nodes == ()
    assert behind.block_devices == ("vdb",)


def test_eight_function_slot_with_acpiphp_slot(tree: Tree) -> None:
    for fn in range(8):
        tree.function(f"0000:00:06.{fn}", device=0x1000 + fn)
    tree.function("0000:00:07.0")
    tree.slot("6", "0000:00:06")

    functions, problems = collect_pci(tree.roots)

    assert problems == []
    assert [str(f.address) for f in functions] == [f"0000:00:06.{fn}" for fn in range(8)] + ["0000:00:07.0"]
    slot6 = [f for f in functions if f.address.slot == 6]
    assert {f.address.slot_key for f in slot6} == {"0000:00:06"}
    assert {f.path.slot_path for f in slot6} == {"0000:00/06"}
    assert [f.hotplug_slot for f in slot6] == ["6"] * 8
    assert [f.device_id for f in slot6] == [0x1000 + fn for fn in range(8)]
    assert _by_bdf(functions)["0000:00:07.0"].hotplug_slot is None


def test_pciehp_slot_names_the_bus_behind_the_port(tree: Tree) -> None:
    tree.function("0000:00:1c.0", klass=0x060400, driver="pcieport")
    tree.function("0000:00:1c.0", "0000:01:00.0", klass=0x010802, driver="nvme")
    tree.slot("0-1", "0000:01:00")

    by = _by_bdf(collect_pci(tree.roots)[0])

    assert by["0000:01:00.0"].hotplug_slot == "0-1"
    assert by["0000:00:1c.0"].hotplug_slot is None
    assert str(by["0000:01:00.0"].path) == "0000:00/1c.0/00.0"


def test_slot_without_hotplug_controls_does_not_count(tree: Tree) -> None:
    tree.function("0000:00:04.0")
    tree.slot("4", "0000:00:04", controls=False)  # pci_slot.ko placeholder: address only
    tree.slot("bus", "0000:00")  # bus-wide address names no slot

    (f,), problems = collect_pci(tree.roots)

    assert problems == []
    assert f.hotplug_slot is None


def test_nvme_char_and_block_nodes(tree: Tree) -> None:
    fdir = tree.function("0000:00:04.0", vendor=0x8086, device=0x5845, klass=0x010802, driver="nvme")
    ctrl = tree.child(fdir, "nvme/nvme0")
    tree.node(ctrl, "241:0", None, block=False)
    tree.node(ctrl / "nvme0n1", "259:0", "disk", block=True)
    tree.node(ctrl / "nvme0n1" / "nvme0n1p1", "259:1", "partition", block=True, partition=True)

    (f,), problems = collect_pci(tree.roots)

    assert problems == []
    assert f.block_devices == ("nvme0n1",)
    assert DeviceNode("/dev/nvme0", (241, 0), "char") in f.device_nodes
    assert DeviceNode("/dev/nvme0n1p1", (259, 1), "block") in f.device_nodes
    assert f.class_name == "storage (NVMe)"
    assert f.subdrivers == ()


def test_devname_from_uevent_names_the_node(tree: Tree) -> None:
    fdir = tree.function("0000:00:05.0", klass=0x078000)
    port = tree.child(fdir, "virtio4/virtio-ports/vport4p1")
    _write(port / "dev", "245:1\n")
    _write(port / "uevent", "MAJOR=245\nMINOR=1\nDEVNAME=vport4p1\n")
    _link(port / "subsystem", "../../../../../../class/virtio-ports")
    drm = tree.child(fdir, "drm/card0")
    _write(drm / "dev", "226:0\n")
    _write(drm / "uevent", "MAJOR=226\nMINOR=0\nDEVNAME=dri/card0\nDEVTYPE=drm_minor\n")

    (f,), _ = collect_pci(tree.roots)

    assert set(f.device_nodes) == {
        DeviceNode("/dev/vport4p1", (245, 1), "char"),
        DeviceNode("/dev/dri/card0", (226, 0), "char"),
    }
    assert f.block_devices == ()


def test_vanished_function_is_skipped_with_a_problem(tree: Tree) -> None:
    tree.function("0000:00:02.0")
    _link(tree.sys / "bus" / "pci" / "devices" / "0000:00:09.0", "../../../devices/pci0000:00/0000:00:09.0")

    functions, problems = collect_pci(tree.roots)

    assert [str(f.address) for f in functions] == ["0000:00:02.0"]
    assert len(problems) == 1
    assert problems[0].affects == ("0000:00:09.0",)
    assert "vanished" in problems[0].detail


def test_malformed_vendor_keeps_function_with_problem(tree: Tree) -> None:
    fdir = tree.function("0000:00:02.0")
    (fdir / "vendor").write_text("garbage\n")

    functions, problems = collect_pci(tree.roots)

    (f,) = functions
    assert [p.affects for p in problems] == [("0000:00:02.0",)]
    assert "garbage" in problems[0].detail
    assert (f.vendor_id, f.device_id) == (0xFFFF, 0xFFFF)


def test_unreadable_class_file_is_a_problem_not_a_crash(tree: Tree) -> None:
    fdir = tree.function("0000:00:02.0")
    (fdir / "class").unlink()
    (fdir / "class").mkdir()  # reading a directory fails like an unreadable file

    functions, problems = collect_pci(tree.roots)

    assert len(functions) == 1
    assert [p.affects for p in problems] == [("0000:00:02.0",)]


def test_unlistable_child_directory_marks_the_function(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    fdir = tree.function("0000:00:02.0")
    secret = tree.child(fdir, "virtio1")
    real_scandir = os.scandir

    def scandir(path: str | os.PathLike[str]) -> object:
        if Path(path) == secret:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr("os.scandir", scandir)
    functions, problems = collect_pci(tree.roots)

    assert len(functions) == 1
    assert [p.affects for p in problems] == [("0000:00:02.0",)]
    assert "Permission denied" in problems[0].detail


def test_link_escaping_the_root_and_bad_names_are_problems(tree: Tree) -> None:
    tree.function("0000:00:02.0")
    _link(tree.sys / "bus" / "pci" / "devices" / "0000:00:08.0", "../../../../../../etc")
    _link(tree.sys / "bus" / "pci" / "devices" / "not-a-bdf", "../../../devices/pci0000:00/0000:00:02.0")
    _link(tree.sys / "bus" / "pci" / "devices" / "0000:00:0a.0", "../../../devices/pci0000:00/0000:00:02.0")

    functions, problems = collect_pci(tree.roots)

    assert [str(f.address) for f in functions] == ["0000:00:02.0"]
    assert sorted(p.affects for p in problems) == [("0000:00:08.0",), ("0000:00:0a.0",), ("not-a-bdf",)]


def test_absolute_link_in_a_captured_tree(tree: Tree) -> None:
    d = tree.function("0000:00:02.0")
    link = tree.sys / "bus" / "pci" / "devices" / "0000:00:02.0"
    link.unlink()
    os.symlink("/sys/devices/pci0000:00/0000:00:02.0", link)
    assert d.is_dir()

    (f,), problems = collect_pci(tree.roots)

    assert problems == []
    assert str(f.path) == "0000:00/02.0"


def test_no_pci_bus_is_empty(tmp_path: Path) -> None:
    assert collect_pci(Roots.under(tmp_path)) == ([], [])


PCI_IDS = """\
# comment
#\tlist of vendors
1af4  Red Hat, Inc.
\t1000  Virtio network device
\t\t1af4 0001  Virtio network device (subsystem)
\t1042  Virtio block device
# comment inside the block
\t1041  Virtio 1.0 network device
1b36  Red Hat, Inc.
\t0001  QEMU PCI-PCI bridge
8086  Intel Corporation
\t29c0  82G33/G31/P35/P31 Express DRAM Controller

# List of known device classes
C 00  Unclassified device
\t00  Non-VGA unclassified device
C 01  Mass storage controller
\t08  Non-Volatile memory controller
\t\t02  NVM Express
"""


def test_parse_pci_ids_full() -> None:
    ids = parse_pci_ids(PCI_IDS)
    assert ids.vendors == {0x1AF4: "Red Hat, Inc.", 0x1B36: "Red Hat, Inc.", 0x8086: "Intel Corporation"}
    assert ids.devices[(0x1AF4, 0x1042)] == "Virtio block device"
    assert ids.devices[(0x1AF4, 0x1041)] == "Virtio 1.0 network device"
    assert ids.devices[(0x8086, 0x29C0)] == "82G33/G31/P35/P31 Express DRAM Controller"
    assert len(ids.devices) == 5  # no subsystem or class lines


def test_parse_pci_ids_only_wanted_vendors() -> None:
    ids = parse_pci_ids(PCI_IDS, {0x1AF4, 0xDEAD})
    assert ids.vendors == {0x1AF4: "Red Hat, Inc."}
    assert ids.devices == {
        (0x1AF4, 0x1000): "Virtio network device",
        (0x1AF4, 0x1042): "Virtio block device",
        (0x1AF4, 0x1041): "Virtio 1.0 network device",
    }
    last = parse_pci_ids(PCI_IDS, {0x8086})
    assert last.devices == {(0x8086, 0x29C0): "82G33/G31/P35/P31 Express DRAM Controller"}
    assert parse_pci_ids("", {0x1AF4}).vendors == {}


def test_collect_pci_with_names(tree: Tree) -> None:
    tree.function("0000:00:02.0", device=0x1042)
    tree.function("0000:00:03.0", vendor=0x1234, device=0x1111, klass=0x030000)
    ids = tree.base / "pci.ids"
    ids.write_text(PCI_IDS)

    by = _by_bdf(collect_pci(tree.roots, ids)[0])

    assert (by["0000:00:02.0"].vendor_name, by["0000:00:02.0"].device_name) == ("Red Hat, Inc.", "Virtio block device")
    assert (by["0000:00:03.0"].vendor_name, by["0000:00:03.0"].device_name) == (None, None)
    assert by["0000:00:03.0"].class_name == "display (VGA)"


def test_missing_pci_ids_only_drops_names(tree: Tree) -> None:
    tree.function("0000:00:02.0")
    (f,), problems = collect_pci(tree.roots, tree.base / "absent.ids")
    assert problems == []
    assert f.vendor_name is None


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("devices/pci0000:00/0000:00:02.0", "0000:00/02.0"),
        ("devices/pci0000:00/0000:00:03.0/0000:01:05.0", "0000:00/03.0/05.0"),
        ("devices/pci0000:00/0000:00:1c.0/0000:01:00.0/0000:02:03.0/0000:03:00.7", "0000:00/1c.0/00.0/03.0/00.7"),
        ("devices/pci0001:80/0001:80:01.0", "0001:80/01.0"),
        # Hyper-V style: the root bus sits under non-PCI parents.
        ("devices/LNXSYSTM:00/VMBUS:00/abc/pci7870:00/7870:00:00.0", "7870:00/00.0"),
    ],
)
def test_parse_pci_path(rel: str, expected: str) -> None:
    assert str(parse_pci_path(rel)) == expected


@pytest.mark.parametrize(
    "rel",
    [
        "devices/platform/foo",
        "devices/pci0000:00",
        "devices/pci0000:00/0000:00:02.0/virtio1",
        "devices/pci0000:00/0000:00:20.0",  # slot > 0x1f
        "",
    ],
)
def test_parse_pci_path_rejects(rel: str) -> None:
    with pytest.raises(ValueError):
        parse_pci_path(rel)


@pytest.mark.parametrize(
    ("text", "value"),
    [("0x1af4\n", 0x1AF4), ("0x010802", 0x010802), ("0XFFFF", 0xFFFF)],
)
def test_parse_hex_id(text: str, value: int) -> None:
    assert parse_hex_id(text) == value


@pytest.mark.parametrize("text", ["", "0x", "1af4", "0xzz", "garbage"])
def test_parse_hex_id_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hex_id(text)


@pytest.mark.parametrize(
    ("text", "key"),
    [("0000:00:03\n", "0000:00:03"), ("0000:01:00", "0000:01:00"), ("0000:00", None), ("junk", None)],
)
def test_parse_slot_address(text: str, key: str | None) -> None:
    assert parse_slot_address(text) == key


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (0x020000, "network (Ethernet)"),
        (0x028000, "network"),
        (0x060400, "bridge (PCI bridge)"),
        (0x0C0330, "serial bus (USB)"),
        (0x078000, "communication (other)"),
        (0xFF0000, "unassigned"),
        (0x420000, None),
    ],
)
def test_class_name(code: int, name: str | None) -> None:
    assert class_name(code) == name


def test_walk_follows_no_symlinks_and_stops_at_depth(tree: Tree) -> None:
    fdir = tree.function("0000:00:02.0")
    other = tree.function("0000:00:03.0")
    tree.node(tree.child(other, "virtio2/block") / "vdb", "254:16", "disk", block=True)
    virtio = tree.child(fdir, "virtio1")
    os.symlink("..", virtio / "device")  # a cycle, as sysfs has everywhere
    os.symlink("../../0000:00:03.0/virtio2", virtio / "sibling")  # another function's objects
    deep = virtio / "/".join(f"d{i}" for i in range(14))
    tree.node(deep, "240:0", None, block=False)

    by = _by_bdf(collect_pci(tree.roots)[0])

    assert by["0000:00:02.0"].device_nodes == ()
    assert by["0000:00:02.0"].block_devices == ()
    assert by["0000:00:03.0"].block_devices == ("vdb",)


# --------------------------------------------------------------------------- devices bound below (issue 15)


def test_usb_controller_records_what_each_bound_device_holds(tree: Tree) -> None:
    """xHCI with a USB disk and a USB NIC, laid out as the test guest's kernel shows them."""
    fdir = tree.function("0000:07:00.0", vendor=0x1B36, device=0x000D, klass=0x0C0330, driver="xhci_hcd")
    tree.child(fdir, "usb1", "usb", "bus/usb")
    tree.child(fdir, "usb1/1-0:1.0", "hub", "bus/usb")
    tree.child(fdir, "usb1/1-2", "usb", "bus/usb")
    ctl = tree.child(fdir, "usb1/1-2/1-2:1.0", "cdc_ether", "bus/usb")
    tree.child(fdir, "usb1/1-2/1-2:1.1", "cdc_ether", "bus/usb")
    _write(ctl / "net" / "enx5254005b0002" / "ifindex", "3\n")
    tree.child(fdir, "usb2", "usb", "bus/usb")
    tree.child(fdir, "usb2/2-1", "usb", "bus/usb")
    tree.child(fdir, "usb2/2-1/2-1:1.0", "usb-storage", "bus/usb")
    lun = tree.child(fdir, "usb2/2-1/2-1:1.0/host19/target19:0:0/19:0:0:0", "sd", "bus/scsi")
    tree.node(lun / "block" / "sdf", "8:80", "disk", block=True)
    tree.node(lun / "scsi_generic" / "sg5", "21:5", None, block=False)

    (f,), problems = collect_pci(tree.roots)

    assert problems == []
    assert (f.block_devices, f.net_interfaces) == (("sdf",), ("enx5254005b0002",))
    bound = {b.path: (b.driver, b.holds, b.leaf) for b in f.bound}
    assert bound == {
        "usb1": ("usb", ("enx5254005b0002",), False),
        "usb1/1-0:1.0": ("hub", (), True),
        "usb1/1-2": ("usb", ("enx5254005b0002",), False),
        "usb1/1-2/1-2:1.0": ("cdc_ether", ("enx5254005b0002",), True),
        "usb1/1-2/1-2:1.1": ("cdc_ether", (), True),
        "usb2": ("usb", ("sdf",), False),
        "usb2/2-1": ("usb", ("sdf",), False),
        "usb2/2-1/2-1:1.0": ("usb-storage", ("sdf",), False),
        "usb2/2-1/2-1:1.0/host19/target19:0:0/19:0:0:0": ("sd", ("sdf",), True),
    }
    sd = next(b for b in f.bound if b.driver == "sd")
    assert (sd.name, sd.nodes) == ("19:0:0:0", ("/dev/sdf", "/dev/sg5"))


def test_empty_ahci_controller_has_nothing_bound_below(tree: Tree) -> None:
    fdir = tree.function("0000:06:00.0", vendor=0x8086, device=0x2922, klass=0x010601, driver="ahci")
    for n in range(6):
        tree.child(fdir, f"ata{n + 13}/host{n + 12}/scsi_host/host{n + 12}")
    (f,), problems = collect_pci(tree.roots)
    assert (problems, f.block_devices, f.bound, f.driver) == ([], (), (), "ahci")


def test_hidden_nvme_path_device_below_a_controller_is_no_node_and_no_problem(tree: Tree) -> None:
    """An NVMe controller of a multipath subsystem: only the hidden path (no dev) sits below it."""
    fdir = tree.function("0000:02:00.0", vendor=0x1B36, device=0x0010, klass=0x010802, driver="nvme")
    ctrl = tree.child(fdir, "nvme/nvme1")
    tree.node(ctrl, "246:1", None, block=False)
    path = ctrl / "nvme2c1n1"
    _write(path / "hidden", "1\n")
    _link(path / "subsystem", "../../../../../../../class/block")
    (f,), problems = collect_pci(tree.roots)
    assert problems == []
    assert f.block_devices == () and [n.path for n in f.device_nodes] == ["/dev/nvme1"]
