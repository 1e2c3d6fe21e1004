"""packaging/docs/generate.py: manual pages that man renders with every command, option, exit code
and config key, and bash completions that complete; built by the system python3 with the stdlib alone."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import REPO
from unplugd.agent import cli as agent_cli
from unplugd.agent import config as agent_config
from unplugd.agent import exitcodes as agent_exits
from unplugd.host import exitcodes as host_exits
from unplugd.host import usage as host_usage

GENERATE = REPO / "packaging" / "docs" / "generate.py"
# The package builds run the generator with the distribution's python3, not the venv's.
SYSTEM_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")

CLIS: list[tuple[str, str, argparse.ArgumentParser, ModuleType]] = [
    ("unplugd", "unplugd.8", agent_cli.build_parser(), agent_exits),
    ("unplugctl", "unplugctl.1", host_usage.parser(), host_exits),
]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unplugd_docs_generate", GENERATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = _generator()


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("docs")
    # -I: no PYTHONPATH, no user site, no venv .pth: only what a package build root has.
    done = subprocess.run(
        [SYSTEM_PYTHON, "-I", str(GENERATE), str(dest)], capture_output=True, text=True, cwd="/", check=False
    )
    assert done.returncode == 0, done.stderr
    return dest


def render(page: Path) -> str:
    """What a reader sees: man -l at 100 columns, overstrikes removed, no hyphenation to split words."""
    assert shutil.which("man"), "man-db is a system dependency (packaging/dev/system-deps.sh)"
    env = {**os.environ, "MANWIDTH": "100", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    man = subprocess.run(
        ["man", "--warnings", "--no-hyphenation", "--no-justification", "-l", str(page)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    # groff's warnings (lintian runs the same check on packaged pages)
    assert man.stderr == "", man.stderr
    text = subprocess.run(["col", "-b"], input=man.stdout, capture_output=True, text=True, check=True).stdout
    return text.replace("\u2010", "-").replace("\u2212", "-")


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def visible_options(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        if action.help is not argparse.SUPPRESS:
            yield from action.option_strings


def section(text: str, title: str) -> str:
    """The text of one top-level section of a rendered page."""
    m = re.search(rf"^{re.escape(title)}\n(.*?)(?=^\S|\Z)", text, re.M | re.S)
    assert m, f"no {title} section"
    return m.group(1)


# --------------------------------------------------------------------------- manual pages


@pytest.mark.parametrize(("prog", "page", "parser", "exits"), CLIS, ids=[c[0] for c in CLIS])
def test_page_has_every_command_option_and_exit_code(
    out: Path, prog: str, page: str, parser: argparse.ArgumentParser, exits: ModuleType
) -> None:
    text = render(out / "man" / page)
    assert text.startswith(f"{prog.upper()}(")
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "EXIT STATUS", "SEE ALSO"):
        assert re.search(rf"^{heading}$", text, re.M), heading
    synopsis = section(text, "SYNOPSIS")
    for name, sub in commands(parser).items():
        assert re.search(rf"^\s+{prog} .*\b{re.escape(name)}\b", synopsis, re.M), name
        assert re.search(rf"^   {prog} {re.escape(name)}$", text, re.M), f"no COMMANDS entry for {name}"
        for option in visible_options(sub):
            assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", text, re.M), f"{name} {option}"
    for option in visible_options(parser):
        assert option in section(text, "OPTIONS"), option
    status = " ".join(section(text, "EXIT STATUS").split())
    for code in exits.Exit:
        assert f"{code.value} {' '.join(exits.MEANING[code].split())}" in status, code


def test_hidden_options_stay_hidden(out: Path) -> None:
    # serve --root serves a captured tree for tests (help=SUPPRESS): not for users' eyes.
    text = render(out / "man" / "unplugd.8")
    serve = text[text.index("\n   unplugd serve\n") : text.index("\nEXIT STATUS\n")]
    serve_synopsis = [line for line in section(text, "SYNOPSIS").splitlines() if " serve " in line]
    assert "--config" in serve and "--root" not in serve
    assert serve_synopsis and not any("--root" in line for line in serve_synopsis)


def test_exit_paragraph_of_help_is_not_repeated(out: Path) -> None:
    """--help prints the exit codes in its epilog; the page says them once, under EXIT STATUS."""
    for _, page, _, exits in CLIS:
        text = render(out / "man" / page)
        first_meaning = exits.MEANING[exits.Exit.FAILURE]
        assert " ".join(text.split()).count(" ".join(first_meaning.split())) == 1, page


def test_unplugd_files_come_from_the_config_module(out: Path) -> None:
    files = section(render(out / "man" / "unplugd.8"), "FILES")
    defaults = agent_config.Config()
    assert str(agent_config.DEFAULT_PATH) in files
    assert str(defaults.server.socket) in files
    assert defaults.transports.virtio_serial.name in files


def config_keys(cls: type[Any] = agent_config.Config, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """(table, key, default) of every setting, walked here independently of the generator."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name == "source":  # where the values came from, not a key
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix.rstrip("."), f.name, getattr(defaults, f.name)


def test_conf_page_documents_every_key(out: Path) -> None:
    text = render(out / "man" / "unplugd.conf.5")
    keys = section(text, "KEYS")
    tables = re.split(r"^   \[([\w.]+)\]$", keys, flags=re.M)
    by_table = dict(zip(tables[1::2], tables[2::2], strict=True))
    found = list(config_keys())
    assert len(found) >= 20  # the walk really reached the nested tables
    for table, key, default in found:
        assert table in by_table, table
        body = by_table[table]
        assert re.search(rf"^\s+{key}\b", body, re.M), f"{table}.{key}"
        if isinstance(default, bool):
            assert re.search(rf"^\s+{key} = {str(default).lower()} ", body, re.M), f"{table}.{key}"
        elif isinstance(default, int | float):
            assert re.search(rf"^\s+{key} = \S+ ", body, re.M), f"{table}.{key}"
        elif default is None:
            assert re.search(rf"^\s+{key} \(path; unset by default", body, re.M), f"{table}.{key}"
    # the comment above a key in packaging/config.toml is its description
    assert "only root may bind" in text or "can only be bound by root" in text
    assert "mutual TLS" in by_table["transports.tcp"]


def test_pages_are_reproducible(out: Path, tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "SOURCE_DATE_EPOCH": "1700000000"}
    for dest in (tmp_path / "a", tmp_path / "b"):
        subprocess.run([SYSTEM_PYTHON, "-I", str(GENERATE), str(dest)], env=env, check=True, capture_output=True)
    for page in ("unplugd.8", "unplugctl.1", "unplugd.conf.5"):
        a, b = (tmp_path / d / "man" / page for d in "ab")
        assert a.read_bytes() == b.read_bytes()
        assert '"2023-11-14"' in a.read_text()


# --------------------------------------------------------------------------- the generator's rules


def test_third_party_imports_are_refused() -> None:
    """The pages are built where grpc/protobuf may be absent: importing them is an error, not luck."""
    code = (
        "import runpy, sys; g = runpy.run_path(sys.argv[1]); g['map_checkout']()\n"
        "import unplugd.agent.cli, unplugd.host.usage\n"
        "try:\n    import unplugd.v1.report_pb2\nexcept ImportError as e:\n    print('refused:', e)\n"
    )
    done = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", code, str(GENERATE)], capture_output=True, text=True, cwd="/", check=True
    )
    assert "refused: building the parsers imported google" in done.stdout


@pytest.mark.parametrize(
    ("text", "roff"),
    [
        (".starts with a dot", "\\&.starts with a dot"),
        ("'starts with a quote", "\\&'starts with a quote"),
        ("a\\b", "a\\eb"),
        ("hot-unplug --force", "hot\\-unplug \\-\\-force"),
        ("└─ busy", "\\[u2514]\\[u2500] busy"),
        ("two\n.lines", "two\n\\&.lines"),
    ],
)
def test_roff_escaping(text: str, roff: str) -> None:
    assert gen.esc(text) == roff


def test_macro_arguments_are_quoted() -> None:
    assert gen.arg('say "hi"') == '"say \\(dqhi\\(dq"'


def test_config_and_code_must_agree() -> None:
    text = (REPO / "packaging" / "config.toml").read_text()
    known = gen.code_keys(agent_config.Config)

    def check(edited: str) -> None:
        _, sections = gen.parse_documented_config(edited, known)
        gen.check_config_agrees(edited, sections)

    check(text)  # the shipped file agrees
    with pytest.raises(SystemExit, match=r"does not document server\.max_watchers"):
        check(text.replace("max_watchers = 8\n", ""))
    with pytest.raises(SystemExit, match=r"differ from unplugd\.agent\.config's defaults"):
        check(text.replace("max_workers = 16", "max_workers = 17"))
    with pytest.raises(SystemExit, match=r"documents server\.max_worker, which unplugd\.agent\.config lacks"):
        check(text.replace("max_workers = 16", "max_workers = 16\nmax_worker = 16"))
    with pytest.raises(SystemExit, match=r"mutations\.enabled has a default"):
        check(text.replace("enabled = false\n# Lease", "# enabled = false\n# Lease"))


def test_comment_belongs_to_the_keys_below_it() -> None:
    known = gen.code_keys(agent_config.Config)
    _, sections = gen.parse_documented_config(
        '# head\n[server]\n# workers\nmax_workers = 1\nmax_watchers = 0\n# the socket\nsocket = "/x"\n', known
    )
    (server,) = sections
    assert [(g.comment, [k.name for k in g.keys]) for g in server.groups] == [
        (["workers"], ["max_workers", "max_watchers"]),
        (["the socket"], ["socket"]),
    ]


# --------------------------------------------------------------------------- bash completion


def complete(out: Path, prog: str, *words: str, bash_completion: bool = False, cwd: Path | None = None) -> list[str]:
    """COMPREPLY for the command line `words` (the last one being completed), as bash computes it."""
    script = out / "bash-completion" / prog
    load = f"source {BASH_COMPLETION}; " if bash_completion else ""
    argv = " ".join(f"'{w}'" for w in (prog, *words))
    snippet = (
        f"{load}source {script}; complete -p {prog} >&2; "
        f'COMP_WORDS=({argv}); COMP_CWORD={len(words)}; COMP_LINE="${{COMP_WORDS[*]}}"; COMP_POINT=${{#COMP_LINE}}; '
        f"_{prog}; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    done = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, cwd=cwd, check=True)
    assert done.stderr.strip() == f"complete -F _{prog} {prog}"
    return [line for line in done.stdout.splitlines() if line]


LOADERS = [False, True] if BASH_COMPLETION.exists() else [False]


@pytest.mark.parametrize("bash_completion", LOADERS, ids=lambda b: "bash-completion" if b else "plain")
def test_completion_offers_commands_options_choices(out: Path, bash_completion: bool) -> None:
    assert complete(out, "unplugctl", "st", bash_completion=bash_completion) == ["status"]
    assert complete(out, "unplugctl", "", bash_completion=bash_completion) == list(commands(host_usage.parser()))
    assert "--with-companions" in complete(out, "unplugctl", "unplug", "--w", bash_completion=bash_completion)
    assert "--with-companions" not in complete(out, "unplugctl", "check", "--w", bash_completion=bash_completion)
    # a top-level option before the command does not hide it
    assert complete(out, "unplugd", "-v", "check", "--j", bash_completion=bash_completion) == ["--json"]
    assert complete(out, "unplugd", "serve", "--log-format", "", bash_completion=bash_completion) == [
        "journal",
        "text",
    ]


@pytest.mark.parametrize("bash_completion", LOADERS, ids=lambda b: "bash-completion" if b else "plain")
def test_completion_offers_files_where_an_option_takes_a_path(out: Path, tmp_path: Path, bash_completion: bool) -> None:
    (tmp_path / "agent config.toml").write_text("")
    (tmp_path / "agent-dir").mkdir()
    got = complete(out, "unplugd", "serve", "--config", "age", bash_completion=bash_completion, cwd=tmp_path)
    assert sorted(got) == ["agent config.toml", "agent-dir"]  # one name per entry, spaces and all
    # capture DIR: directories only
    assert complete(out, "unplugd", "capture", "age", bash_completion=bash_completion, cwd=tmp_path) == ["agent-dir"]
    assert "agent-dir" in complete(
        out, "unplugctl", "status", "--tls-ca", "a", bash_completion=bash_completion, cwd=tmp_path
    )
    # a VM name is not a file
    assert complete(out, "unplugctl", "status", "age", bash_completion=bash_completion, cwd=tmp_path) == []


def test_completion_scripts_pass_shellcheck(out: Path) -> None:
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed")
    for prog in ("unplugd", "unplugctl"):
        done = subprocess.run(
            ["shellcheck", "-s", "bash", str(out / "bash-completion" / prog)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout


def test_whatis_entries_parse(out: Path) -> None:
    """apropos/whatis (and lintian's bad-whatis-entry check) read NAME with lexgrog."""
    pages = {"unplugd.8": "unplugd", "unplugctl.1": "unplugctl", "unplugd.conf.5": "unplugd.conf"}
    for page, name in pages.items():
        done = subprocess.run(["lexgrog", str(out / "man" / page)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f': "{name} - ' in done.stdout
