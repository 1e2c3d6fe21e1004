"""Both command lines' help formatters wrap as argparse's own would, and parsing loads no shutil."""

from __future__ import annotations

import argparse

import pytest

from tests.probe import probe
from unplugd import helpformat


@pytest.mark.parametrize("columns", ["0", "45", "junk", "200"])
@pytest.mark.parametrize(
    ("ours", "argparses"),
    [
        (helpformat.HelpFormatter, argparse.HelpFormatter),
        (helpformat.RawDescriptionHelpFormatter, argparse.RawDescriptionHelpFormatter),
    ],
)
def test_the_width_is_found_as_shutil_finds_it(
    columns: str,
    ours: type[argparse.HelpFormatter],
    argparses: type[argparse.HelpFormatter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    monkeypatch.setenv("COLUMNS", columns)
    assert ours("unplugd")._width == argparses("unplugd")._width == shutil.get_terminal_size().columns - 2


def test_a_given_width_is_kept() -> None:
    assert helpformat.HelpFormatter("unplugd", width=33)._width == 33


# The agent's parser, built and used as `unplugd inspect --json` does.
PROBE = """
import sys
from unplugd.agent.cli import build_parser
build_parser().parse_args(["inspect", "--json"])
print(repr(sorted(sys.modules)))
"""


def test_the_agents_parser_loads_no_shutil() -> None:
    assert "shutil" not in probe(PROBE)
