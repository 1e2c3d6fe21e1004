"""unplugctl's lazy parser (cli.main) says and parses exactly what the full one (manual page, completion) does,
building only the command it parses."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from unplugd.host import usage

COMMANDS = ("status", "check", "unplug", "wait-ready", "release", "slots", "plug")

ARGVS = [
    ["--help"],
    [],
    ["nosuch"],
    *([c, "--help"] for c in COMMANDS),
    *([c] for c in COMMANDS),
    ["status", "--qmp", "/q.sock", "--json", "--all"],
    ["status", "--bogus"],
    ["check", "web1", "vdb", "--jobs", "x"],
    ["unplug", "web1", "vdb", "--timeout", "5", "--with-companions", "--release"],
    ["wait-ready", "web1", "vdb"],
    ["release", "--qmp", "/q", "dev0", "--timeout", "9"],
    ["plug", "--qmp", "/q", "virtio-net-pci", "--netdev", "user,id=n", "--file", "slots.toml"],
    ["slots", "web1", "--agent-channel", "nope"],
]


def _outcome(p: argparse.ArgumentParser, argv: list[str]) -> tuple[object, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result: object = vars(p.parse_args(argv))
        except SystemExit as e:
            result = ("exit", e.code)
    return result, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv", ARGVS, ids=" ".join)
def test_lazy_parser_answers_as_the_full_one(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert _outcome(usage.parser(lazy=True), argv) == _outcome(usage.parser(), argv)


def test_top_help_lists_every_command_with_its_summary() -> None:
    result, out, _ = _outcome(usage.parser(lazy=True), ["--help"])
    assert result == ("exit", 0)
    for command in COMMANDS:
        assert f"\n    {command}" in out
    assert "every slot: hardware, guest state, verdict" in out


def _built(p: argparse.ArgumentParser) -> set[str]:
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return {name for name, q in sub.choices.items() if q._actions}


def test_lazy_parser_builds_the_chosen_command_only() -> None:
    p = usage.parser(lazy=True)
    assert _built(p) == set()
    p.parse_args(["unplug", "web1", "vdb"])
    assert _built(p) == {"unplug"}
    assert _built(usage.parser()) == set(COMMANDS)
