"""Hand-built guest trees through the whole `unplugd inspect --root` path, and malformed variants of them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root
from tests.fixtures import build_scenarios
from unplugd.agent import cli, treetext

SCENARIOS = build_scenarios.SCENARIOS
HOST_BRIDGE = "0000:00:00.0"
ROOT_DISK = "0000:00:02.0"


def inspect_json(capsys: pytest.CaptureFixture[str], root: Path | str, *devices: str) -> dict[str, Any]:
    """The report `unplugd inspect --json` prints, as parsed JSON: the tests assert its shape."""
    argv = ["inspect", "--json", "--root", str(root)]
    for d in devices:
        argv += ["--device", d]
    assert cli.main(argv) == cli.EXIT_OK
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    report: dict[str, Any] = json.loads(out.out)
    return report


def verdicts(report: dict[str, Any]) -> dict[str, tuple[str, set[str]]]:
    out = {}
    for f in report["functions"]:
        codes = {r["code"].removeprefix("REASON_CODE_") for r in f["reasons"]}
        out[f["address"]] = (f["state"].removeprefix("FUNCTION_STATE_"), codes)
    return out


BASE = {
    HOST_BRIDGE: ("BUSY", {"NO_HOTPLUG_DRIVER"}),
    ROOT_DISK: ("BUSY", {"ROOT_FILESYSTEM", "MOUNTED"}),
}

EXPECTED: dict[str, dict[str, tuple[str, set[str]]]] = {
    "multifunction8": {
        "0000:00:05.0": ("BUSY", {"MOUNTED"}),
        "0000:00:05.1": ("READY", set()),
        "0000:00:05.2": ("BUSY", {"LINK_UP", "HAS_ADDRESS"}),
        "0000:00:05.3": ("READY", set()),
        "0000:00:05.4": ("UNKNOWN", {"DRIVER_BOUND_UNKNOWN_CLASS"}),
        "0000:00:05.5": ("READY", set()),
        "0000:00:05.6": ("BUSY", {"SWAP"}),
        "0000:00:05.7": ("BUSY", {"OPEN_BY_PROCESS"}),
    },
    "behind_bridge": {
        "0000:00:03.0": ("BUSY", {"BRIDGE_WITH_CHILDREN"}),
        "0000:01:05.0": ("BUSY", {"MOUNTED"}),
        "0000:01:06.0": ("READY", set()),
    },
    "crypt_lvm": {"0000:00:06.0": ("BUSY", {"HOLDER", "MOUNTED"})},
    "md_two_slots": {
        "0000:00:06.0": ("BUSY", {"HOLDER", "MOUNTED"}),
        "0000:00:07.0": ("BUSY", {"HOLDER", "MOUNTED"}),
    },
    "swap_partition": {"0000:00:06.0": ("BUSY", {"SWAP"})},
    "bond": {
        "0000:00:08.0": ("BUSY", {"LINK_UP", "UPPER_DEVICE", "DEFAULT_ROUTE", "ACTIVE_CONNECTIONS"}),
        "0000:00:09.0": ("BUSY", {"LINK_UP", "UPPER_DEVICE", "DEFAULT_ROUTE", "ACTIVE_CONNECTIONS"}),
    },
    "linux_bridge": {"0000:00:08.0": ("BUSY", {"LINK_UP", "UPPER_DEVICE"})},
    "ipv6_default_only": {"0000:00:08.0": ("BUSY", {"HAS_ADDRESS", "DEFAULT_ROUTE"})},
    "nic_down": {"0000:00:08.0": ("READY", set())},
    "hostile_names": {
        # the loop backed by disk.img under the hostile mount point holds the disk too
        "0000:00:06.0": ("BUSY", {"MOUNTED", "HOLDER"}),
        "0000:00:07.0": ("BUSY", {"OPEN_BY_PROCESS"}),
        "0000:00:08.0": ("BUSY", {"LINK_UP", "HAS_ADDRESS"}),
        "0000:00:09.0": ("BUSY", {"MOUNTED", "SWAP"}),
    },
    # issue 15: the head of an NVMe subsystem, filed under /sys/devices/virtual, makes both controllers busy
    "nvme_multipath": {
        "0000:00:04.0": ("READY", set()),
        "0000:00:05.0": ("BUSY", {"MOUNTED"}),
        "0000:00:06.0": ("BUSY", {"MOUNTED"}),
    },
    "controllers": {
        "0000:00:07.0": ("BUSY", {"MOUNTED"}),
        "0000:00:08.0": ("READY", set()),
        "0000:00:09.0": ("READY", {"EMPTY_CONTROLLER"}),
        "0000:00:0a.0": ("READY", {"EMPTY_CONTROLLER"}),
        "0000:00:0b.0": ("BUSY", {"MOUNTED"}),
        "0000:00:0c.0": ("UNKNOWN", {"DRIVER_BOUND_UNKNOWN_CLASS"}),
        "0000:00:0d.0": ("BUSY", {"LINK_UP", "HAS_ADDRESS"}),
    },
}


def test_every_scenario_has_expectations() -> None:
    assert set(EXPECTED) == set(build_scenarios.ALL)


@pytest.mark.parametrize("name", sorted(build_scenarios.ALL))
def test_committed_tree_matches_its_builder(name: str) -> None:
    committed = (SCENARIOS / f"{name}.tree").read_text(encoding="utf-8", errors="surrogateescape")
    assert committed == build_scenarios.build(name), "run: .venv/bin/python -m tests.fixtures.build_scenarios"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_scenario_verdicts(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    report = inspect_json(capsys, SCENARIOS / f"{name}.tree")
    assert verdicts(report) == BASE | EXPECTED[name]
    assert report["fromCapture"] is True
    assert report["problems"] == []


def test_multifunction_slot_lists_all_eight_functions(capsys: pytest.CaptureFixture[str]) -> None:
    report = inspect_json(capsys, SCENARIOS / "multifunction8.tree", "vde")
    assert [f["address"] for f in report["functions"]] == ["0000:00:05.7"]
    (slot,) = report["slots"]
    assert slot["functions"] == [f"0000:00:05.{n}" for n in range(8)]
    assert slot["state"] == "FUNCTION_STATE_BUSY"
    assert slot["hotplugSlot"] == "5"


def test_bridge_child_has_a_path_through_the_bridge(capsys: pytest.CaptureFixture[str]) -> None:
    report = inspect_json(capsys, SCENARIOS / "behind_bridge.tree", "vdb1")
    (f,) = report["functions"]
    assert (f["address"], f["pciPath"], f["slotPath"]) == ("0000:01:05.0", "0000:00/03.0/05.0", "0000:00/03.0/05")


def test_crypt_lvm_chain_and_mapper_name(capsys: pytest.CaptureFixture[str]) -> None:
    report = inspect_json(capsys, SCENARIOS / "crypt_lvm.tree", "/dev/mapper/vg0-data")
    (f,) = report["functions"]
    holder = next(r for r in f["reasons"] if r["code"] == "REASON_CODE_HOLDER")
    assert holder["chain"] == ["vdb", "vdb2", "dm-0", "dm-1"]
    mounted = next(r for r in f["reasons"] if r["code"] == "REASON_CODE_MOUNTED")
    assert mounted["mountPoint"] == "/home"
    assert [b["name"] for b in f["blockDevices"]] == ["vdb", "vdb1", "vdb2", "dm-0", "dm-1"]


def test_md_mount_in_other_namespace_names_the_pid(capsys: pytest.CaptureFixture[str]) -> None:
    report = inspect_json(capsys, SCENARIOS / "md_two_slots.tree", "md0")
    assert len(report["functions"]) == 2
    for f in report["functions"]:
        mounted = next(r for r in f["reasons"] if r["code"] == "REASON_CODE_MOUNTED")
        assert "pid 500" in mounted["detail"]


def test_bond_connection_names_its_owner(capsys: pytest.CaptureFixture[str]) -> None:
    report = inspect_json(capsys, SCENARIOS / "bond.tree", "bond0")
    assert len(report["functions"]) == 2
    conn = next(r for r in report["functions"][0]["reasons"] if r["code"] == "REASON_CODE_ACTIVE_CONNECTIONS")
    assert [p["pid"] for p in conn["processes"]] == [600]


@pytest.mark.parametrize(
    ("name", "functions"),
    [
        ("nvme2n1", ["0000:00:05.0", "0000:00:06.0"]),
        ("/dev/nvme2n1", ["0000:00:05.0", "0000:00:06.0"]),
        ("/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_nvmp", ["0000:00:05.0", "0000:00:06.0"]),
        ("/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_nvplain", ["0000:00:04.0"]),
        ("nvme0n1", ["0000:00:04.0"]),
    ],
)
def test_nvme_names_select_the_functions_they_run_over(
    name: str, functions: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    report = inspect_json(capsys, SCENARIOS / "nvme_multipath.tree", name)
    listed: list[dict[str, Any]] = report["functions"]
    assert [f["address"] for f in listed] == functions
    for f in listed:
        if "nvme2n1" in [b["name"] for b in f["blockDevices"]]:
            (mounted,) = f["reasons"]
            assert (mounted["object"], mounted["mountPoint"]) == ("nvme2n1", "/data")


def test_hidden_nvme_paths_are_not_check_names(capsys: pytest.CaptureFixture[str]) -> None:
    """A path device has no node: nothing can open it by that name, so it names nothing."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["check", "--root", str(SCENARIOS / "nvme_multipath.tree"), "nvme2c1n1"])
    assert exited.value.code == cli.EXIT_USAGE
    assert "no PCI function, interface or block device matches" in capsys.readouterr().err


def test_controllers_name_the_disk_in_use_and_what_they_found(capsys: pytest.CaptureFixture[str]) -> None:
    report = inspect_json(capsys, SCENARIOS / "controllers.tree")
    listed: list[dict[str, Any]] = report["functions"]
    by = {f["address"]: f for f in listed}
    assert [r["object"] for r in by["0000:00:07.0"]["reasons"]] == ["sdb"]  # one of three LUNs
    assert [r["object"] for r in by["0000:00:0b.0"]["reasons"]] == ["sde"]  # the USB disk, not the NIC (down)
    assert [n["name"] for n in by["0000:00:0b.0"]["netInterfaces"]] == ["enx5254005b0002"]
    for bdf, driver in (("0000:00:09.0", "ahci"), ("0000:00:0a.0", "ata_piix")):
        (empty,) = by[bdf]["reasons"]
        assert empty["blocking"] is False and f"controller (driver {driver})" in empty["detail"]
    (tablet,) = by["0000:00:0c.0"]["reasons"]
    assert "0003:0627:0001.0001 (driver hid-generic, nodes /dev/input/event2)" in tablet["detail"]
    for name, bdf in (("/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_lun1", "0000:00:07.0"), ("sdc", "0000:00:07.0"),
                      ("/dev/disk/by-path/pci-0000:00:08.0-ata-1", "0000:00:08.0"),
                      ("/dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_usb0-0:0", "0000:00:0b.0"),
                      ("enx5254005b0002", "0000:00:0b.0")):  # fmt: skip
        one: list[dict[str, Any]] = inspect_json(capsys, SCENARIOS / "controllers.tree", name)["functions"]
        assert [f["address"] for f in one] == [bdf], name


def test_warnings_keep_blocking_false_in_json(capsys: pytest.CaptureFixture[str]) -> None:
    report = inspect_json(capsys, SCENARIOS / "behind_bridge.tree", "0000:00:03.0")
    assert report["functions"][0]["reasons"][0]["blocking"] is True
    report = inspect_json(capsys, SCENARIOS / "nic_down.tree")
    eth1 = next(f for f in report["functions"] if f["address"] == "0000:00:08.0")
    assert eth1["netInterfaces"][0]["adminUp"] is False


# --------------------------------------------------------------------------- malformed input


@pytest.fixture
def mf8(tmp_path: Path) -> Path:
    """multifunction8 unpacked, to be damaged; 0000:00:05.1 (vdc) and .3 (eth2) are READY in it."""
    root = tmp_path / "tree"
    treetext.unpack((SCENARIOS / "multifunction8.tree").read_text(), root)
    return root


def _agent_mountinfo(root: Path) -> Path:
    return root / "proc" / str(build_scenarios.AGENT_PID) / "mountinfo"


def _vdc_dir(root: Path) -> Path:
    return (root / "sys/class/block/vdc").resolve()


def _self_loop(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    os.symlink(path.name, path)


def _file_to_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


DAMAGE: dict[str, Callable[[Path], object]] = {
    "truncated mountinfo line": lambda r: _agent_mountinfo(r).write_text(
        _agent_mountinfo(r).read_text() + "77 1 252:16 / /x rw\n"
    ),
    "bad escape in mountinfo": lambda r: _agent_mountinfo(r).write_text(
        _agent_mountinfo(r).read_text() + "78 1 252:16 / /x\\0 rw shared:1 - ext4 /dev/vdc\\9 rw\n"
    ),
    "unreadable fd table": lambda r: _self_loop(r / "proc/400/fd"),
    "unreadable mountinfo": lambda r: _self_loop(_agent_mountinfo(r)),
    "block device vanished": lambda r: (r / "sys/class/block/vdc").unlink(),
    "malformed dev number": lambda r: (_vdc_dir(r) / "dev").write_text("252:x\n"),
    "garbage in swaps": lambda r: (r / "proc/swaps").write_text(
        (r / "proc/swaps").read_text() + "/dev/vdc\tpartition\tlots\n"
    ),
    "swaps is a directory": lambda r: _file_to_dir(r / "proc/swaps"),
    "netlink.json not JSON": lambda r: (r / "netlink.json").write_text('{"links": [\n'),
    "netlink.json wrong shape": lambda r: (r / "netlink.json").write_text('{"addresses": [{"ifname": 3}]}'),
    "unreadable class file": lambda r: _self_loop(r / "sys/devices/pci0000:00/0000:00:05.1/class"),
    "garbage class file": lambda r: (r / "sys/devices/pci0000:00/0000:00:05.1/class").write_text("storage\n"),
    "proc/net/tcp truncated": lambda r: (r / "proc/net/tcp").write_text(
        (r / "proc/net/tcp").read_text() + "   0: 0A00000"
    ),
}

# Which function each damage leaves undecided (it must not stay READY).
TOUCHED = {
    "block device vanished": ["0000:00:05.1"],
    "malformed dev number": ["0000:00:05.1"],
    "unreadable class file": ["0000:00:05.1"],
    "garbage class file": ["0000:00:05.1"],
    "netlink.json not JSON": ["0000:00:05.3"],
    "netlink.json wrong shape": ["0000:00:05.3"],
    "proc/net/tcp truncated": ["0000:00:05.3"],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_tree_is_unknown_never_ready(damage: str, mf8: Path, capsys: pytest.CaptureFixture[str]) -> None:
    DAMAGE[damage](mf8)
    report = inspect_json(capsys, mf8)
    got = verdicts(report)
    for bdf in TOUCHED.get(damage, ["0000:00:05.1", "0000:00:05.3"]):
        state, codes = got[bdf]
        assert state == "UNKNOWN", (bdf, got[bdf])
        assert "UNREADABLE" in codes
    # what was busy stays busy, or UNKNOWN when the damage hid why (a whole mount table lost)
    for bdf in ("0000:00:05.0", "0000:00:05.2", "0000:00:05.6", "0000:00:05.7"):
        assert got[bdf][0] in ("BUSY", "UNKNOWN"), (bdf, got[bdf])
    if damage != "block device vanished":  # that one is noticed by the policy: vdc listed, not found
        assert report["problems"], "the damage must be reported"


@pytest.mark.parametrize(
    "text",
    [
        "# treetext 1\nfile sys/a\n|x\\q\n",
        "# treetext 1\nlink sys/a ->\n",
        "# treetext 1\nfile ../../etc/passwd\n|root\n",
        "# treetext 1\nlink sys -> /\nfile sys/etc/shadow\n",
    ],
)
def test_malformed_archive_is_a_clear_failure(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "bad.tree"
    archive.write_text(text)
    assert cli.main(["inspect", "--root", str(archive)]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.startswith(f"unplugd: --root {archive}: treetext") and "Traceback" not in err
    assert not (tmp_path / "etc").exists()


def test_truncated_archive_still_yields_no_ready_for_what_it_lost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (SCENARIOS / "multifunction8.tree").read_text()
    cut = text[: text.index("file proc/400/comm")]  # everything about the dd process and later is lost
    archive = tmp_path / "cut.tree"
    archive.write_text(cut)
    report = inspect_json(capsys, archive)
    assert report["problems"], "a tree cut short must say what it could not read"
    assert all(state != "READY" or not codes for state, codes in verdicts(report).values())


# --------------------------------------------------------------------------- capture and engine robustness


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_capture_of_a_tree_reproduces_its_verdicts(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """capture copies exactly what the collectors need: a scenario captured again inspects the same."""
    from unplugd.agent.capture import capture
    from unplugd.agent.roots import Roots

    original = tmp_path / "original"
    treetext.unpack((SCENARIOS / f"{name}.tree").read_text(errors="surrogateescape"), original)
    stats = capture(tmp_path / "copy", Roots.under(original))
    assert stats.files and stats.links and stats.unreadable == []
    assert verdicts(inspect_json(capsys, tmp_path / "copy")) == verdicts(inspect_json(capsys, original))


def test_capture_keeps_unreadable_markers(mf8: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unplugd.agent.capture import capture
    from unplugd.agent.roots import Roots

    DAMAGE["unreadable fd table"](mf8)
    capture(tmp_path / "copy", Roots.under(mf8))
    assert os.readlink(tmp_path / "copy/proc/400/fd") == "fd"
    assert verdicts(inspect_json(capsys, tmp_path / "copy"))["0000:00:05.1"][0] == "UNKNOWN"


def test_a_failing_collector_is_a_problem_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from unplugd.agent import engine

    def broken(*args: object, **kwargs: object) -> object:
        raise ZeroDivisionError("collector bug")

    monkeypatch.setattr(engine, "collect_swaps", broken)
    report = inspect_json(capsys, SCENARIOS / "multifunction8.tree")
    got = verdicts(report)
    assert got["0000:00:05.1"] == ("UNKNOWN", {"UNREADABLE"})  # idle disk: swap state unknown
    assert got["0000:00:05.0"][0] == "BUSY"  # still mounted
    assert any("internal error: ZeroDivisionError" in p["detail"] for p in report["problems"])


def test_the_agents_own_lease_fd_is_not_a_holder(mf8: Path) -> None:
    """The agent holds leased disks open itself (O_EXCL); that must read LEASED, not OPEN_BY_PROCESS."""
    from unplugd.agent import engine
    from unplugd.agent.roots import Roots
    from unplugd.pci import PciAddress
    from unplugd.v1 import report_pb2

    os.symlink("/dev/vdc", mf8 / f"proc/{build_scenarios.AGENT_PID}/fd/9")
    vdc = PciAddress.parse("0000:00:05.1")
    unclaimed = engine.inspect(Roots.under(mf8), ["vdc"])
    assert [r.object for r in unclaimed.functions[0].reasons] == ["/dev/vdc"]  # OPEN_BY_PROCESS by pid 100
    claimed = engine.inspect(Roots.under(mf8), ["vdc"], leased={vdc: "L1"}, own_claims=["vdc"])
    reasons = claimed.functions[0].reasons
    assert claimed.functions[0].state == report_pb2.FUNCTION_STATE_READY
    assert [(r.code, r.blocking) for r in reasons] == [(report_pb2.REASON_CODE_LEASED, False)]


def test_capture_refuses_a_destination_another_user_could_redirect(mf8: Path, tmp_path: Path) -> None:
    """As root, `unplugd capture /tmp/guest` into an empty directory a user had made let that user put
    a symlink where capture was about to write (guest/netlink.json -> /etc/shadow): root wrote
    through it. A destination anyone else can change, or on a path they can change, is refused."""
    from unplugd.agent.capture import capture
    from unplugd.agent.errors import InvalidArgument
    from unplugd.agent.roots import Roots

    require_root()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)  # nobody's empty directory
    with pytest.raises(InvalidArgument, match=f"{theirs} belongs to uid 65534"):
        capture(theirs, Roots.under(mf8))
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # anyone may rename what capture makes in it
    with pytest.raises(InvalidArgument, match=f"{open_dir} is writable by others"):
        capture(open_dir / "copy", Roots.under(mf8))
    assert not (open_dir / "copy").exists()  # refused: the directory it made is gone again
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)  # as /tmp: nobody else may rename or remove an entry of ours
    assert capture(sticky / "copy", Roots.under(mf8)).files
