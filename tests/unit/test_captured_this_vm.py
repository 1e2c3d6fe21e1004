"""The development VM, captured (`python -m tests.fixtures.capture_this_machine`) and inspected offline,
against verdicts worked out by hand from the tree, each with its reason.

What the tree holds (tests/fixtures/captured/this_vm.tree), read by hand:
* six functions on bus 00, all behind virtio-pci but the host bridge, and no sys/bus/pci/slots at all:
  nothing drives a hotplug slot, so every function carries NO_HOTPLUG_DRIVER, which blocks;
* 02.0 is virtio-blk vda (254:0): mounted on / and bind-mounted again on /run/netns (mountinfo ids 27
  and 42 of the one mount namespace processes live in); /proc/swaps is empty; no fd of any process
  names it; no holders;
* 03.0 is virtio-net eth0: flags 0x1003 (IFF_UP), operstate up, 192.0.2.2/24 and fd00::2/64 (the
  fe80:: address is link-local, not counted), IPv4 and IPv6 default routes through it; the one TCP
  socket is a LISTEN on 0.0.0.0:2024 (state 0A), not a connection;
* 01.0, 04.0, 05.0 are class 0xffff00 with virtio_balloon, vmw_vsock_virtio_transport and virtio_rng
  bound below virtio-pci: classes the agent does not inspect (undecided);
* pid 1's fd directory was unreadable at capture (the `fd -> fd` marker): one problem, which leaves
  undecided every function with a driver that nothing else already made BUSY.
The program agreed with every line below when they were written (nothing copied from its output).
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest

from tests.conftest import FIXTURES
from unplugd.agent import cli

CAPTURED = FIXTURES / "captured"
TREE = CAPTURED / "this_vm.tree"
NO_SLOT = "NO_HOTPLUG_DRIVER"  # no sys/bus/pci/slots: last reason of every function (policy.evaluate)

# guest BDF -> (state, reason codes in the report's order, a text each reason must contain, why)
EXPECTED: dict[str, tuple[str, list[str], list[str], str]] = {
    "0000:00:00.0": ("BUSY", [NO_SLOT], ["no hotplug slot drives 0000:00:00"],
                     "host bridge (class 060000), no driver: nothing uses it, so pid 1's unreadable fds "
                     "cannot involve it; only the missing hotplug slot blocks"),
    "0000:00:01.0": ("BUSY", ["DRIVER_BOUND_UNKNOWN_CLASS", "UNREADABLE", NO_SLOT],
                     ["driver virtio_balloon", "/proc/1/fd", "no hotplug slot drives 0000:00:01"],
                     "balloon: a bound class the agent does not inspect, and pid 1 may hold it"),
    "0000:00:02.0": ("BUSY", ["ROOT_FILESYSTEM", "MOUNTED", "MOUNTED", NO_SLOT],
                     ["the root filesystem (/) is on vda", "vda is mounted on / (ext4)",
                      "vda is mounted on /run/netns (ext4, bind mount of /run/netns)",
                      "no hotplug slot drives 0000:00:02"],
                     "vda holds / and a bind mount; BUSY already, so the unreadable fds add nothing"),
    "0000:00:03.0": ("BUSY", ["LINK_UP", "HAS_ADDRESS", "DEFAULT_ROUTE", "DEFAULT_ROUTE", NO_SLOT],
                     ["eth0 is administratively up", "eth0 has 192.0.2.2/24, fd00::2/64",
                      "IPv4 default route via 192.0.2.1 dev eth0", "IPv6 default route via fd00::1 dev eth0",
                      "no hotplug slot drives 0000:00:03"],
                     "eth0 up with two global addresses and both default routes; a LISTEN is no connection"),
    "0000:00:04.0": ("BUSY", ["DRIVER_BOUND_UNKNOWN_CLASS", "UNREADABLE", NO_SLOT],
                     ["driver vmw_vsock_virtio_transport", "/proc/1/fd", "no hotplug slot drives 0000:00:04"],
                     "vsock: a bound class the agent does not inspect, and pid 1 may hold it"),
    "0000:00:05.0": ("BUSY", ["DRIVER_BOUND_UNKNOWN_CLASS", "UNREADABLE", NO_SLOT],
                     ["driver virtio_rng", "/proc/1/fd", "no hotplug slot drives 0000:00:05"],
                     "rng: a bound class the agent does not inspect, and pid 1 may hold it"),
}  # fmt: skip


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["inspect", "--json", "--root", str(TREE)]) == cli.EXIT_OK
    return json.loads(out.getvalue())  # type: ignore[no-any-return]


def test_machine_and_its_one_problem(report: dict[str, Any]) -> None:
    assert (report["hostname"], report["kernel"], report["fromCapture"]) == ("vm", "6.18.44-fc-v595", True)
    assert [p["object"] for p in report["problems"]] == ["/proc/1/fd"]
    assert [f["address"] for f in report["functions"]] == sorted(EXPECTED)


@pytest.mark.parametrize("bdf", sorted(EXPECTED))
def test_function_verdict(report: dict[str, Any], bdf: str) -> None:
    state, codes, texts, _why = EXPECTED[bdf]
    (f,) = (f for f in report["functions"] if f["address"] == bdf)
    reasons = f.get("reasons", [])
    assert f["state"] == f"FUNCTION_STATE_{state}"
    assert [r["code"].removeprefix("REASON_CODE_") for r in reasons] == codes
    for reason, text in zip(reasons, texts, strict=True):
        assert text in reason["detail"], reason


def test_every_captured_tree_has_hand_written_expectations() -> None:
    """A tree recorded under captured/ is checked by a test module naming it, never against its own output."""
    named = "\n".join(p.read_text() for p in (FIXTURES.parent / "unit").glob("test_captured_*.py"))
    for tree in CAPTURED.rglob("*.tree"):
        rel = tree.relative_to(CAPTURED)
        assert f'"{rel.name}"' in named and all(f'"{part}"' in named for part in rel.parts), rel
    assert not list(CAPTURED.rglob("*.json")), "recorded verdicts are not expectations"
