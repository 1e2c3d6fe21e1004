"""The readiness policy on model objects: every reason code, every state."""

from __future__ import annotations

import pytest

from tests.fixtures.model_builders import (
    ETHERNET,
    OTHER_NS,
    OWN_NS,
    default_route,
    disk,
    dm,
    fn,
    iface,
    inventory,
    loop,
    md,
    mount,
    part,
    v4,
    v6,
)
from unplugd.agent.model import (
    BlockDevice,
    BoundDevice,
    DeviceNode,
    Inventory,
    Mount,
    OpenRef,
    PciFunction,
    ScanProblem,
    Socket,
    Swap,
)
from unplugd.agent.readiness.policy import evaluate, state_of
from unplugd.agent.readiness.reasons import Code, FunctionVerdict, Reason, State
from unplugd.pci import PciAddress

VDB = fn("0000:00:06.0", block=["vdb"])
VDC = fn("0000:00:07.0", block=["vdc"])
ETH1 = fn("0000:00:08.0", nets=["eth1"])
ETH2 = fn("0000:00:09.0", nets=["eth2"])
VDB_DISKS = [disk("vdb", (252, 16)), part("vdb1", (252, 17), "vdb"), part("vdb2", (252, 18), "vdb")]


def verdict(inv: Inventory, bdf: str = "0000:00:06.0", **kw: object) -> FunctionVerdict:
    by = {str(v.address): v for v in evaluate(inv, **kw)}  # type: ignore[arg-type]
    return by[bdf]


def codes(v: FunctionVerdict) -> list[Code]:
    return [r.code for r in v.reasons]


def only(v: FunctionVerdict, code: Code) -> Reason:
    found = [r for r in v.reasons if r.code is code]
    assert len(found) == 1, v.reasons
    return found[0]


# --------------------------------------------------------------------------- state_of


@pytest.mark.parametrize(
    ("reasons", "state"),
    [
        ((), State.READY),
        ((Reason(Code.LEASED, "x", blocking=False),), State.READY),
        ((Reason(Code.MOUNTED, "x"),), State.BUSY),
        ((Reason(Code.UNREADABLE, "x", undecided=True),), State.UNKNOWN),
        ((Reason(Code.UNREADABLE, "x", undecided=True), Reason(Code.SWAP, "x")), State.BUSY),
        ((Reason(Code.SWAP, "x"), Reason(Code.UNREADABLE, "x", undecided=True)), State.BUSY),
        ((Reason(Code.HAS_ADDRESS, "x", blocking=False), Reason(Code.UNREADABLE, "x", undecided=True)), State.UNKNOWN),
    ],
)
def test_state_precedence(reasons: tuple[Reason, ...], state: State) -> None:
    assert state_of(reasons) is state


# --------------------------------------------------------------------------- block


def test_idle_disk_is_ready() -> None:
    v = verdict(inventory([VDB], block=VDB_DISKS))
    assert v.state is State.READY
    assert v.reasons == ()
    assert v.block_devices == ("vdb", "vdb1", "vdb2")


def test_mounted_partition_in_own_namespace() -> None:
    v = verdict(inventory([VDB], block=VDB_DISKS, mounts=[mount((252, 17), "/data", "/dev/vdb1")]))
    assert v.state is State.BUSY
    r = only(v, Code.MOUNTED)
    assert r.object == "vdb1" and r.mount_point == "/data" and r.blocking
    assert r.detail == "vdb1 is mounted on /data (ext4)"


def test_mount_only_in_another_namespace_names_its_pid() -> None:
    m = mount((252, 17), "/srv", "/dev/vdb1", ns=OTHER_NS, ns_pid=4242)
    r = only(verdict(inventory([VDB], block=VDB_DISKS, mounts=[m])), Code.MOUNTED)
    assert "mount namespace of pid 4242" in r.detail


def test_same_mount_in_two_namespaces_is_one_reason() -> None:
    own = mount((252, 17), "/data", "/dev/vdb1", mount_id=100)
    copy = mount((252, 17), "/data", "/dev/vdb1", mount_id=300, ns=OTHER_NS, ns_pid=77)
    r = only(verdict(inventory([VDB], block=VDB_DISKS, mounts=[own, copy])), Code.MOUNTED)
    assert "also in 1 other mount namespace: pid 77" in r.detail


def test_duplicate_mount_records_are_deduplicated() -> None:
    m = mount((252, 17), "/data", "/dev/vdb1")
    v = verdict(inventory([VDB], block=VDB_DISKS, mounts=[m, m]))
    assert codes(v) == [Code.MOUNTED]


def test_bind_mount_is_its_own_reason() -> None:
    mounts = [
        mount((252, 17), "/data", "/dev/vdb1", mount_id=100),
        mount((252, 17), "/srv/www", "/dev/vdb1", root="/www", mount_id=101),
    ]
    v = verdict(inventory([VDB], block=VDB_DISKS, mounts=mounts))
    details = [r.detail for r in v.reasons if r.code is Code.MOUNTED]
    assert details == ["vdb1 is mounted on /data (ext4)", "vdb1 is mounted on /srv/www (ext4, bind mount of /www)"]


def test_anonymous_devno_falls_back_to_source_path() -> None:
    m = mount((0, 45), "/pool", "/dev/vdb2", fstype="btrfs")
    assert only(verdict(inventory([VDB], block=VDB_DISKS, mounts=[m])), Code.MOUNTED).object == "vdb2"


def test_anonymous_devno_with_foreign_source_is_not_ours() -> None:
    m = mount((0, 45), "/pool", "/dev/vdc1", fstype="btrfs")
    assert verdict(inventory([VDB], block=VDB_DISKS, mounts=[m])).state is State.READY


def test_mount_of_another_disk_does_not_touch_ours() -> None:
    m = mount((252, 33), "/other", "/dev/vdc1")
    assert verdict(inventory([VDB], block=VDB_DISKS, mounts=[m])).state is State.READY


def test_root_filesystem() -> None:
    inv = inventory([VDB], block=VDB_DISKS, mounts=[mount((252, 18), "/", "/dev/vdb2")], root_devno=(252, 18))
    v = verdict(inv)
    assert codes(v) == [Code.ROOT_FILESYSTEM, Code.MOUNTED]
    assert only(v, Code.ROOT_FILESYSTEM).object == "vdb2"


def test_root_on_btrfs_found_through_the_root_mount_source() -> None:
    inv = inventory(
        [VDB], block=VDB_DISKS, mounts=[mount((0, 30), "/", "/dev/vdb2", fstype="btrfs")], root_devno=(0, 30)
    )
    assert Code.ROOT_FILESYSTEM in codes(verdict(inv))


def test_swap_partition() -> None:
    inv = inventory([VDB], block=VDB_DISKS, swaps=[Swap("/dev/vdb2", "partition", (252, 18))])
    r = only(verdict(inv), Code.SWAP)
    assert r.object == "vdb2" and "swap" in r.detail


def test_swap_file_on_a_filesystem_of_the_disk() -> None:
    inv = inventory(
        [VDB],
        block=VDB_DISKS,
        mounts=[mount((252, 17), "/data", "/dev/vdb1")],
        swaps=[Swap("/data/swapfile", "file", (252, 17))],
    )
    r = only(verdict(inv), Code.SWAP)
    assert "/data/swapfile" in r.detail


def test_swap_that_cannot_be_placed_is_unknown_not_ready() -> None:
    inv = inventory([VDB], block=VDB_DISKS, swaps=[Swap("/mystery/swap", "file", None)])
    v = verdict(inv)
    assert v.state is State.UNKNOWN
    assert only(v, Code.UNREADABLE).undecided


def test_swap_elsewhere_leaves_disk_ready() -> None:
    zram = disk("zram0", (253, 0))
    inv = inventory([VDB], block=[*VDB_DISKS, zram], swaps=[Swap("/dev/zram0", "partition", (253, 0))])
    assert verdict(inv).state is State.READY


CRYPT_LVM = [
    disk("vdb", (252, 16)),
    part("vdb1", (252, 17), "vdb"),
    part("vdb2", (252, 18), "vdb", holders=["dm-0"]),
    dm("dm-0", (254, 0), "luks-1234", "CRYPT-LUKS2-1234-luks-1234", slaves=["vdb2"], holders=["dm-1"]),
    dm("dm-1", (254, 1), "vg0-data", "LVM-abcdef", slaves=["dm-0"]),
]


def test_holder_chain_crypt_lvm_mounted() -> None:
    inv = inventory([VDB], block=CRYPT_LVM, mounts=[mount((254, 1), "/srv", "/dev/mapper/vg0-data")])
    v = verdict(inv)
    assert v.state is State.BUSY
    holder = only(v, Code.HOLDER)
    assert holder.chain == ("vdb", "vdb2", "dm-0", "dm-1")
    assert "LVM" in holder.detail and "luks-1234" in holder.detail
    assert only(v, Code.MOUNTED).object == "dm-1"
    assert v.block_devices == ("vdb", "vdb1", "vdb2", "dm-0", "dm-1")


def test_unmounted_holder_still_blocks() -> None:
    v = verdict(inventory([VDB], block=CRYPT_LVM))
    assert codes(v) == [Code.HOLDER]


def test_mount_via_dev_vg_lv_source_with_anonymous_devno() -> None:
    inv = inventory([VDB], block=CRYPT_LVM, mounts=[mount((0, 50), "/x", "/dev/vg0/data", fstype="btrfs")])
    assert only(verdict(inv), Code.MOUNTED).object == "dm-1"


def test_md_across_two_slots_makes_both_busy() -> None:
    block = [
        disk("vdb", (252, 16)),
        part("vdb1", (252, 17), "vdb", holders=["md0"]),
        disk("vdc", (252, 32)),
        part("vdc1", (252, 33), "vdc", holders=["md0"]),
        md("md0", (9, 0), slaves=["vdb1", "vdc1"]),
    ]
    inv = inventory([VDB, VDC], block=block, mounts=[mount((9, 0), "/raid", "/dev/md0")])
    for bdf, chain in (("0000:00:06.0", ("vdb", "vdb1", "md0")), ("0000:00:07.0", ("vdc", "vdc1", "md0"))):
        v = verdict(inv, bdf)
        assert v.state is State.BUSY
        assert only(v, Code.HOLDER).chain == chain
        assert "md raid1" in only(v, Code.HOLDER).detail
        assert only(v, Code.MOUNTED).object == "md0"


def test_loop_backed_by_a_partition_node_is_a_holder() -> None:
    inv = inventory([VDB], block=[*VDB_DISKS, loop("loop0", (7, 0), "/dev/vdb1")])
    assert only(verdict(inv), Code.HOLDER).chain == ("vdb", "vdb1", "loop0")


def test_loop_backed_by_a_file_is_not_a_holder() -> None:
    inv = inventory([VDB], block=[*VDB_DISKS, loop("loop0", (7, 0), "/var/lib/img.raw")])
    assert verdict(inv).state is State.READY


def test_loop_backed_by_a_file_on_a_mounted_filesystem_is_a_holder() -> None:
    mounts = [
        mount((8, 1), "/", "/dev/sda1", mount_id=1),
        mount((252, 17), "/mnt/data", "/dev/vdb1", mount_id=2),
        mount((0, 50), "/mnt/data/tmp", "tmpfs", fstype="tmpfs", mount_id=3),
    ]
    inv = inventory(
        [VDB],
        block=[*VDB_DISKS, loop("loop0", (7, 0), "/mnt/data/img (deleted)"), loop("loop1", (7, 1), "/mnt/data/tmp/x")],
        mounts=mounts,
    )
    v = verdict(inv)
    assert only(v, Code.HOLDER).chain == ("vdb", "vdb1", "loop0")  # loop1's file is on the tmpfs above
    assert "backed by /mnt/data/img (deleted)" in only(v, Code.HOLDER).detail
    assert "loop0" in v.block_devices and "loop1" not in v.block_devices


def test_loop_on_a_file_of_a_filesystem_mounted_only_outside_the_agents_namespace() -> None:
    """The service's own namespace may not see a later mount; pid 1's does, and the path is pid 1's."""
    mounts = [mount((8, 1), "/", "/dev/sda1", mount_id=1), mount((252, 17), "/mnt/data", "/dev/vdb1", ns=OTHER_NS)]
    inv = inventory([VDB], block=[*VDB_DISKS, loop("loop0", (7, 0), "/mnt/data/img")], mounts=mounts)
    assert only(verdict(inv), Code.HOLDER).chain == ("vdb", "vdb1", "loop0")


def test_loop_on_a_file_of_a_mount_elsewhere_is_not_ours() -> None:
    mounts = [mount((252, 33), "/mnt/data", "/dev/vdc1"), mount((252, 17), "/mnt/data2", "/dev/vdb1", mount_id=2)]
    inv = inventory([VDB], block=[*VDB_DISKS, loop("loop0", (7, 0), "/mnt/data/img")], mounts=mounts)
    assert Code.HOLDER not in codes(verdict(inv))


def test_open_by_process_on_a_partition() -> None:
    refs = [
        OpenRef(812, "dd", (252, 17), "block", "/dev/vdb1", 3),
        OpenRef(812, "dd", (252, 17), "block", "/dev/vdb1", 4),
        OpenRef(900, "bash", (252, 33), "block", "/dev/vdc1", 5),
    ]
    v = verdict(inventory([VDB], block=VDB_DISKS, refs=refs))
    r = only(v, Code.OPEN_BY_PROCESS)
    assert r.processes[0].pid == 812 and r.processes[0].command == "dd"
    assert r.processes[0].fds == ("/dev/vdb1 (fd 3)", "/dev/vdb1 (fd 4)")


def test_file_open_on_a_detached_filesystem_names_its_process() -> None:
    refs = [OpenRef(561, "sleep", (252, 17), "file", "/witness", 3), OpenRef(562, "sh", (252, 17), "file", "/", None)]
    v = verdict(inventory([VDB], block=VDB_DISKS, refs=refs, exclusive_busy=["vdb"]))
    assert codes(v) == [Code.OPEN_BY_PROCESS, Code.OPEN_BY_PROCESS]  # explains the claim: no EXCLUSIVE_CLAIM
    assert v.reasons[0].detail == (
        "pid 561 (sleep) holds /witness (fd 3) on vdb1, whose filesystem is mounted nowhere (detached by umount -l)"
    )
    assert v.reasons[1].processes[0].fds == ("/ (cwd)",)


def test_open_char_node_of_any_class() -> None:
    node = DeviceNode("/dev/vport0p1", (243, 1), "char")
    f = fn("0000:00:0a.0", nodes=[node], subdrivers=["virtio_console"])
    refs = [
        OpenRef(55, "agent", (243, 1), "char", "/dev/vport0p1", 7),
        OpenRef(56, "x", (243, 1), "block", "/dev/x", 1),  # same numbers, other kind: not ours
    ]
    v = verdict(inventory([f], refs=refs), "0000:00:0a.0")
    assert v.state is State.BUSY  # OPEN_BY_PROCESS blocks; the unknown class alone would be UNKNOWN
    assert only(v, Code.OPEN_BY_PROCESS).processes[0].pid == 55


def test_exclusive_claim_when_nothing_else_explains_it() -> None:
    v = verdict(inventory([VDB], block=VDB_DISKS, exclusive_busy=["vdb"]))
    assert v.state is State.BUSY
    assert codes(v) == [Code.EXCLUSIVE_CLAIM]


def nsfs(kind: str, number: int, path: str, mount_id: int) -> Mount:
    return mount((0, 4), path, "nsfs", fstype="nsfs", root=f"{kind}:[{number}]", mount_id=mount_id)


def test_exclusive_claim_names_where_a_namespace_without_processes_is_pinned() -> None:
    pins = [nsfs("mnt", 4026533353, "/run/rk/ns/mnt", 50), nsfs("mnt", OWN_NS, "/run/own", 51)]
    v = verdict(inventory([VDB], block=VDB_DISKS, mounts=pins, exclusive_busy=["vdb"]))
    r = only(v, Code.EXCLUSIVE_CLAIM)
    assert r.mount_point == "/run/rk/ns/mnt"  # the agent's own namespace has processes: not a candidate
    assert "pinned at /run/rk/ns/mnt" in r.detail and "/run/own" not in r.detail


def test_exclusive_claim_without_pins_says_it_cannot_name_it() -> None:
    v = verdict(inventory([VDB], block=VDB_DISKS, mounts=[nsfs("net", 4026533380, "/run/netns/x", 50)],
                          exclusive_busy=["vdb"]))  # fmt: skip
    assert "cannot name" in only(v, Code.EXCLUSIVE_CLAIM).detail


def test_exclusive_claim_hidden_when_a_mount_explains_it() -> None:
    inv = inventory([VDB], block=VDB_DISKS, mounts=[mount((252, 17), "/data", "/dev/vdb1")], exclusive_busy=["vdb"])
    assert codes(verdict(inv)) == [Code.MOUNTED]


def test_disk_listed_but_missing_is_unknown() -> None:
    v = verdict(inventory([VDB], block=[]))
    assert v.state is State.UNKNOWN
    assert only(v, Code.UNREADABLE).object == "vdb"


# --------------------------------------------------------------------------- network


def test_nic_down_without_addresses_is_ready() -> None:
    v = verdict(inventory([ETH1], ifaces=[iface("eth1", up=False)]), "0000:00:08.0")
    assert v.state is State.READY and v.reasons == ()


def test_nic_up_with_addresses_and_default_route() -> None:
    inv = inventory(
        [ETH1],
        ifaces=[iface("eth1", addrs=[v4("192.0.2.5"), v6("fe80::1", scope="link")])],
        routes=[default_route("eth1")],
    )
    v = verdict(inv, "0000:00:08.0")
    assert codes(v) == [Code.LINK_UP, Code.HAS_ADDRESS, Code.DEFAULT_ROUTE]
    assert only(v, Code.HAS_ADDRESS).addresses == ("192.0.2.5/24",)
    assert only(v, Code.DEFAULT_ROUTE).detail == "IPv4 default route via 192.0.2.1 dev eth1"


def test_link_local_only_is_a_warning() -> None:
    inv = inventory([ETH1], ifaces=[iface("eth1", up=False, addrs=[v6("fe80::1", scope="link")])])
    v = verdict(inv, "0000:00:08.0")
    assert v.state is State.READY
    assert not only(v, Code.HAS_ADDRESS).blocking


def test_ipv6_only_default_route() -> None:
    inv = inventory(
        [ETH1],
        ifaces=[iface("eth1", up=False, addrs=[v6("2001:db8::5")])],
        routes=[default_route("eth1", "fe80::1", v6_route=True)],
    )
    r = only(verdict(inv, "0000:00:08.0"), Code.DEFAULT_ROUTE)
    assert r.detail.startswith("IPv6 default route via fe80::1")


def test_non_default_route_is_not_a_reason() -> None:
    from unplugd.agent.model import Route

    inv = inventory([ETH1], ifaces=[iface("eth1", up=False)], routes=[Route(2, "10.0.0.0/8", None, "eth1")])
    assert verdict(inv, "0000:00:08.0").state is State.READY


def test_bond_over_two_nics_in_different_slots() -> None:
    ifaces = [
        iface("eth1", up=True, master="bond0", uppers=["bond0"]),
        iface("eth2", up=True, master="bond0", uppers=["bond0"]),
        iface("bond0", kind="bond", lowers=["eth1", "eth2"], addrs=[v4("192.0.2.9")]),
    ]
    socks = [Socket("tcp", "192.0.2.9", 22, "192.0.2.1", 50000, "ESTABLISHED", 999, (123,))]
    inv = inventory([ETH1, ETH2], ifaces=ifaces, routes=[default_route("bond0")], sockets=socks)
    for bdf, name in (("0000:00:08.0", "eth1"), ("0000:00:09.0", "eth2")):
        v = verdict(inv, bdf)
        assert v.state is State.BUSY
        up = only(v, Code.UPPER_DEVICE)
        assert up.detail == f"{name} is enslaved to bond0 (bond)"
        assert "(on top of" in only(v, Code.DEFAULT_ROUTE).detail
        conn = only(v, Code.ACTIVE_CONNECTIONS)
        assert conn.processes[0].pid == 123 and "192.0.2.9:22" in conn.detail


def test_vlan_on_top_is_an_upper_device() -> None:
    ifaces = [iface("eth1", up=False, uppers=["eth1.100"]), iface("eth1.100", kind="vlan", lowers=["eth1"])]
    r = only(verdict(inventory([ETH1], ifaces=ifaces), "0000:00:08.0"), Code.UPPER_DEVICE)
    assert r.detail == "eth1.100 (vlan) sits on top of eth1"


@pytest.mark.parametrize(
    ("sock", "active"),
    [
        (Socket("tcp", "192.0.2.5", 22, "192.0.2.1", 4000, "ESTABLISHED"), True),
        (Socket("tcp", "192.0.2.5", 22, "0.0.0.0", 0, "LISTEN"), False),
        (Socket("tcp6", "::ffff:192.0.2.5", 22, "::ffff:192.0.2.1", 4000, "ESTABLISHED"), True),
        (Socket("udp", "192.0.2.5", 5353, "192.0.2.7", 53, "ESTABLISHED"), True),
        (Socket("udp", "192.0.2.5", 5353, "0.0.0.0", 0, "UNCONN"), False),
        (Socket("tcp", "198.51.100.1", 22, "192.0.2.1", 4000, "ESTABLISHED"), False),
    ],
)
def test_active_connections(sock: Socket, active: bool) -> None:
    inv = inventory([ETH1], ifaces=[iface("eth1", up=False, addrs=[v4("192.0.2.5")])], sockets=[sock])
    v = verdict(inv, "0000:00:08.0")
    assert (Code.ACTIVE_CONNECTIONS in codes(v)) is active


def test_interface_listed_but_missing_is_unknown() -> None:
    v = verdict(inventory([ETH1]), "0000:00:08.0")
    assert v.state is State.UNKNOWN


# --------------------------------------------------------------------------- any class


def test_no_hotplug_driver_blocks() -> None:
    f = fn("0000:00:06.0", block=["vdb"], hotplug=None)
    v = verdict(inventory([f], block=VDB_DISKS))
    assert v.state is State.BUSY
    assert codes(v) == [Code.NO_HOTPLUG_DRIVER]


@pytest.mark.parametrize(
    ("driver", "subdrivers", "state"),
    [
        (None, (), State.READY),  # nothing bound, nothing below
        ("virtio-pci", (), State.READY),  # transport only: no class driver probed
        ("virtio-pci", ("virtio_balloon",), State.UNKNOWN),
        ("vfio-pci", (), State.UNKNOWN),
        ("snd_hda_intel", (), State.UNKNOWN),
    ],
)
def test_driver_bound_unknown_class(driver: str | None, subdrivers: tuple[str, ...], state: State) -> None:
    f = fn("0000:00:0b.0", driver=driver, subdrivers=subdrivers)
    v = verdict(inventory([f]), "0000:00:0b.0")
    assert v.state is state
    if state is State.UNKNOWN:
        r = only(v, Code.DRIVER_BOUND_UNKNOWN_CLASS)
        assert r.undecided and (subdrivers[0] if subdrivers else str(driver)) in r.detail


@pytest.mark.parametrize(
    ("driver", "subdrivers", "pins", "code", "state"),
    [
        ("virtio-pci", ("virtio_net",), ["/run/netns/peer"], Code.NETWORK_NAMESPACE, State.BUSY),
        ("e1000e", (), [], Code.NETWORK_NAMESPACE, State.BUSY),
        ("vfio-pci", (), ["/run/netns/peer"], Code.DRIVER_BOUND_UNKNOWN_CLASS, State.UNKNOWN),  # no netdev at all
    ],
)
def test_nic_without_an_interface_here_is_in_another_network_namespace(
    driver: str, subdrivers: tuple[str, ...], pins: list[str], code: Code, state: State
) -> None:
    f = fn("0000:00:0b.0", driver=driver, subdrivers=subdrivers, class_code=ETHERNET)
    mounts = [nsfs("net", 4026533380 + i, p, 50 + i) for i, p in enumerate(pins)]
    v = verdict(inventory([f], mounts=mounts), "0000:00:0b.0")
    assert (v.state, codes(v)) == (state, [code])
    if code is Code.NETWORK_NAMESPACE:
        assert only(v, code).object == (pins[0] if pins else driver)


def test_leased_is_a_warning() -> None:
    inv = inventory([VDB], block=VDB_DISKS)
    v = verdict(inv, leased={PciAddress.parse("0000:00:06.0"): "lease-1"})
    assert v.state is State.READY
    r = only(v, Code.LEASED)
    assert not r.blocking and "lease-1" in r.detail


# --------------------------------------------------------------------------- bridges


BRIDGE = fn("0000:00:03.0", bridge=True, driver="shpchp")
BEHIND = fn("0000:01:05.0", "0000:00/03.0/05.0", block=["vdb"])


def test_bridge_busy_when_a_child_is_busy() -> None:
    inv = inventory([BRIDGE, BEHIND], block=VDB_DISKS, mounts=[mount((252, 17), "/data", "/dev/vdb1")])
    v = verdict(inv, "0000:00:03.0")
    assert v.state is State.BUSY
    r = only(v, Code.BRIDGE_WITH_CHILDREN)
    assert r.chain == ("0000:01:05.0",) and "MOUNTED" in r.detail


def test_bridge_with_idle_children_warns() -> None:
    v = verdict(inventory([BRIDGE, BEHIND], block=VDB_DISKS), "0000:00:03.0")
    assert v.state is State.READY
    assert not only(v, Code.BRIDGE_WITH_CHILDREN).blocking


def test_bridge_ignores_childrens_own_hotplug_slot() -> None:
    child = fn("0000:01:05.0", "0000:00/03.0/05.0", block=["vdb"], hotplug=None)
    inv = inventory([BRIDGE, child], block=VDB_DISKS)
    assert verdict(inv, "0000:01:05.0").state is State.BUSY
    assert verdict(inv, "0000:00:03.0").state is State.READY


def test_bridge_unknown_when_a_child_is_unknown() -> None:
    child = fn("0000:01:05.0", "0000:00/03.0/05.0", subdrivers=["virtio_balloon"])
    v = verdict(inventory([BRIDGE, child]), "0000:00:03.0")
    assert v.state is State.UNKNOWN


def test_nested_bridges_see_grandchildren() -> None:
    inner = fn("0000:01:01.0", "0000:00/03.0/01.0", bridge=True, driver="shpchp")
    leaf = fn("0000:02:00.0", "0000:00/03.0/01.0/00.0", block=["vdb"])
    inv = inventory([BRIDGE, inner, leaf], block=VDB_DISKS, swaps=[Swap("/dev/vdb1", "partition", (252, 17))])
    assert verdict(inv, "0000:00:03.0").state is State.BUSY
    assert verdict(inv, "0000:01:01.0").state is State.BUSY


def test_sibling_slot_is_not_behind_the_bridge() -> None:
    other = fn("0000:00:04.0", block=["vdb"])
    inv = inventory([BRIDGE, other], block=VDB_DISKS, mounts=[mount((252, 17), "/data", "/dev/vdb1")])
    assert verdict(inv, "0000:00:03.0").reasons == ()


# --------------------------------------------------------------------------- scan problems


@pytest.mark.parametrize(
    ("affects", "state"),
    [
        (("*",), State.UNKNOWN),
        (("vdb1",), State.UNKNOWN),
        (("devno:252:18",), State.UNKNOWN),
        (("0000:00:06.0",), State.UNKNOWN),
        (("vdc",), State.READY),
        (("devno:8:0",), State.READY),
        (("eth9",), State.READY),
    ],
)
def test_problems_make_touched_functions_unknown(affects: tuple[str, ...], state: State) -> None:
    inv = inventory([VDB], block=VDB_DISKS, problems=[ScanProblem("/proc/812/fd", "Permission denied", affects)])
    v = verdict(inv)
    assert v.state is state
    if state is State.UNKNOWN:
        assert only(v, Code.UNREADABLE).detail == "/proc/812/fd: Permission denied"


def test_problem_naming_an_idle_nic_makes_it_unknown() -> None:
    inv = inventory(
        [ETH1], ifaces=[iface("eth1", up=False)], problems=[ScanProblem("/sys/class/net/eth1", "gone", ("eth1",))]
    )
    assert verdict(inv, "0000:00:08.0").state is State.UNKNOWN


def test_problem_does_not_downgrade_busy() -> None:
    inv = inventory(
        [VDB], block=VDB_DISKS, mounts=[mount((252, 17), "/d", "/dev/vdb1")], problems=[ScanProblem("/proc", "x")]
    )
    v = verdict(inv)
    assert v.state is State.BUSY and Code.UNREADABLE not in codes(v)


def test_function_with_nothing_bound_ignores_wildcard_problems() -> None:
    host_bridge = fn("0000:00:00.0", driver=None, class_code=0x060000)
    inv = inventory([host_bridge], problems=[ScanProblem("/proc/1/fd", "denied")])
    assert verdict(inv, "0000:00:00.0").state is State.READY


def test_every_function_gets_one_verdict_in_order() -> None:
    inv = inventory([VDB, VDC, ETH1], block=VDB_DISKS)
    assert [str(v.address) for v in evaluate(inv)] == ["0000:00:06.0", "0000:00:07.0", "0000:00:08.0"]


def test_every_code_is_exercised_here() -> None:
    """Guard: a new Code needs a test in this file."""
    import pathlib

    text = pathlib.Path(__file__).read_text()
    missing = [c.name for c in Code if f"Code.{c.name}" not in text]
    assert missing == []


# --------------------------------------------------------------------------- controllers (issue 15)

SATA = 0x010601
SCSI = 0x010000
NVME = 0x010802
XHCI = 0x0C0330
ROOT_HUBS = (BoundDevice("usb1", "usb", leaf=False), BoundDevice("usb1/1-0:1.0", "hub"))
TABLET = (
    BoundDevice("usb1/1-1", "usb", leaf=False),
    BoundDevice("usb1/1-1/1-1:1.0", "usbhid", leaf=False),
    BoundDevice("usb1/1-1/1-1:1.0/0003:0627:0001.0001", "hid-generic", nodes=("/dev/input/event2",)),
)
USB_DISK = (
    BoundDevice("usb2/2-1", "usb", holds=("sdf",), leaf=False),
    BoundDevice("usb2/2-1/2-1:1.0", "usb-storage", holds=("sdf",), leaf=False),
    BoundDevice("usb2/2-1/2-1:1.0/host2/target2:0:0/2:0:0:0", "sd", holds=("sdf",)),
)
USB_NIC = (
    BoundDevice("usb1/1-2", "usb", holds=("enx1",), leaf=False),
    BoundDevice("usb1/1-2/1-2:1.0", "cdc_ether", holds=("enx1",)),
    BoundDevice("usb1/1-2/1-2:1.1", "cdc_ether"),  # the data interface: same driver, no netdev of its own
)
SDF = [disk("sdf", (8, 80))]


@pytest.mark.parametrize(
    ("name", "f", "block", "state", "code"),
    [
        ("empty AHCI", fn("0000:00:0b.0", driver="ahci", class_code=SATA), [], State.READY, Code.EMPTY_CONTROLLER),
        (
            "empty IDE",
            fn("0000:00:0b.0", driver="ata_piix", class_code=0x01018A),
            [],
            State.READY,
            Code.EMPTY_CONTROLLER,
        ),
        ("empty NVMe", fn("0000:00:0b.0", driver="nvme", class_code=NVME), [], State.READY, Code.EMPTY_CONTROLLER),
        (
            "virtio-scsi without LUNs",
            fn(
                "0000:00:0b.0",
                class_code=SCSI,
                subdrivers=("virtio_scsi",),
                bound=[BoundDevice("virtio3", "virtio_scsi")],
            ),
            [],
            State.READY,
            Code.EMPTY_CONTROLLER,
        ),
        (
            "xHCI with root hubs only",
            fn("0000:00:0b.0", driver="xhci_hcd", class_code=XHCI, subdrivers=("usb", "hub"), bound=ROOT_HUBS),
            [],
            State.READY,
            Code.EMPTY_CONTROLLER,
        ),
        (
            "xHCI with a tablet",
            fn(
                "0000:00:0b.0",
                driver="xhci_hcd",
                class_code=XHCI,
                subdrivers=("usb", "hub", "usbhid", "hid-generic"),
                bound=ROOT_HUBS + TABLET,
            ),
            [],
            State.UNKNOWN,
            Code.DRIVER_BOUND_UNKNOWN_CLASS,
        ),
        (
            "xHCI with an idle disk and a tablet",
            fn("0000:00:0b.0", driver="xhci_hcd", class_code=XHCI, block=["sdf"], bound=ROOT_HUBS + TABLET + USB_DISK),
            SDF,
            State.UNKNOWN,
            Code.DRIVER_BOUND_UNKNOWN_CLASS,
        ),
        (
            "xHCI with an idle disk and a NIC down",
            fn(
                "0000:00:0b.0",
                driver="xhci_hcd",
                class_code=XHCI,
                block=["sdf"],
                nets=["enx1"],
                bound=ROOT_HUBS + USB_DISK + USB_NIC,
            ),
            SDF,
            State.READY,
            None,
        ),
        (
            "SCSI HBA with a tape",
            fn(
                "0000:00:0b.0",
                driver="mpt3sas",
                class_code=SCSI,
                subdrivers=("st",),
                bound=[BoundDevice("host0/target0:0:0/0:0:0:0", "st", nodes=("/dev/st0",))],
            ),
            [],
            State.UNKNOWN,
            Code.DRIVER_BOUND_UNKNOWN_CLASS,
        ),
        (
            "NVMe handed to vfio",
            fn("0000:00:0b.0", driver="vfio-pci", class_code=NVME),
            [],
            State.UNKNOWN,
            Code.DRIVER_BOUND_UNKNOWN_CLASS,
        ),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_controllers_say_what_they_found(
    name: str, f: PciFunction, block: list[BlockDevice], state: State, code: Code | None
) -> None:
    v = verdict(inventory([f], block=block, ifaces=[iface(n, up=False) for n in f.net_interfaces]), "0000:00:0b.0")
    assert v.state is state, v.reasons
    assert codes(v) == ([code] if code else [])
    if code is Code.EMPTY_CONTROLLER:
        r = only(v, code)
        assert not r.blocking and r.object == "0000:00:0b.0"
        assert "nothing is attached" in r.detail and (f.driver or "") in r.detail
    if code is Code.DRIVER_BOUND_UNKNOWN_CLASS:
        r = only(v, code)
        assert r.undecided
    if "tablet" in name:
        # what was found: the driver and its node; what was not: only said when nothing is understood
        detail = only(v, Code.DRIVER_BOUND_UNKNOWN_CLASS).detail
        assert "1-1:1.0" not in detail and "0003:0627:0001.0001 (driver hid-generic, nodes /dev/input/event2)" in detail
        assert ("no disk or network interface" in detail) is (not block)
    if "tape" in name:
        assert "0:0:0:0 (driver st, nodes /dev/st0)" in only(v, code).detail  # type: ignore[arg-type]


def test_a_busy_disk_behind_a_usb_controller_with_a_tablet_is_busy_not_unknown() -> None:
    f = fn("0000:00:0b.0", driver="xhci_hcd", class_code=XHCI, block=["sdf"], bound=ROOT_HUBS + TABLET + USB_DISK)
    v = verdict(inventory([f], block=SDF, mounts=[mount((8, 80), "/media/usb", "/dev/sdf")]), "0000:00:0b.0")
    assert v.state is State.BUSY
    assert codes(v) == [Code.MOUNTED, Code.DRIVER_BOUND_UNKNOWN_CLASS]


def test_one_mounted_lun_makes_the_hba_busy_naming_it() -> None:
    luns = [disk("sda", (8, 0)), disk("sdb", (8, 16)), disk("sdc", (8, 32))]
    f = fn("0000:00:0b.0", class_code=SCSI, block=["sda", "sdb", "sdc"], subdrivers=("virtio_scsi", "sd"))
    v = verdict(inventory([f], block=luns, mounts=[mount((8, 16), "/srv", "/dev/sdb")]), "0000:00:0b.0")
    assert v.state is State.BUSY
    assert [(r.code, r.object) for r in v.reasons] == [(Code.MOUNTED, "sdb")]
    assert v.block_devices == ("sda", "sdb", "sdc")


# An NVMe subsystem: controllers at 02:00.0 and 03:00.0 (behind root ports), one shared namespace whose
# head nvme2n1 the kernel files under the subsystem; its hidden paths sit below each controller.
NVA = fn("0000:02:00.0", "0000:00/10.1/00.0", driver="nvme", class_code=NVME,
         sysfs="/sys/devices/pci0000:00/0000:00:10.1/0000:02:00.0")  # fmt: skip
NVB = fn("0000:03:00.0", "0000:00/10.2/00.0", driver="nvme", class_code=NVME,
         sysfs="/sys/devices/pci0000:00/0000:00:10.2/0000:03:00.0")  # fmt: skip
PORT_A = fn("0000:00:10.1", "0000:00/10.1", driver="pcieport", bridge=True,
            sysfs="/sys/devices/pci0000:00/0000:00:10.1")  # fmt: skip
HEAD = BlockDevice(
    "nvme2n1", "disk", (259, 1), 1 << 30,
    multipath=(f"{NVA.sysfs_path}/nvme/nvme1/nvme2c1n1", f"{NVB.sysfs_path}/nvme/nvme2/nvme2c2n1"),
)  # fmt: skip


def test_a_multipath_head_in_use_makes_every_function_it_runs_over_busy() -> None:
    inv = inventory([PORT_A, NVA, NVB], block=[HEAD, part("nvme2n1p1", (259, 2), "nvme2n1")],
                    mounts=[mount((259, 2), "/data", "/dev/nvme2n1p1")])  # fmt: skip
    for bdf in ("0000:02:00.0", "0000:03:00.0"):
        v = verdict(inv, bdf)
        assert v.state is State.BUSY
        assert [(r.code, r.object) for r in v.reasons] == [(Code.MOUNTED, "nvme2n1p1")]
        assert v.block_devices == ("nvme2n1", "nvme2n1p1")
    # the bridge in front of one controller sees its child busy (the head is the child's, not the port's)
    port = verdict(inv, "0000:00:10.1")
    assert port.block_devices == () and codes(port) == [Code.BRIDGE_WITH_CHILDREN]


def test_an_idle_multipath_head_leaves_both_ready_and_is_no_empty_controller() -> None:
    inv = inventory([NVA, NVB], block=[HEAD])
    for bdf in ("0000:02:00.0", "0000:03:00.0"):
        v = verdict(inv, bdf)
        assert (v.state, v.reasons, v.block_devices) == (State.READY, (), ("nvme2n1",))


def test_a_head_with_one_path_belongs_to_that_function_only() -> None:
    one = BlockDevice("nvme2n1", "disk", (259, 1), 1 << 30, multipath=HEAD.multipath[:1])
    inv = inventory([NVA, NVB], block=[one], mounts=[mount((259, 1), "/data", "/dev/nvme2n1")])
    assert verdict(inv, "0000:02:00.0").state is State.BUSY
    b = verdict(inv, "0000:03:00.0")
    assert (b.state, codes(b)) == (State.READY, [Code.EMPTY_CONTROLLER])
