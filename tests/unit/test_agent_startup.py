"""`unplugd inspect` and `check` load only what the scan needs: start-up is most of their time (issue 13).

And the logging they no longer import up front still says everything it did: a warning comes out in
the CLI's format, escaped, and names the line that logged it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.probe import probe
from unplugd.agent import lazylog, treetext


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A captured directory (`--root DIR`; a text archive would add its own unpacking's imports)."""
    base: Path = tmp_path_factory.mktemp("bond")
    treetext.unpack(treetext.read_archive(REPO / "tests" / "fixtures" / "scenarios" / "bond.tree"), base)
    return str(base)


# Each costs milliseconds of a start of ~50 (session 6, -X importtime): the model's records are
# NamedTuples (no dataclasses, whose import brings inspect, ast, dis and tokenize), and the scan's
# loggers import logging (with traceback, threading, weakref, string) only to log (agent/lazylog.py).
NOT_FOR_INSPECT = ("dataclasses", "inspect", "logging", "threading", "google.protobuf", "grpc", "unplugd.v1")

PROBE = """
import contextlib, io, sys
from unplugd.agent.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main(sys.argv[1:])
print(repr([int(code), len(out.getvalue()), sorted(sys.modules)]))
"""


@pytest.mark.parametrize(
    "argv", [["inspect", "--json"], ["inspect"], ["check", "bond0"]], ids=["inspect-json", "inspect-table", "check"]
)
def test_inspect_and_check_import_nothing_they_do_not_use(argv: list[str], tree: str) -> None:
    code, printed, modules = probe(PROBE, *argv, "--root", tree)
    assert code in (0, 3, 4)
    assert printed > 0
    assert [m for m in modules if any(m == n or m.startswith(n + ".") for n in NOT_FOR_INSPECT)] == []


def test_verbose_configures_logging_at_once(tree: str) -> None:
    code, _, modules = probe(PROBE, "-v", "inspect", "--json", "--root", tree)
    assert code == 0
    assert "logging" in modules


# A warning in a fresh interpreter: logging is imported by the warning itself, with the handler
# main() deferred; debug before it imported nothing.
WARN = """
import io, sys
from unplugd.agent import cli, lazylog
err = io.StringIO()
sys.stderr = err
lazylog.defer(lambda: cli._log_to_stderr(verbose=False))
log = lazylog.Logger("unplugd.agent.collectors.mounts")
log.debug("not shown %s", 1)
log.info("not shown either")
before = "logging" in sys.modules
log.warning("mountinfo of %s: bad line", "/mnt/\\x1b[31mred")
print(repr([before, "logging" in sys.modules, err.getvalue()]))
"""


def test_a_deferred_warning_comes_out_in_the_cli_format_escaped() -> None:
    before, after, err = probe(WARN)
    assert (before, after) == (False, True)
    assert err == "unplugd: WARNING unplugd.agent.collectors.mounts: mountinfo of /mnt/\\033[31mred: bad line\n"


def test_records_name_the_caller_not_the_lazy_logger(caplog: pytest.LogCaptureFixture) -> None:
    log = lazylog.Logger("unplugd.test")
    with caplog.at_level(logging.DEBUG, logger="unplugd.test"):
        log.debug("seen %d", 1)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    assert [(r.levelname, r.getMessage(), r.funcName, r.module) for r in caplog.records] == [
        ("DEBUG", "seen 1", "test_records_name_the_caller_not_the_lazy_logger", "test_agent_startup"),
        ("ERROR", "failed", "test_records_name_the_caller_not_the_lazy_logger", "test_agent_startup"),
    ]
    assert caplog.records[1].exc_info is not None
