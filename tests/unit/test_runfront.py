"""The front `make bench` and `make reliability` share: --only by name or number, --json's two outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests import runfront

PARTS = ["inspect", "tree", "procs"]


def parse(*argv: str) -> list[str]:
    parser = runfront.runner_parser("run.py", "doc", PARTS, "section", "  run.py")
    return runfront.selected(parser, parser.parse_args(list(argv)).only, PARTS, "section")


def test_only_takes_names_numbers_and_commas_in_the_lists_order() -> None:
    assert parse() == PARTS
    assert parse("--only", "procs", "--only", "1") == ["inspect", "procs"]
    assert parse("--only", "3,tree") == ["tree", "procs"]


@pytest.mark.parametrize("bad", ["nope", "0", "4"])
def test_unknown_part_is_a_usage_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse("--only", bad)
    assert exit_.value.code == 2
    assert f"unknown section {bad!r} (sections: 1 inspect, 2 tree, 3 procs)" in capsys.readouterr().err


def test_json_dash_takes_stdout_and_sends_tables_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert runfront.tables_to("-") is sys.stderr
    assert runfront.tables_to(str(tmp_path / "f.json")) is sys.stdout and runfront.tables_to(None) is sys.stdout
    runfront.write_json("-", {"a": 1})
    assert json.loads(capsys.readouterr().out) == {"a": 1}
    runfront.write_json(str(tmp_path / "f.json"), [{"b": Path("/x")}])
    assert json.loads((tmp_path / "f.json").read_text()) == [{"b": "/x"}]
