"""The demo's own logic, without a VM: how it shows commands, and how it tells that a step did what
it claims (tests/vm/demo.py)."""

from __future__ import annotations

import pytest

from tests.vm.demo import Background, DemoFailed, display, expand, fleet_lines, slot_path_of

ENV = {"$QMP": "/tmp/vm/qmp.sock", "$AGENT": "/tmp/vm/agent.sock", '"$HV"': "qemu+ext:///system?command=/d/hv"}


def test_commands_are_shown_as_typed_and_run_with_the_values() -> None:
    args = ["status", "-c", '"$HV"', "--unpluggable", "target=vd*", "--qmp", "$QMP", "--agent", "serial:$AGENT"]
    assert display(["unplugctl", *args]) == (
        "unplugctl status -c \"$HV\" --unpluggable 'target=vd*' --qmp $QMP --agent serial:$AGENT"
    )
    assert expand(args, ENV) == [
        "status",
        "-c",
        "qemu+ext:///system?command=/d/hv",  # the quotes were the shell's: gone with the placeholder
        "--unpluggable",
        "target=vd*",
        "--qmp",
        "/tmp/vm/qmp.sock",
        "--agent",
        "serial:/tmp/vm/agent.sock",
    ]


def test_the_plugged_slot_is_read_from_plugs_first_slot_line() -> None:
    out = (
        "[  1.24s] planned: slot 0000:00/01.0/00 (pcie-root-port rp-data slot 0x0, chosen): 0=...\n"
        "slot 0000:00/01.0/00 (rp-data 0x00) chosen: hotnic then hotdisk\n"
        "PLUGGED: 2 function(s) in 1 slot(s) present in the guest\n"
    )
    assert slot_path_of(out) == "0000:00/01.0/00"
    with pytest.raises(DemoFailed):
        slot_path_of("[  1.24s] planned: slot 0000:00/01.0/00 (x)\nREJECTED: no\n")


def test_fleet_lines_are_this_domains_on_each_uri_only() -> None:
    out = (
        "qemu:///system demo-1: guest agent reachable; 8 slots: 2 UNPLUGGABLE\n"
        "qemu:///system demo-10: UNREACHABLE: no channel\n"
        "qemu+ext:///system?command=/d/hv demo-1: guest agent reachable; 8 slots: 2 UNPLUGGABLE\n"
        "1 of 1 domain(s) have a device matching target=vd* that is UNPLUGGABLE now\n"
    )
    assert fleet_lines(out, "demo-1") == [out.splitlines()[0], out.splitlines()[2]]
    assert fleet_lines(out, "demo-10") == [out.splitlines()[1]]


def test_a_failure_in_the_background_is_raised_by_join() -> None:
    def fail() -> None:
        raise DemoFailed("wait-ready: exit 4")

    waiter = Background(fail)
    with pytest.raises(DemoFailed, match="exit 4"):
        waiter.join()
    Background(lambda: None).join()
