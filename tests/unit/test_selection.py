"""Device names -> PCI functions, compared with the inventory only."""

from __future__ import annotations

import pytest

from tests.fixtures.model_builders import disk, dm, fn, iface, inventory, loop, md, mount, part
from unplugd.agent.errors import UnknownDevice
from unplugd.agent.readiness.policy import evaluate
from unplugd.agent.selection import select

VDB = fn("0000:00:06.0", block=["vdb"])
VDC = fn("0000:00:07.0", block=["vdc"])
ETH1 = fn("0000:00:08.0", nets=["eth1"])
ETH2 = fn("0000:00:09.0", nets=["eth2"])
BEHIND = fn("0000:01:05.0", "0000:00/03.0/05.0", block=["vdd"])

INV = inventory(
    [VDB, VDC, ETH1, ETH2, BEHIND],
    block=[
        disk("vdb", (252, 16)),
        part("vdb1", (252, 17), "vdb", holders=["md0"]),
        part("vdb2", (252, 18), "vdb", holders=["dm-0"]),
        dm("dm-0", (253, 0), "vg0-data", "LVM-x", slaves=["vdb2"]),
        disk("vdc", (252, 32)),
        part("vdc1", (252, 33), "vdc", holders=["md0"]),
        md("md0", (9, 0), slaves=["vdb1", "vdc1"]),
        disk("vdd", (252, 48)),
        loop("loop0", (7, 0), "/dev/vdd"),
        disk("sda", (8, 0)),  # not below any PCI function here
    ],
    ifaces=[
        iface("eth1", master="bond0", uppers=["bond0"]),
        iface("eth2", master="bond0", uppers=["bond0"]),
        iface("bond0", kind="bond", uppers=["bond0.7"]),
        iface("bond0.7", kind="vlan"),
        iface("lo"),
    ],
)


def names(selected: list[object]) -> list[str]:
    return [str(f.address) for f in selected]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (["0000:00:06.0"], ["0000:00:06.0"]),
        (["00:07.0"], ["0000:00:07.0"]),  # lspci's short form, domain 0
        (["0000:00/03.0/05.0"], ["0000:01:05.0"]),  # the PCI path, not the guest bus number
        (["0000:01:05.0"], ["0000:01:05.0"]),
        (["eth1"], ["0000:00:08.0"]),
        (["bond0"], ["0000:00:08.0", "0000:00:09.0"]),
        (["bond0.7"], ["0000:00:08.0", "0000:00:09.0"]),
        (["vdb"], ["0000:00:06.0"]),
        (["vdb1"], ["0000:00:06.0"]),
        (["/dev/vdb2"], ["0000:00:06.0"]),
        (["dm-0"], ["0000:00:06.0"]),
        (["vg0-data"], ["0000:00:06.0"]),
        (["/dev/mapper/vg0-data"], ["0000:00:06.0"]),
        (["md0"], ["0000:00:06.0", "0000:00:07.0"]),
        (["loop0"], ["0000:01:05.0"]),
        (["eth2", "vdb", "eth2"], ["0000:00:06.0", "0000:00:09.0"]),  # inventory order, once each
        ([], ["0000:00:06.0", "0000:00:07.0", "0000:00:08.0", "0000:00:09.0", "0000:01:05.0"]),
    ],
)
def test_select(query: list[str], expected: list[str]) -> None:
    assert names(select(INV, query)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "query",
    [
        "../../etc/shadow",
        "/dev/../x",
        "/dev/../../etc/shadow",
        "/dev/vdb1/../../etc",
        "/dev/mapper/../vdb",
        "/etc/passwd",
        "vdb9",
        "sda",  # a block device, but no PCI function holds it
        "lo",  # an interface, but not below a function
        "0000:00:1f.7",  # well-formed, absent
        "0000:00/1f.7",
        "",
    ],
)
def test_unknown_names(query: str) -> None:
    with pytest.raises(UnknownDevice) as err:
        select(INV, [query])
    assert err.value.name == query


def test_one_unknown_name_fails_the_whole_selection() -> None:
    with pytest.raises(UnknownDevice):
        select(INV, ["vdb", "nope"])


# Loops whose backing file the report places on vdb's stack in every way the policy knows: a /dev/mapper
# path, a /dev/VG/LV path, a file on a mounted filesystem of vdb1 (deleted meanwhile), a /dev/dm-N path.
LOOPS = inventory(
    [VDB, VDC],
    block=[
        disk("vdb", (252, 16)),
        part("vdb1", (252, 17), "vdb"),
        part("vdb2", (252, 18), "vdb", holders=["dm-0"]),
        dm("dm-0", (253, 0), "vg0-data", "LVM-x", slaves=["vdb2"]),
        disk("vdc", (252, 32)),
        loop("loop0", (7, 0), "/dev/mapper/vg0-data"),
        loop("loop1", (7, 1), "/dev/vg0/data"),
        loop("loop2", (7, 2), "/srv/images/disk.raw (deleted)"),
        loop("loop3", (7, 3), "/dev/dm-0"),
        loop("loop4", (7, 4), "/var/lib/elsewhere.raw"),  # on / (sda1): below no function
    ],
    mounts=[mount((8, 1), "/", "/dev/sda1", mount_id=1), mount((252, 17), "/srv", "/dev/vdb1", mount_id=2)],
)


def test_check_selects_every_device_the_report_stacks_on_a_function() -> None:
    """`unplugd check NAME` and the report agree: a device in a function's stack selects that function."""
    stacked = {name: str(v.address) for v in evaluate(LOOPS) for name in v.block_devices}
    assert {"loop0", "loop1", "loop2", "loop3"} <= stacked.keys() and "loop4" not in stacked
    for name, bdf in stacked.items():
        assert bdf in names(select(LOOPS, [name])), name  # type: ignore[arg-type]
    with pytest.raises(UnknownDevice):
        select(LOOPS, ["loop4"])


@pytest.mark.parametrize("query", ["/dev/vg0/data", "/dev/mapper/vg0-data", "/dev/dm-0", "vg0-data", "/dev/loop1"])
def test_device_mapper_names_the_policy_knows_select_the_disk_below(query: str) -> None:
    assert names(select(LOOPS, [query])) == ["0000:00:06.0"]  # type: ignore[arg-type]


# --------------------------------------------------------------------------- NVMe multipath, udev links (issue 15)


def test_a_multipath_head_selects_every_function_it_runs_over_by_every_name() -> None:
    from unplugd.agent.model import BlockDevice

    a = fn("0000:02:00.0", driver="nvme", sysfs="/sys/devices/pci0000:00/0000:00:10.1/0000:02:00.0")
    b = fn("0000:03:00.0", driver="nvme", sysfs="/sys/devices/pci0000:00/0000:00:10.2/0000:03:00.0")
    head = BlockDevice(
        "nvme2n1", "disk", (259, 1), 1 << 30,
        multipath=(f"{a.sysfs_path}/nvme/nvme1/nvme2c1n1", f"{b.sysfs_path}/nvme/nvme2/nvme2c2n1"),
        links=("/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_nvmp", "/dev/disk/by-path/pci-0000:03:00.0-nvme-1"),
    )  # fmt: skip
    inv = inventory([a, b, VDB], block=[head, part("nvme2n1p1", (259, 2), "nvme2n1"), disk("vdb", (252, 16))])
    for name in ("nvme2n1", "/dev/nvme2n1", "nvme2n1p1", "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_nvmp",
                 "/dev/disk/by-path/pci-0000:03:00.0-nvme-1"):  # fmt: skip
        assert [str(f.address) for f in select(inv, [name])] == ["0000:02:00.0", "0000:03:00.0"], name
    with pytest.raises(UnknownDevice):
        select(inv, ["/dev/disk/by-id/nvme-other"])  # a link the inventory does not hold is no name


def test_a_disk_link_selects_its_function() -> None:
    inv = inventory([VDB], block=[disk("vdb", (252, 16))._replace(links=("/dev/disk/by-id/virtio-data",))])
    assert [str(f.address) for f in select(inv, ["/dev/disk/by-id/virtio-data"])] == ["0000:00:06.0"]
