"""Guest text is hostile bytes: carried as valid UTF-8 on the wire, escaped on a terminal, still judged.

The hostile_names scenario puts a newline, a tab, an ANSI sequence, a bidi
override and bytes that are not UTF-8 into a mount point, a swap file, a loop
backing file, a process name, an interface name and the hostname.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import build_scenarios
from tests.unit.rpc_fakes import running_server
from unplugd.agent import cli, render, treetext
from unplugd.agent.daemon.scans import ModuleEngine
from unplugd.text import display_text, unescape_octal, wire_text
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import report_pb2

TREE = build_scenarios.SCENARIOS / "hostile_names.tree"
EVIL = build_scenarios.EVIL
# What a terminal must never receive from the guest: C0/C1 controls, DEL, bidi and format characters.
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


# --------------------------------------------------------------------------- the one encoding


@pytest.mark.parametrize(
    ("text", "wire"),
    [
        ("/mnt/data", "/mnt/data"),
        ("/mnt/\udcff\udcfe", "/mnt/\\377\\376"),  # bytes that are not UTF-8
        ("a\\b", "a\\134b"),  # a literal backslash, so the escape stays reversible
        ("caf\u00e9\n\x1b", "caf\u00e9\n\x1b"),  # valid UTF-8, controls included, is data: carried as is
        ("\\\udce9", "\\134\\351"),
    ],
)
def test_wire_text(text: str, wire: str) -> None:
    assert wire_text(text) == wire
    wire.encode("utf-8")  # strict: what protobuf requires of a string field
    assert unescape_octal(wire) == text


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("vdb1 /mnt/data", "vdb1 /mnt/data"),
        ("a\nb\tc", "a\\012b\\011c"),
        ("\x1b[31mred", "\\033[31mred"),
        ("\x7f\x85", "\\177\\302\\205"),  # DEL and a C1 control (NEL)
        ("abc\u202etxt.exe", "abc\\342\\200\\256txt.exe"),  # right-to-left override
        ("\u2028", "\\342\\200\\250"),  # line separator
        ("\udcff", "\\377"),  # a surrogateescape shows as its byte
        ("caf\u00e9 \u6f22", "caf\u00e9 \u6f22"),  # printable non-ASCII stays readable
    ],
)
def test_display_text(text: str, shown: str) -> None:
    assert display_text(text) == shown


def test_build_report_serializes_hostile_names() -> None:
    """Without wire_text protobuf raises on the first surrogateescape (invalid UTF-8) it serializes."""
    from unplugd.agent import engine
    from unplugd.agent.roots import Roots

    with cli.open_roots(str(TREE)) as roots:
        assert isinstance(roots, Roots)
        report = engine.inspect(roots, ())
    data = report.SerializeToString()
    again = report_pb2.Report.FromString(data)
    mounted = [r.mount_point for f in again.functions for r in f.reasons if r.mount_point.startswith("/mnt/")]
    assert mounted == ["/mnt/" + wire_text(EVIL)]
    assert unescape_octal(mounted[0]) == "/mnt/" + EVIL


# --------------------------------------------------------------------------- through the command line


EXPECTED = {
    # the loop backed by a file on its filesystem holds it too (a HOLDER, named through the hostile path)
    "0000:00:06.0": ("BUSY", {"MOUNTED", "HOLDER"}),
    "0000:00:07.0": ("BUSY", {"OPEN_BY_PROCESS"}),
    "0000:00:08.0": ("BUSY", {"LINK_UP", "HAS_ADDRESS"}),
    "0000:00:09.0": ("BUSY", {"MOUNTED", "SWAP"}),
}


def test_inspect_json_is_valid_and_still_judges(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", "--json", "--root", str(TREE)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert not RAW_CONTROL.search(out.replace("\n", "")), "JSON carries controls as \\u escapes"
    report = json.loads(out)
    got = {
        f["address"]: (
            f["state"].removeprefix("FUNCTION_STATE_"),
            {r["code"].removeprefix("REASON_CODE_") for r in f["reasons"]},
        )
        for f in report["functions"]
    }
    assert {a: got[a] for a in EXPECTED} == EXPECTED
    assert report["problems"] == []
    held = next(f for f in report["functions"] if f["address"] == "0000:00:07.0")
    assert held["reasons"][0]["processes"][0]["command"] == wire_text("dd" + EVIL)
    nic = next(f for f in report["functions"] if f["address"] == "0000:00:08.0")
    assert nic["netInterfaces"][0]["name"] == "eth\x1b[31m\\377"


def test_inspect_table_escapes_every_guest_text(capsys: pytest.CaptureFixture[str]) -> None:
    # --all: every function's text; -v: every reason's
    assert cli.main(["inspect", "--all", "-v", "--root", str(TREE)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert not RAW_CONTROL.search(out)
    assert "\t" not in out
    assert "/mnt/\\012\\033[2J\\033[31m\\011\\342\\200\\256\\377\\376" in out
    # header, column titles, one line per function, one per reason: nothing else starts a line
    report = json.loads(_json(["inspect", "--json", "--root", str(TREE)], capsys))
    reasons = sum(len(f["reasons"]) for f in report["functions"])
    assert len(out.splitlines()) == 2 + len(report["functions"]) + reasons
    # without -v, a reason line at most per function: the count of lines cannot grow with a guest's names
    assert cli.main(["inspect", "--all", "--root", str(TREE)]) == cli.EXIT_OK
    short = capsys.readouterr().out
    assert not RAW_CONTROL.search(short)
    with_reasons = sum(1 for f in report["functions"] if f["reasons"])
    assert len(short.splitlines()) <= 2 + len(report["functions"]) + with_reasons + 1


def test_check_exits_busy_and_escapes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "--root", str(TREE), "vdb1"]) == cli.EXIT_BUSY
    out = capsys.readouterr().out
    assert not RAW_CONTROL.search(out)
    assert len(out.splitlines()) == 3  # the function and its two reasons (the mount, the loop on it)


def test_the_table_escapes_a_hand_made_report() -> None:
    """Any string field may come from the guest: hostname, names, details and problems too."""
    data = {
        "hostname": "h\x1b]0;pwned\x07",
        "kernel": "6\n1",
        "functions": [
            {
                "address": "0000:00:06.0",
                "slot": "0000:00:06",
                "device_name": "disk\u202e",
                "state": "FUNCTION_STATE_BUSY",
                "block_devices": [{"name": "vdb\n"}],
                "reasons": [{"code": "REASON_CODE_MOUNTED", "detail": "on /x\r\x1b[2K", "blocking": True}],
            }
        ],
        "problems": [{"object": "/proc/\x9b1m", "detail": "bad\x00"}],
    }
    for verbose in (False, True):
        text = "\n".join(render.table_lines(data, verbose=verbose))
        assert not RAW_CONTROL.search(text) and "\r" not in text
        assert len(text.splitlines()) == 7  # title, head, function, reason, blank, problems title, problem


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == cli.EXIT_OK
    return capsys.readouterr().out


# --------------------------------------------------------------------------- over gRPC


def test_get_report_and_watch_report_serve_hostile_names(tmp_path: Path) -> None:
    treetext.unpack(TREE.read_text(encoding="utf-8", errors="surrogateescape"), tmp_path / "tree")
    with running_server(tmp_path, ModuleEngine(exclusive_probe=False)) as (_, stub):
        report = stub.GetReport(pb.GetReportRequest(), timeout=30).report
        states = {f.address: f.state for f in report.functions}
        assert all(states[a] == report_pb2.FUNCTION_STATE_BUSY for a in EXPECTED)
        assert any(r.mount_point == "/mnt/" + wire_text(EVIL) for f in report.functions for r in f.reasons)
        stream: Any = stub.WatchReport(pb.WatchReportRequest(), timeout=30)  # grpc's stream type is untyped
        first = next(stream)
        assert first.initial and {f.address for f in first.report.functions} >= set(EXPECTED)
        stream.cancel()


def test_verbose_log_lines_escape_guest_names(tmp_path: Path) -> None:
    """A slot directory named with an ANSI sequence is logged (-v) escaped, like the table shows it."""
    import os
    import subprocess
    import sys

    root = tmp_path / "tree"
    treetext.unpack(TREE.read_text(encoding="utf-8", errors="surrogateescape"), root)
    slot = root / "sys/bus/pci/slots" / "evil\x1b[31m\udcff"
    slot.mkdir(parents=True)
    (slot / "address").write_text("not an address\n")
    out = subprocess.run(
        [sys.executable, "-m", "unplugd.agent.cli", "-v", "inspect", "--root", str(root)],
        capture_output=True,
        env=dict(os.environ, PYTHONIOENCODING="utf-8"),
        check=True,
    )
    assert b"\x1b" not in out.stderr and b"\xff" not in out.stderr
    assert b"evil\\033[31m\\377" in out.stderr
