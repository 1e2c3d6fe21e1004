"""`unplugd inspect`'s table: a line per function and its first reason; infrastructure folded unless --all."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import FIXTURES
from unplugd.agent import cli, render

THIS_VM = FIXTURES / "captured" / "this_vm.tree"  # its 00.0 is a host bridge (class 060000)
PROBLEM = {"object": "/proc/1/fd", "detail": "cannot read the open files of pid 1"}


def _reason(code: str, detail: str, *, blocking: bool = True) -> dict[str, Any]:
    return {"code": f"REASON_CODE_{code}", "detail": detail, "blocking": blocking}


def _no_hotplug(slot: str) -> dict[str, Any]:
    return _reason("NO_HOTPLUG_DRIVER", f"no hotplug slot drives {slot} in the guest")


def _unreadable() -> dict[str, Any]:
    return _reason("UNREADABLE", f"{PROBLEM['object']}: {PROBLEM['detail']}")


def _fn(address: str, state: str = "READY", reasons: tuple[dict[str, Any], ...] = (), **kw: Any) -> dict[str, Any]:
    slot = address.rsplit(".", 1)[0]
    return {"address": address, "slot": slot, "state": f"FUNCTION_STATE_{state}", "reasons": list(reasons), **kw}


def _report(*functions: dict[str, Any], problems: tuple[dict[str, str], ...] = ()) -> dict[str, Any]:
    return {"hostname": "g", "kernel": "6.1", "functions": list(functions), "problems": list(problems)}


def _shown(lines: list[str]) -> list[str]:
    """The function column of each function line (a slot's later functions have no SLOT cell)."""
    rows = [line.split() for line in lines[2:] if line.startswith("0000:") or line.startswith("            0000:")]
    return [cells[0] if "." in cells[0] else cells[1] for cells in rows]


INFRA = _report(
    _fn("0000:00:00.0", class_code="060000", class_name="host bridge"),
    _fn("0000:00:02.0", class_code="060400", is_bridge=True),
    _fn("0000:01:00.0", class_code="010000", block_devices=[{"name": "vda"}]),
)


@pytest.mark.parametrize(("show_all", "shown"), [(False, ["0000:01:00.0"]), (True, ["0000:00:00.0", "0000:00:02.0",
                                                                                      "0000:01:00.0"])])  # fmt: skip
def test_infrastructure_folds_unless_all(show_all: bool, shown: list[str]) -> None:
    lines = render.table_lines(INFRA, show_all=show_all)
    assert _shown(lines) == shown
    folded = [line for line in lines if line.startswith("+ ")]
    assert folded == ([] if show_all else [f"+ 2 {folded[0].split(' ', 2)[2]}"])


def test_a_line_per_function_with_its_first_reason_and_what_the_others_are() -> None:
    busy = _fn(
        "0000:00:06.0",
        "BUSY",
        (_reason("MOUNTED", "vdb is mounted on /data"), _reason("OPEN_BY_PROCESS", "pid 812 holds vdb")),
        block_devices=[{"name": "vdb"}],
    )
    lines = render.table_lines(_report(busy, _fn("0000:00:07.0")))
    assert [line.split()[-1] for line in lines[2:]] == ["BUSY", "-v)", "READY"]  # READY: no reason line
    reason_lines = [line.strip() for line in lines if line.startswith(" ")]
    assert reason_lines == ["└─ MOUNTED: vdb is mounted on /data (+ OPEN_BY_PROCESS: -v)"]
    every = [line.strip() for line in render.table_lines(_report(busy), verbose=True) if line.startswith(" ")]
    assert every == ["├─ MOUNTED: vdb is mounted on /data", "└─ OPEN_BY_PROCESS: pid 812 holds vdb"]


def test_a_reason_said_elsewhere_yields_to_the_functions_own() -> None:
    """The listed problem and the slot's missing hotplug driver come after what uses the device."""
    fn = _fn(
        "0000:00:06.0",
        "BUSY",
        (_unreadable(), _no_hotplug("0000:00:06"), _reason("HAS_ADDRESS", "eth1 has 10.0.0.2/24")),
    )
    ready_elsewhere = _fn("0000:00:07.0", "READY")  # has a hotplug driver: NO_HOTPLUG_DRIVER is not machine-wide
    lines = render.table_lines(_report(fn, ready_elsewhere, problems=(PROBLEM,)))
    reasons = [line.strip() for line in lines if line.startswith(" ") and not line.startswith("  /proc")]
    # the listed problem is not named again; the slot's reason is
    assert reasons == ["└─ HAS_ADDRESS: eth1 has 10.0.0.2/24 (+ NO_HOTPLUG_DRIVER: -v)"]
    assert lines[-1] == "  /proc/1/fd: cannot read the open files of pid 1"


def test_the_others_are_named_once_by_code() -> None:
    fn = _fn(
        "0000:00:06.0",
        "BUSY",
        (_reason("LINK_UP", "eth1 is up"), _reason("DEFAULT_ROUTE", "IPv4"), _reason("DEFAULT_ROUTE", "IPv6")),
    )
    assert [line.strip() for line in render.table_lines(_report(fn)) if line.startswith(" ")] == [
        "└─ LINK_UP: eth1 is up (+ DEFAULT_ROUTE: -v)"
    ]


def test_a_warning_yields_to_a_blocking_reason() -> None:
    fn = _fn("0000:00:06.0", "BUSY", (_reason("LINK_UP", "eth1 is up", blocking=False), _reason("MOUNTED", "m")))
    assert [line.strip() for line in render.table_lines(_report(fn)) if line.startswith(" ")] == [
        "└─ MOUNTED: m (+ LINK_UP: -v)"
    ]


def test_only_a_problem_is_still_a_reason_line() -> None:
    """UNKNOWN because of a listed problem alone: its line says so, the problem stays listed below."""
    lines = render.table_lines(_report(_fn("0000:00:06.0", "UNKNOWN", (_unreadable(),)), problems=(PROBLEM,)))
    assert [line.strip() for line in lines if line.startswith("      ")] == [
        f"└─ UNREADABLE: {PROBLEM['object']}: {PROBLEM['detail']}"
    ]


def test_no_hotplug_driver_on_every_function_is_said_once() -> None:
    report = _report(
        _fn("0000:00:06.0", "BUSY", (_reason("MOUNTED", "m"), _no_hotplug("0000:00:06"))),
        _fn("0000:00:07.0", "BUSY", (_no_hotplug("0000:00:07"),)),
    )
    lines = render.table_lines(report)
    assert sum("NO_HOTPLUG_DRIVER" in line for line in lines) == 2  # the 07.0's only reason, and the summary
    assert lines[-1].startswith("NO_HOTPLUG_DRIVER on every function shown")
    assert next(line.strip() for line in lines if line.startswith(" ")) == "└─ MOUNTED: m"  # not "+ NO_HOTPLUG_DRIVER"
    assert not any(line.startswith("NO_HOTPLUG_DRIVER on every") for line in render.table_lines(report, verbose=True))


@pytest.mark.parametrize("colour", [False, True])
def test_colour_only_when_asked_and_only_on_the_state(colour: bool) -> None:
    fn = _fn("0000:00:06.0", "BUSY", (_reason("MOUNTED", "on /x\x1b[31m"),))
    text = "\n".join(render.table_lines(_report(fn), colour=colour))
    assert ("\x1b[31mBUSY\x1b[0m" in text) is colour
    assert text.count("\x1b") == (2 if colour else 0)  # the guest's ESC is escaped, ours are the only ones


def test_the_cli_folds_and_all_unfolds(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", "--root", str(THIS_VM)]) == cli.EXIT_OK
    folded = capsys.readouterr().out
    assert cli.main(["inspect", "--all", "--root", str(THIS_VM)]) == cli.EXIT_OK
    every = capsys.readouterr().out
    assert "host bridge" not in folded and "--all shows them" in folded
    assert "host bridge" in every and "--all shows them" not in every


def test_the_cli_shows_every_reason_with_v(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    for argv in (["inspect", "-v"], ["-v", "inspect"]):
        assert cli.main([*argv, "--root", str(THIS_VM)]) == cli.EXIT_OK
        assert "├─" in capsys.readouterr().out  # a reason that is not a function's last
    assert cli.main(["inspect", "--root", str(THIS_VM)]) == cli.EXIT_OK
    assert "├─" not in capsys.readouterr().out
