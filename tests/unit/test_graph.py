"""The device graph: names, block stacks, interface stacks and socket activity of one inventory."""

from __future__ import annotations

import pytest

from tests.fixtures.model_builders import OTHER_NS, disk, dm, fn, iface, inventory, loop, md, mount, part
from unplugd.agent.graph import DeviceGraph, is_active
from unplugd.agent.model import Socket

VDB = fn("0000:00:06.0", block=["vdb"])

GRAPH = DeviceGraph(
    inventory(
        [VDB],
        block=[
            disk("vdb", (252, 16)),
            part("vdb1", (252, 17), "vdb", holders=["md0"]),
            part("vdb2", (252, 18), "vdb", holders=["dm-0"]),
            part("vdb3", (252, 19), "vdb", holders=["dm-1"]),
            dm("dm-0", (253, 0), "vg0-data", "LVM-a", slaves=["vdb2"]),
            dm("dm-1", (253, 1), "my--vg-my--lv", "LVM-b", slaves=["vdb3"]),
            md("md0", (9, 0), slaves=["vdb1"]),
            disk("sda", (8, 0)),
            part("sda1", (8, 1), "sda"),
            disk("vdc", (252, 32)),
            part("vdc1", (252, 33), "vdc"),
            loop("loop0", (7, 0), "/dev/mapper/vg0-data"),
            loop("loop1", (7, 1), "/dev/my-vg/my-lv"),
            loop("loop2", (7, 2), "/srv/img.raw (deleted)"),  # a file on vdb1's md0 filesystem
            loop("loop3", (7, 3), "/dev/dm-1"),
            loop("loop4", (7, 4), "/var/lib/img.raw"),  # on / (sda1)
            loop("loop5", (7, 5), "/home/u/img.raw"),  # on btrfs (anonymous devno) over vdc1
            loop("loop6", (7, 6), "/dev/shm/img.raw"),  # on tmpfs: no device
            loop("loop7", (7, 7), "/dev/loop0"),  # a loop on a loop
        ],
        mounts=[
            mount((8, 1), "/", "/dev/sda1", mount_id=1),
            mount((9, 0), "/srv", "/dev/md0", mount_id=2),
            mount((9, 0), "/srv", "/dev/md0", mount_id=2, ns_pid=77),  # a second pid in the same namespace
            mount((9, 0), "/srv", "/dev/md0", mount_id=2, ns=OTHER_NS, ns_pid=80),
            mount((0, 44), "/home", "/dev/vdc1", fstype="btrfs", mount_id=3),
            mount((0, 22), "/dev/shm", "tmpfs", fstype="tmpfs", mount_id=4),
        ],
        ifaces=[
            iface("eth1", master="bond0", uppers=["bond0"]),
            iface("eth2", master="bond0", uppers=["bond0"]),
            iface("bond0", kind="bond", uppers=["bond0.7", "macvlan0"]),
            iface("bond0.7", kind="vlan", master="br0", uppers=["br0"]),
            iface("br0", kind="bridge"),
            iface("eth3"),
        ],
    )
)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/dev/vdb1", "vdb1"),
        ("/dev/dm-0", "dm-0"),
        ("/dev/loop0", "loop0"),
        ("/dev/md0", "md0"),
        ("/dev/mapper/vg0-data", "dm-0"),
        ("/dev/vg0/data", "dm-0"),
        ("/dev/my-vg/my-lv", "dm-1"),  # '-' inside VG and LV names is doubled in the dm name
        ("/dev/mapper/my--vg-my--lv", "dm-1"),
        ("/dev/vg0-data", None),  # the kernel never names a dm device so
        ("vdb1", None),  # not a /dev path: mount sources such as "tmpfs" are not devices
        ("vg0-data", None),
        ("/dev/vdb9", None),
        ("/dev/mapper/", None),
        ("/dev/mapper/..", None),
        ("/dev/mapper/../vdb", None),
        ("/dev/../vdb", None),
        ("/dev/disk/by-id/virtio-x", None),
        ("/dev/a/b/c", None),
        ("/dev/", None),
        ("", None),
    ],
)
def test_kernel_name_of_a_dev_path(path: str, name: str | None) -> None:
    assert GRAPH.kernel_name(path) == name


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("vdb1", "vdb1"),
        ("dm-1", "dm-1"),
        ("vg0-data", "dm-0"),  # a device-mapper name as dmsetup ls prints it
        ("my--vg-my--lv", "dm-1"),
        ("/dev/vg0/data", "dm-0"),
        ("/dev/mapper/vg0-data", "dm-0"),
        ("/dev/loop7", "loop7"),
        ("/dev/vg0-data", None),
        ("../../etc/shadow", None),
        ("/dev/../x", None),
        ("mapper/vg0-data", None),
        ("nope", None),
    ],
)
def test_block_named_as_people_write_it(text: str, name: str | None) -> None:
    assert GRAPH.block_named(text) == name


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/srv/img.raw", "md0"),
        ("/srv/img.raw (deleted)", "md0"),  # unlinked, still on that filesystem
        ("/var/lib/img.raw", "sda1"),
        ("/home/u/img.raw", "vdc1"),  # btrfs: the mount source names the device
        ("/dev/shm/img.raw", None),  # tmpfs is on no block device
        ("/srvx/img.raw", "sda1"),  # component-wise: /srv does not hold /srvx
    ],
)
def test_device_of_file(path: str, name: str | None) -> None:
    assert GRAPH.device_of_file(path) == name


def test_block_of_devno() -> None:
    assert (GRAPH.block_of_devno((253, 1)), GRAPH.block_of_devno((7, 7)), GRAPH.block_of_devno((1, 1))) == (
        "dm-1",
        "loop7",
        None,
    )


@pytest.mark.parametrize(
    ("name", "up"),
    [
        ("vdb", ["vdb1", "vdb2", "vdb3"]),  # partitions first
        ("vdb1", ["md0"]),
        ("md0", ["loop2"]),  # a loop whose backing file lies on md0's filesystem
        ("vdb2", ["dm-0"]),
        ("dm-0", ["loop0"]),  # /dev/mapper/NAME
        ("dm-1", ["loop1", "loop3"]),  # /dev/VG/LV and /dev/dm-N
        ("loop0", ["loop7"]),
        ("sda1", ["loop4"]),
        ("vdc1", ["loop5"]),
        ("loop6", []),
        ("nope", []),
    ],
)
def test_upward(name: str, up: list[str]) -> None:
    assert GRAPH.upward(name) == up


def test_block_closure_is_breadth_first_and_skips_unknown_disks() -> None:
    assert GRAPH.block_closure(["vdb", "vdz"]) == [
        "vdb",
        "vdb1",
        "vdb2",
        "vdb3",
        "md0",
        "dm-0",
        "dm-1",
        "loop2",
        "loop0",
        "loop1",
        "loop3",
        "loop7",
    ]
    assert GRAPH.block_closure(["vdc"]) == ["vdc", "vdc1", "loop5"]
    assert GRAPH.block_closure([]) == []


def test_holder_cycle_ends() -> None:
    g = DeviceGraph(inventory([], block=[disk("a", (1, 0), holders=["b"]), disk("b", (1, 1), holders=["a"])]))
    assert g.block_closure(["a"]) == ["a", "b"]


def test_mounts_on_a_device_once_per_namespace_and_mount_id() -> None:
    assert [(m.mount_point, m.namespace_pid) for m in GRAPH.mounts_on("md0")] == [("/srv", 1), ("/srv", 80)]
    assert [m.fstype for m in GRAPH.mounts_on("vdc1")] == ["btrfs"]  # anonymous devno: by its source
    assert GRAPH.mounts_on("vdb") == [] and GRAPH.mounts_on("nope") == []


@pytest.mark.parametrize(
    ("name", "stack"),
    [
        ("eth1", {"eth1", "bond0", "bond0.7", "macvlan0", "br0"}),
        ("bond0.7", {"bond0.7", "br0"}),
        ("eth3", {"eth3"}),
        ("gone0", {"gone0"}),  # not in the inventory: itself only
    ],
)
def test_interface_stack(name: str, stack: set[str]) -> None:
    assert GRAPH.interface_stack(name) == stack


@pytest.mark.parametrize(
    ("sock", "active"),
    [
        (Socket("tcp", "192.0.2.5", 22, "192.0.2.1", 4000, "ESTABLISHED"), True),
        (Socket("tcp6", "::1", 22, "::1", 4000, "ESTABLISHED"), True),
        (Socket("tcp", "192.0.2.5", 22, "0.0.0.0", 0, "LISTEN"), False),
        (Socket("tcp", "192.0.2.5", 22, "192.0.2.1", 4000, "TIME_WAIT"), False),  # a peer port, yet closed
        (Socket("udp", "192.0.2.5", 5353, "192.0.2.7", 53, "ESTABLISHED"), True),
        (Socket("udp6", "::", 5353, "2001:db8::1", 53, "CLOSE"), True),  # connect()ed: a peer port
        (Socket("udp", "192.0.2.5", 5353, "0.0.0.0", 0, "CLOSE"), False),
        (Socket("raw", "192.0.2.5", 0, "0.0.0.0", 0, "ESTABLISHED"), False),
    ],
)
def test_is_active(sock: Socket, active: bool) -> None:
    assert is_active(sock) is active


# --------------------------------------------------------------------------- which disks a function carries (issue 15)


def test_owner_of_is_the_deepest_function_and_never_a_prefix_of_a_name() -> None:
    from unplugd.agent.graph import owner_of

    port = fn("0000:00:10.1", "0000:00/10.1", bridge=True, sysfs="/sys/devices/pci0000:00/0000:00:10.1")
    ctrl = fn("0000:02:00.0", "0000:00/10.1/00.0", sysfs="/sys/devices/pci0000:00/0000:00:10.1/0000:02:00.0")
    near = fn("0000:00:10.0", "0000:00/10.0", sysfs="/sys/devices/pci0000:00/0000:00:10.0")
    fs = [port, near, ctrl]
    assert owner_of(f"{ctrl.sysfs_path}/nvme/nvme1/nvme2c1n1", fs) is ctrl
    assert owner_of("/sys/devices/pci0000:00/0000:00:10.1/power", fs) is port
    assert owner_of("/sys/devices/pci0000:00/0000:00:10.10/x", fs) is None  # 10.1 is no component of 10.10
    assert owner_of("/sys/devices/virtual/nvme-subsystem/nvme-subsys2/nvme2n1", fs) is None


def test_function_disks_adds_heads_after_the_functions_own_disks() -> None:
    from unplugd.agent.graph import function_disks
    from unplugd.agent.model import BlockDevice

    a = fn("0000:02:00.0", block=["nvme0n1"], sysfs="/sys/devices/pci0000:00/0000:00:10.1/0000:02:00.0")
    b = fn("0000:03:00.0", sysfs="/sys/devices/pci0000:00/0000:00:10.2/0000:03:00.0")
    head = BlockDevice("nvme2n1", "disk", (259, 1), 1, multipath=(f"{a.sysfs_path}/nvme/nvme1/nvme2c1n1",
                                                                  f"{b.sysfs_path}/nvme/nvme2/nvme2c2n1"))  # fmt: skip
    stray = BlockDevice("nvme3n1", "disk", (259, 5), 1, multipath=("/sys/devices/platform/x/nvme3c3n1",))
    got = function_disks([a, b], {"nvme2n1": head, "nvme3n1": stray, "nvme0n1": disk("nvme0n1", (259, 0))})
    assert got == {a.address: ("nvme0n1", "nvme2n1"), b.address: ("nvme2n1",)}
