"""`unplugctl --help` and a usage error load no more than argparse needs: start-up is part of every command."""

from __future__ import annotations

import pytest

from tests.probe import probe

# Each is several milliseconds of a ~40 ms --help (issue 13): the commands that need them import them.
NOT_FOR_HELP = (
    "asyncio",
    "grpc",
    "google.protobuf",
    "qemu",
    "libvirt",
    "unplugd.v1",
    "unplugd.host.planner",
    "unplugd.host.devicespec",
    "dataclasses",
    "typing",
    "pathlib",
    "tomllib",
    "json",
    "logging",  # ~25 M instructions with what it imports: main() imports it once the arguments parsed
    "shutil",  # argparse's width for every add_argument: usage._columns finds it without (bz2, lzma, zlib)
)

# The probe itself imports nothing beyond what the interpreter's start has loaded (its answer is a repr).
PROBE = """
import contextlib, io, sys
from unplugd.host.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    code = main(sys.argv[1:])
print(repr([code, sorted(sys.modules)]))
"""


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["unplug"]], ids=["help", "status-help", "usage"])
def test_help_and_usage_errors_import_nothing_heavy(argv: list[str]) -> None:
    code, modules = probe(PROBE, *argv)
    assert code == (2 if argv == ["unplug"] else 0)
    assert [m for m in modules if any(m == n or m.startswith(n + ".") for n in NOT_FOR_HELP)] == []


# main() of the process's own command line leaves its objects to reference counting at exit (cli.main).
FREEZE_PROBE = """
import contextlib, gc, io, sys
from unplugd.host.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    given = main(["unplug"])
    after_given = gc.get_freeze_count()
    sys.argv = ["unplugctl", "unplug"]
    own = main()
print(repr([given, after_given, own, gc.get_freeze_count() > 0]))
"""


def test_only_the_process_own_command_freezes_the_collector_for_its_exit() -> None:
    assert probe(FREEZE_PROBE) == [2, 0, 2, True]
