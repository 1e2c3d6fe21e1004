"""The controllers guest of tests/e2e/test_real_kernel_controllers.py, captured in use (`unplugd capture
--text`, UNPLUGD_DK_CAPTURE_TO=FILE) and inspected offline, with expectations written by hand (issue 15).

What the real kernel (Debian 12, 6.1) showed there: the NVMe subsystem's head under
/sys/devices/virtual/nvme-subsystem with a hidden path device below each of its two controllers, the
virtio-scsi HBA's three LUNs, a SATA disk, an empty AHCI controller, a USB disk and a USB NIC behind
xHCI, an e1000e NIC. Every disk but two LUNs mounted, the NICs up. Guest BDFs follow the layout of
tests/e2e/controllers.py (bus n+1 behind root port n).
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest

from tests.conftest import FIXTURES
from unplugd.agent import cli

TREE = FIXTURES / "captured" / "real_kernel" / "controllers.tree"

# guest BDF -> (qid, state, blocking codes, what the reasons name)
EXPECTED: dict[str, tuple[str, str, set[str], tuple[str, ...]]] = {
    "0000:01:00.0": ("nvplain", "BUSY", {"MOUNTED"}, ("is mounted on /mnt/dk/nvplain",)),
    "0000:02:00.0": ("nvmpa", "BUSY", {"MOUNTED"}, ("is mounted on /mnt/dk/nvmp",)),
    "0000:03:00.0": ("nvmpb", "BUSY", {"MOUNTED"}, ("is mounted on /mnt/dk/nvmp",)),
    "0000:04:00.0": ("vscsi", "BUSY", {"MOUNTED"}, ("is mounted on /mnt/dk/lun1",)),
    "0000:05:00.0": ("ahci1", "BUSY", {"MOUNTED"}, ("is mounted on /mnt/dk/sata0",)),
    "0000:06:00.0": ("ahci0", "READY", set(), ("nothing is attached to this storage (SATA) controller (driver ahci)",)),
    "0000:07:00.0": ("xhci", "BUSY", {"MOUNTED", "LINK_UP"}, ("is mounted on /mnt/dk/usb0", "is administratively up")),
    "0000:08:00.0": ("nic", "BUSY", {"LINK_UP", "HAS_ADDRESS"}, ("192.0.2.50/24",)),
}  # fmt: skip


def inspect(*argv: str) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["inspect", "--json", "--root", str(TREE), *argv]) == cli.EXIT_OK
    return json.loads(out.getvalue())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return inspect()


@pytest.mark.parametrize("bdf", sorted(EXPECTED), ids=[EXPECTED[b][0] for b in sorted(EXPECTED)])
def test_captured_controller(report: dict[str, Any], bdf: str) -> None:
    _, state, codes, named = EXPECTED[bdf]
    f = {f["address"]: f for f in report["functions"]}[bdf]
    text = "\n".join(r["detail"] for r in f.get("reasons", []))
    assert f["state"] == f"FUNCTION_STATE_{state}", text
    assert {r["code"].removeprefix("REASON_CODE_") for r in f.get("reasons", []) if r["blocking"]} == codes, text
    for what in named:
        assert what in text, text


def test_no_problem_about_the_hidden_nvme_paths(report: dict[str, Any]) -> None:
    assert [p for p in report.get("problems", []) if "nvme" in p["object"]] == []


def test_the_head_is_on_both_controllers_and_each_lun_is_on_the_hba(report: dict[str, Any]) -> None:
    by = {f["address"]: [b["name"] for b in f.get("blockDevices", [])] for f in report["functions"]}
    heads = set(by["0000:02:00.0"]) & set(by["0000:03:00.0"])
    assert len(heads) == 1, by
    assert len([n for n in by["0000:04:00.0"] if n.startswith("sd")]) == 3


def test_the_heads_by_id_link_selects_both_controllers() -> None:
    got = inspect("--device", "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_nvmp")
    assert [f["address"] for f in got["functions"]] == ["0000:02:00.0", "0000:03:00.0"]
