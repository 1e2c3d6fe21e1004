"""`unplugd` command line: help, table, JSON, exit codes scripts rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fixtures.build_scenarios import SCENARIOS
from unplugd.agent import cli, treetext

MF8 = str(SCENARIOS / "multifunction8.tree")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse and parser.exit
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_teaches_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "examples:" in out and "unplugd check" in out and "exit codes" in out
    for sub in ("inspect", "check", "capture", "serve"):
        code, out, _ = run(capsys, sub, "--help")
        assert code == 0 and "example" in out, sub
    _, out, _ = run(capsys, "serve", "--help")  # serve's codes are its own: no check verdicts
    assert "exits 0" in out and "exits 2" in out and "exits 1" in out


@pytest.mark.parametrize(
    ("device", "expected", "first_line"),
    [
        ("vdc", cli.EXIT_OK, "0000:00:05.1 (vdc): READY"),  # idle disk
        ("eth2", cli.EXIT_OK, "0000:00:05.3 (eth2): READY"),  # NIC down
        ("0000:00:05.5", cli.EXIT_OK, "0000:00:05.5 (-): READY"),  # no driver
        ("vdb1", cli.EXIT_BUSY, "0000:00:05.0 (vdb,vdb1): BUSY"),  # vdb1 mounted on /data
        ("0000:00/05.6", cli.EXIT_BUSY, "0000:00:05.6 (vdd,vdd1,vdd2): BUSY"),  # vdd2 is swap
        ("00:05.4", cli.EXIT_UNKNOWN, "0000:00:05.4 (-): UNKNOWN"),  # virtio_rng: a class not inspected
        ("nope", cli.EXIT_USAGE, None),
        ("../../etc/shadow", cli.EXIT_USAGE, None),
    ],
)
def test_check_exit_codes(
    device: str, expected: int, first_line: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "check", device, "--root", MF8)
    assert code == expected, (out, err)
    if first_line is None:
        assert "no PCI function" in err and out == ""
    else:
        lines = out.splitlines()
        assert lines[0] == first_line
        # a READY function has no reason to print; the others print theirs, one a line
        assert (len(lines) == 1) == first_line.endswith("READY"), out


def test_check_prints_the_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", "vde", "--root", MF8)
    assert code == cli.EXIT_BUSY
    assert out.splitlines() == ["0000:00:05.7 (vde): BUSY", "  OPEN_BY_PROCESS: pid 400 (dd) holds /dev/vde (fd 3)"]


def test_check_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", "vdb", "--json", "--root", MF8)
    assert code == cli.EXIT_BUSY
    assert [f["address"] for f in json.loads(out)["functions"]] == ["0000:00:05.0"]


def test_check_busy_wins_over_unknown_across_functions(capsys: pytest.CaptureFixture[str]) -> None:
    # md0 sits on two functions: both BUSY here
    code, _, _ = run(capsys, "check", "md0", "--root", str(SCENARIOS / "md_two_slots.tree"))
    assert code == cli.EXIT_BUSY


def test_inspect_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "inspect", "--root", MF8)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "guest (captured tree), kernel 6.1.0-25-amd64"
    assert lines[1].split() == ["SLOT", "FUNCTION", "PCI", "PATH", "DEVICE", "OBJECTS", "STATE"]
    row = next(line for line in lines if "0000:00:05.0" in line)
    assert row.startswith("0000:00:05") and row.split()[-2:] == ["vdb,vdb1", "BUSY"]
    sibling = next(line for line in lines if "0000:00:05.1" in line)
    assert sibling.startswith(" ")  # the slot is printed once per slot
    assert any(line.strip() == "└─ MOUNTED: vdb1 is mounted on /data (ext4)" for line in lines)


def test_inspect_device_filter(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "inspect", "--json", "--root", MF8, "--device", "eth1", "--device", "vdc")
    assert code == 0
    assert [f["address"] for f in json.loads(out)["functions"]] == ["0000:00:05.1", "0000:00:05.2"]


def test_inspect_on_a_captured_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    treetext.unpack(Path(MF8).read_text(), tmp_path)
    _, from_dir, _ = run(capsys, "inspect", "--root", str(tmp_path))
    _, from_file, _ = run(capsys, "inspect", "--root", MF8)
    assert from_dir == from_file


def test_missing_root_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "inspect", "--root", str(tmp_path / "nothing"))
    assert code == cli.EXIT_USAGE and "no such directory or file" in err


def test_a_root_that_is_neither_directory_nor_file_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "inspect", "--root", "/dev/null")  # it exists: "no such" was untrue
    assert code == cli.EXIT_USAGE and "--root /dev/null: not a directory or a regular file" in err


def test_a_malformed_text_archive_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "guest.tree"
    archive.write_bytes(b"# treetext 1\nfile sys/x\n\x1b[2J\n")
    code, _, err = run(capsys, "inspect", "--root", str(archive))
    assert code == cli.EXIT_FAILURE
    assert err.startswith(f"unplugd: --root {archive}: treetext line ") and "\x1b" not in err


def test_bad_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys)[0] == cli.EXIT_USAGE
    assert run(capsys, "check")[0] == cli.EXIT_USAGE
    assert run(capsys, "inspect", "--bogus")[0] == cli.EXIT_USAGE


def test_capture_refuses_a_non_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x").write_text("keep")
    code, _, err = run(capsys, "capture", str(tmp_path))
    assert code == cli.EXIT_USAGE and "not an empty directory" in err


def test_console_script_runs_on_debian_python3() -> None:
    """The guest package runs on Debian's python3 with python3-protobuf 3.21."""
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no Debian python3")
    out = subprocess.run(
        ["/usr/bin/python3", "-m", "unplugd.agent.cli", "inspect", "--json", "--root", MF8, "--device", "vdc"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / ".dev"), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    (f,) = json.loads(out.stdout)["functions"]
    assert f["state"] == "FUNCTION_STATE_READY" and f["reasons"] == []
    assert f["isBridge"] is False  # defaults printed with 3.21's option name too


def test_module_entry_point_matches_main() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "unplugd.agent.cli", "check", "vdb", "--root", MF8], capture_output=True, text=True
    )
    assert out.returncode == cli.EXIT_BUSY


@pytest.mark.parametrize(
    "start",
    [
        ["-m", "unplugd.agent.cli"],
        ["-c", "import sys; from unplugd.agent import entry; sys.exit(entry.main())"],  # the console script
    ],
)
def test_a_closed_stdout_keeps_the_exit_status(start: list[str]) -> None:
    """`unplugd check vdb >&-`: sys.stdout is None; the first write was an AttributeError traceback
    and exit 1 in place of check's 3."""
    argv = [sys.executable, *start, "check", "vdb", "--root", MF8]
    out = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *argv], capture_output=True, text=True, check=False)
    assert out.returncode == cli.EXIT_BUSY and out.stderr == ""
