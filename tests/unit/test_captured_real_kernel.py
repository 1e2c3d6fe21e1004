"""The q35 real-kernel guest of tests/e2e/test_real_kernel_q35.py, captured (`unplugd capture --text`) and
inspected offline: every case of issue 10 with hand-checked expectations.

The tree was captured by that test (UNPLUGD_RK_CAPTURE_TO=FILE) after real_kernel_scenarios.sh built the
scenarios; the guest BDFs follow the layout in tests/e2e/real_kernel.py (bus n+1 behind root port n).
Two live-only answers cannot be carried by a capture: the O_EXCL probe and the files found through it
(dlazy: a filesystem detached by umount -l, dexcl: a mount in a namespace pinned without processes).
Offline those disks show nothing, so they read READY here; the e2e test asserts them live.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import FIXTURES
from unplugd.agent import cli

# Two of these verdicts only exist live (below), hence its own directory.
TREE = FIXTURES / "captured" / "real_kernel" / "q35.tree"

# guest BDF -> (qid in the e2e test, state, blocking codes, what the reasons name)
EXPECTED: dict[str, tuple[str, str, set[str], tuple[str, ...]]] = {
    "0000:01:00.0": ("dpart", "BUSY", {"MOUNTED"}, ("vda1 is mounted on /mnt/rk/part (ext4)",
                                                   "mounted on /mnt/rk/bind (ext4, bind mount of /sub)")),
    "0000:02:00.0": ("dns", "BUSY", {"MOUNTED"}, ("vdb is mounted on /mnt/rk/ns (ext4) in the mount namespace of",)),
    "0000:03:00.0": ("dswap", "BUSY", {"SWAP"}, ("vdc1 is in use as swap (/dev/vdc1)",)),
    "0000:04:00.0": ("dswapf", "BUSY", {"MOUNTED", "SWAP"}, ("swap file /mnt/rk/swapf/swapfile is active on vdd",)),
    "0000:05:00.0": ("dlvm1", "BUSY", {"MOUNTED", "HOLDER"}, ("held by LVM dm-0 (rkspan-data): vde -> dm-0",)),
    "0000:06:00.0": ("dlvm2", "BUSY", {"MOUNTED", "HOLDER"}, ("held by LVM dm-0 (rkspan-data): vdf -> dm-0",)),
    "0000:07:00.0": ("dlvmidle", "BUSY", {"HOLDER"}, ("held by LVM dm-1 (rkidle-idle)",)),
    "0000:08:00.0": ("dluks", "BUSY", {"MOUNTED", "HOLDER"}, ("held by dm-crypt dm-2 (rkluks)", "/mnt/rk/luks")),
    "0000:09:00.0": ("dplain", "BUSY", {"HOLDER"}, ("held by dm-crypt dm-3 (rkplain)",)),
    "0000:0a:00.0": ("dlinear", "BUSY", {"HOLDER"}, ("held by device-mapper dm-4 (rklinear)",)),
    "0000:0b:00.0": ("dmd1", "BUSY", {"MOUNTED", "HOLDER"}, ("held by md raid1 md127: vdk -> md127",)),
    "0000:0c:00.0": ("dmd2", "BUSY", {"MOUNTED", "HOLDER"}, ("held by md raid1 md127: vdl -> md127",)),
    "0000:0d:00.0": ("dloop", "BUSY", {"MOUNTED", "HOLDER"}, ("held by loop loop0: vdm -> loop0 (backed by "
                                                             "/mnt/rk/loopfs/img)",)),
    "0000:0e:00.0": ("draw", "BUSY", {"OPEN_BY_PROCESS"}, ("(sleep) holds /dev/vdn (fd 3)",)),
    "0000:0f:00.0": ("dlazy", "READY", set(), ()),  # live only (see above)
    "0000:10:00.0": ("dexcl", "READY", set(), ()),  # live only (see above)
    # the open port makes it BUSY; the class (virtio-console) is one the agent does not inspect
    "0000:11:00.0": ("vport", "BUSY", {"OPEN_BY_PROCESS", "DRIVER_BOUND_UNKNOWN_CLASS"}, ("(sleep) holds /dev/vport",)),
    "0000:12:00.0": ("nup", "BUSY", {"LINK_UP"}, ("is administratively up",)),
    "0000:13:00.0": ("nv4", "BUSY", {"LINK_UP", "HAS_ADDRESS", "DEFAULT_ROUTE"},
                     ("192.0.2.10/24", "IPv4 default route via 192.0.2.1")),
    "0000:14:00.0": ("nv6", "BUSY", {"LINK_UP", "HAS_ADDRESS", "DEFAULT_ROUTE"},
                     ("2001:db8:6::10/64", "IPv6 default route via 2001:db8:6::1")),
    "0000:15:00.0": ("nbond", "BUSY", {"LINK_UP", "UPPER_DEVICE"}, ("is enslaved to rkbond (bond)",)),
    "0000:16:00.0": ("nbr", "BUSY", {"LINK_UP", "UPPER_DEVICE"}, ("is enslaved to rkbr (bridge)",)),
    "0000:17:00.0": ("nvlan", "BUSY", {"UPPER_DEVICE"}, ("rkvlan (vlan) sits on top of",)),
    "0000:18:00.0": ("nmv", "BUSY", {"UPPER_DEVICE"}, ("rkmv (macvlan) sits on top of",)),
    "0000:19:00.0": ("nconn", "BUSY", {"LINK_UP", "HAS_ADDRESS", "ACTIVE_CONNECTIONS"},
                     ("1 active connection on", "<-> 10.99.0.2:7000")),
    "0000:1a:00.0": ("npeer", "BUSY", {"NETWORK_NAMESPACE"}, ("/run/netns/rkpeer",)),
    "0000:1b:00.0": ("ndown", "READY", set(), ()),
    "0000:1c:00.0": ("didle", "READY", set(), ()),
    "0000:1e:00.0": ("dnohp", "BUSY", {"NO_HOTPLUG_DRIVER"}, ("no hotplug slot drives 0000:1e:00",)),
    "0000:1f:00.0": ("dwait", "BUSY", {"MOUNTED"}, ("/mnt/rk/wait",)),
    "0000:20:00.0": ("dprep", "READY", set(), ()),
}  # fmt: skip


@pytest.fixture(scope="module")
def functions() -> dict[str, dict[str, Any]]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["inspect", "--json", "--root", str(TREE)]) == cli.EXIT_OK
    report = json.loads(out.getvalue())
    assert report["fromCapture"] is True
    return {f["address"]: f for f in report["functions"]}


@pytest.mark.parametrize("bdf", sorted(EXPECTED), ids=[EXPECTED[b][0] for b in sorted(EXPECTED)])
def test_captured_case(functions: dict[str, dict[str, Any]], bdf: str) -> None:
    _, state, codes, named = EXPECTED[bdf]
    f = functions[bdf]
    text = "\n".join(r["detail"] for r in f.get("reasons", []))
    assert f["state"] == f"FUNCTION_STATE_{state}", text
    assert {r["code"].removeprefix("REASON_CODE_") for r in f.get("reasons", []) if r["blocking"]} == codes, text
    for what in named:
        assert what in text


def test_both_md_members_and_both_lvm_disks_name_one_holder(functions: dict[str, dict[str, Any]]) -> None:
    """Filesystems spanning two slots: each slot names the same top of the stack and the same mount."""
    for pair, top, mount_point in ((("0000:0b:00.0", "0000:0c:00.0"), "md127", "/mnt/rk/md"),
                                   (("0000:05:00.0", "0000:06:00.0"), "dm-0", "/mnt/rk/lvm")):  # fmt: skip
        for bdf in pair:
            reasons = functions[bdf]["reasons"]
            assert [r["object"] for r in reasons if r["code"] == "REASON_CODE_HOLDER"] == [top]
            assert [r["mountPoint"] for r in reasons if r["code"] == "REASON_CODE_MOUNTED"] == [mount_point]
