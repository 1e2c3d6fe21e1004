"""`unplugd inspect`'s table: bridges and host/ISA bridge functions fold into one line unless --all."""

from __future__ import annotations

import io

import pytest

from tests.conftest import FIXTURES
from unplugd.agent import cli
from unplugd.v1 import report_pb2

THIS_VM = FIXTURES / "captured" / "this_vm.tree"  # its 00.0 is a host bridge (class 060000)


def _report() -> report_pb2.Report:
    r = report_pb2.Report(hostname="g")
    r.functions.add(address="0000:00:00.0", slot="0000:00:00", class_code="060000", class_name="host bridge")
    r.functions.add(address="0000:00:02.0", slot="0000:00:02", class_code="060400", is_bridge=True)
    disk = r.functions.add(address="0000:01:00.0", slot="0000:01:00", class_code="010000")
    disk.block_devices.add(name="vda")
    return r


@pytest.mark.parametrize(("show_all", "shown"), [(False, ["0000:01:00.0"]), (True, ["0000:00:00.0", "0000:00:02.0",
                                                                                      "0000:01:00.0"])])  # fmt: skip
def test_infrastructure_folds_unless_all(show_all: bool, shown: list[str]) -> None:
    out = io.StringIO()
    cli.render_table(_report(), out, show_all=show_all)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines[2:] if line.startswith("0000:")] == shown
    folded = [line for line in lines if line.startswith("+ ")]
    assert folded == ([] if show_all else [f"+ 2 {folded[0].split(' ', 2)[2]}"])


def test_the_cli_folds_and_all_unfolds(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", "--root", str(THIS_VM)]) == cli.EXIT_OK
    folded = capsys.readouterr().out
    assert cli.main(["inspect", "--all", "--root", str(THIS_VM)]) == cli.EXIT_OK
    every = capsys.readouterr().out
    assert "host bridge" not in folded and "--all shows them" in folded
    assert "host bridge" in every and "--all shows them" not in every
