"""reportdata: the Report as plain data, and its JSON byte for byte as protobuf's json_format prints it.

`unplugd inspect --json` prints reportdata.to_json without importing protobuf; the agent serves
report.from_data of the same dict. Both must say the same thing on every tree we have, on this
venv's protobuf and on Debian 12's.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REPO
from unplugd.agent import cli, engine, reportdata
from unplugd.agent.report import from_data, to_json

TREES = sorted((FIXTURES / "scenarios").glob("*.tree")) + sorted((FIXTURES / "captured").rglob("*.tree"))


def _data(tree: Path) -> reportdata.Data:
    with cli.open_roots(str(tree)) as roots:
        return engine.inspect_data(roots, exclusive_probe=False)


@pytest.mark.parametrize("tree", TREES, ids=[t.name for t in TREES])
def test_json_equals_json_format_byte_for_byte(tree: Path) -> None:
    data = _data(tree)
    assert data["functions"], "a tree without functions proves nothing"
    assert reportdata.to_json(data) == to_json(from_data(data))
    assert reportdata.to_json(data, indent=None) == to_json(from_data(data), indent=None)  # not on a terminal


@pytest.mark.parametrize("tree", TREES, ids=[t.name for t in TREES])
def test_from_json_gives_back_the_data_the_json_was_printed_from(tree: Path) -> None:
    """The table of the agent's answer (entry.print_answer) renders what the local scan would."""
    data = _data(tree)
    assert reportdata.from_json(json.loads(reportdata.to_json(data, indent=None))) == data


@pytest.mark.parametrize("nanos", [0, 5_000_000, 123_456_000, 123_456_789])
def test_from_json_reads_every_timestamp_precision(nanos: int) -> None:
    data = {"generated_at": {"seconds": 1_796_222_937, "nanos": nanos}}
    assert reportdata.from_json(json.loads(reportdata.to_json(data))) == data


@pytest.mark.parametrize(
    ("nanos", "fraction"), [(0, ""), (5_000_000, ".005"), (123_456_000, ".123456"), (123_456_789, ".123456789")]
)
def test_timestamp_digits_follow_protobuf(nanos: int, fraction: str) -> None:
    data = _data(FIXTURES / "scenarios" / "bond.tree")
    data["generated_at"] = {"seconds": 86_400 * 365 + 61, "nanos": nanos}
    stamp = json.loads(reportdata.to_json(data))["generatedAt"]
    assert stamp == f"1971-01-01T00:01:01{fraction}Z"
    assert reportdata.to_json(data) == to_json(from_data(data))


def test_defaults_come_after_set_fields_and_int64_is_a_string() -> None:
    data = _data(FIXTURES / "scenarios" / "bond.tree")
    f = data["functions"][0]
    f["block_devices"] = [{"name": "vdz", "kind": "disk", "devno": "252:0", "size_bytes": 2**40, "parent": "",
                           "holders": [], "mount_points": []}]  # fmt: skip
    f["state"] = "FUNCTION_STATE_UNSPECIFIED"
    text = reportdata.to_json(data)
    first = json.loads(text)["functions"][0]
    assert first["blockDevices"][0]["sizeBytes"] == str(2**40)
    assert list(first)[-1] in {"isBridge", "state", "reasons", "netInterfaces", "deviceNodes", "hotplugSlot"}
    assert list(first).index("state") > list(first).index("address")
    assert text == to_json(from_data(data))


def test_a_field_the_proto_lacks_is_refused() -> None:
    data = _data(FIXTURES / "scenarios" / "bond.tree")
    data["functions"][0]["reasons"].append({"code": "REASON_CODE_NOT_A_CODE"})
    with pytest.raises(ValueError, match="NOT_A_CODE"):
        from_data(data)


def test_keep_functions_keeps_whole_slots_in_data() -> None:
    data = _data(FIXTURES / "scenarios" / "multifunction8.tree")
    slot = next(s for s in data["slots"] if len(s["functions"]) > 1)
    kept = reportdata.keep_functions(data, {slot["functions"][1]})
    assert [f["address"] for f in kept["functions"]] == [slot["functions"][1]]
    assert kept["slots"] == [slot]
    assert len(data["functions"]) > 1  # the original is left as it was


NO_PROTOBUF = r"""
import sys
from unplugd.agent.cli import main
code = main(["inspect", "--json", "--no-probe", "--root", sys.argv[1]])
print(sorted(m for m in sys.modules if m.startswith(("google", "grpc", "unplugd.v1"))), file=sys.stderr)
raise SystemExit(code)
"""


@pytest.mark.parametrize("python", [sys.executable, "/usr/bin/python3"])
def test_inspect_json_imports_no_protobuf_and_prints_what_the_agent_serves(python: str) -> None:
    if not Path(python).exists():
        pytest.skip(f"no {python}")
    tree = FIXTURES / "captured" / "this_vm.tree"
    out = subprocess.run(
        [python, "-c", NO_PROTOBUF, str(tree)],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / ".dev"), "PATH": "/usr/bin:/bin"},
    )
    assert out.stderr.strip().splitlines()[-1] == "[]"
    printed = json.loads(out.stdout)
    served = json.loads(to_json(from_data(_data(tree))))
    printed.pop("generatedAt")
    served.pop("generatedAt")
    assert printed == served


DEBIAN_SAME_BYTES = r"""
import json, sys
from unplugd.agent import cli, engine, reportdata
from unplugd.agent.report import from_data, to_json
bad = []
for tree in sys.argv[1:]:
    with cli.open_roots(tree) as roots:
        data = engine.inspect_data(roots, exclusive_probe=False)
    if reportdata.to_json(data) != to_json(from_data(data)):
        bad.append(tree)
print(json.dumps(bad))
"""


def test_json_equals_json_format_on_debian_protobuf() -> None:
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no Debian python3")
    out = subprocess.run(
        ["/usr/bin/python3", "-c", DEBIAN_SAME_BYTES, *map(str, TREES)],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / ".dev"), "PATH": "/usr/bin:/bin"},
    )
    assert json.loads(out.stdout) == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stdout", "lines"), [(io.StringIO, 1), (_Terminal, "many")])
def test_json_is_indented_on_a_terminal_only(
    monkeypatch: pytest.MonkeyPatch, stdout: type[io.StringIO], lines: int | str
) -> None:
    out = stdout()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["inspect", "--json", "--root", str(FIXTURES / "scenarios" / "bond.tree")]) == cli.EXIT_OK
    text = out.getvalue()
    count = len(text.splitlines())
    assert count == 1 if lines == 1 else count > 100
    assert json.loads(text)["functions"]
