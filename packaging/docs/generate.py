#!/usr/bin/env python3
"""Manual pages and bash completions, generated from the argument parsers and the documented config.

    python3 packaging/docs/generate.py OUTDIR

writes
    OUTDIR/man/unplugd.8  OUTDIR/man/unplugctl.1  OUTDIR/man/unplugd.conf.5
    OUTDIR/bash-completion/unplugd  OUTDIR/bash-completion/unplugctl

Runs from a checkout with the system python3 and its standard library alone: the
.deb and the .rpm build call it where neither pip nor grpc/protobuf may exist.
The repository's directories are mapped into the `unplugd` package as
pyproject.toml's package-dir says (unplugd <- proto/unplugd, unplugd.agent <-
agent, ...), and importing grpc, protobuf or any other third-party module while
the parsers are built is an error: the parsers and exit codes stay cheap to
import (which also keeps `unplugd --help` fast).

Why not argparse-manpage or shtab (PyPI): both would be build dependencies that
Debian 12 and Fedora build roots would have to carry (neither is packaged in
Debian 12), for a few hundred lines over argparse's own parser objects. The
layout here is fixed by our parsers' shape (subcommands, shared options, epilog
paragraphs), and the exit codes and config keys come from our own modules, which
those tools do not know about.

What the pages are made of:
- NAME: `Tool.summary` below; SYNOPSIS, OPTIONS, COMMANDS: the parsers (options
  shared by every subcommand are listed once); DESCRIPTION: the parser's
  description and the prose paragraphs of its epilog; EXAMPLES: the epilogs'
  "examples:" paragraphs; EXIT STATUS: the CLI's exitcodes module (the same text
  `--help` prints, where it is dropped from the epilog here).
- unplugd.conf(5): packaging/config.toml, the documented default configuration
  (each key's comment and value), checked against unplugd.agent.config: every
  key the code knows is documented, the file parses to the code's defaults, and
  a key shown only as a comment has no default in the code.
- Completion: subcommands, options, choices; files for options whose type is
  Path or whose metavar names a file (FILE, DIR, SOCKET, PEM, PATH).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import textwrap
import time
import tomllib
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

# Third-party import roots the parsers, exit codes and config must not need.
_FORBIDDEN = ("grpc", "google", "psutil", "pyudev", "pyroute2", "qemu", "libvirt")

# Metavars that name a path: their values complete as file names.
_PATH_METAVARS = {"FILE", "DIR", "SOCKET", "PEM", "PATH"}


@dataclasses.dataclass(frozen=True)
class Tool:
    prog: str
    section: int
    parser: str  # "module:function" returning the argparse.ArgumentParser
    exitcodes: str  # module with Exit, MEANING, help_paragraph() (and optionally SCOPE)
    summary: str  # the NAME line
    see_also: tuple[str, ...]


TOOLS = (
    Tool(
        "unplugd",
        8,
        "unplugd.agent.cli:build_parser",
        "unplugd.agent.exitcodes",
        "guest agent: may each PCI device of this VM be hot-unplugged now, and if not, why",
        ("unplugctl(1)", "unplugd.conf(5)", "systemd.exec(5)"),
    ),
    Tool(
        "unplugctl",
        1,
        "unplugd.host.usage:parser",
        "unplugd.host.exitcodes",
        "check whether a VM's PCI device may be hot-unplugged, and unplug it safely",
        ("unplugd(8)", "unplugd.conf(5)", "virsh(1)", "qemu(1)"),
    ),
)
CONF_SUMMARY = "configuration file of the unplugd guest agent"
CONF_SEE_ALSO = ("unplugd(8)", "unplugctl(1)")
MANUALS = {1: "User Commands", 5: "File Formats", 8: "System Administration"}


# --------------------------------------------------------------------------- importing the checkout


class _ForbidHeavy(importlib.abc.MetaPathFinder):
    """Fail on any third-party import: the generator must run where only the stdlib exists."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] in _FORBIDDEN:
            raise ImportError(f"building the parsers imported {fullname}: they must need only the standard library")
        return None


def map_checkout(repo: Path = REPO) -> None:
    """Make `import unplugd...` load the checkout, mapped as pyproject.toml's package-dir says."""
    with (repo / "pyproject.toml").open("rb") as f:
        mapping: dict[str, str] = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    for name in sorted(mapping, key=lambda n: n.count(".")):  # parents before children
        where = repo / mapping[name]
        spec = importlib.util.spec_from_file_location(
            name, where / "__init__.py", submodule_search_locations=[str(where)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    if not any(isinstance(f, _ForbidHeavy) for f in sys.meta_path):
        sys.meta_path.insert(0, _ForbidHeavy())


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


# --------------------------------------------------------------------------- roff


def esc(text: str) -> str:
    """Text for a roff text line: backslashes, hyphens, control characters at line starts, non-ASCII."""
    out: list[str] = []
    for ch in text:
        if ch == "\\":
            out.append("\\e")
        elif ch == "-":
            out.append("\\-")
        elif ch == "\n" or " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(f"\\[u{ord(ch):04X}]")
    lines = "".join(out).split("\n")
    # A line starting with . or ' is a request; \& (a zero-width character) makes it text.
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in lines)


def arg(text: str) -> str:
    """A macro argument: escaped and quoted (a double quote inside one is written \\(dq)."""
    return '"' + esc(text).replace('"', "\\(dq") + '"'


def bold(text: str) -> str:
    return f"\\fB{esc(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{esc(text)}\\fR"


def prose(text: str) -> str:
    """A filled paragraph: the source's line breaks become spaces."""
    return esc(" ".join(text.split()))


def preformatted(text: str) -> list[str]:
    body = textwrap.dedent(text).strip("\n")
    return [".PP", ".nf", ".RS 4", esc(body), ".RE", ".fi"]


# --------------------------------------------------------------------------- reading the parsers


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _commands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand, in declaration order."""
    sub = _subparsers(parser)
    if sub is None:
        return []
    # _get_subactions() holds each subcommand's help=; argparse has no public accessor for it.
    helps = {a.dest: a.help or "" for a in sub._get_subactions()}
    return [(name, helps.get(name, ""), p) for name, p in sub.choices.items()]


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a for a in parser._actions if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)
    ]


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    if action.choices is not None:
        return "|".join(str(c) for c in action.choices)
    return action.dest.upper() if action.option_strings else action.dest


def _help(action: argparse.Action, prog: str) -> str:
    """The help text with %(default)s and friends expanded, as argparse does for --help."""
    text = action.help or ""
    params: dict[str, Any] = dict(vars(action), prog=prog)
    for name, value in list(params.items()):
        if value is argparse.SUPPRESS:
            del params[name]
        elif hasattr(value, "__name__"):
            params[name] = value.__name__
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return text % params


def _signature(action: argparse.Action) -> tuple[object, ...]:
    return (tuple(action.option_strings), action.dest, action.help, action.metavar, action.nargs, action.required)


def shared_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Options every subcommand takes alike (unplugctl's common ones): documented once."""
    commands = _commands(parser)
    if len(commands) < 2:
        return []
    first = [a for a in _visible(commands[0][2]) if a.option_strings and not isinstance(a, argparse._HelpAction)]
    rest = [{_signature(a) for a in _visible(p)} for _, _, p in commands[1:]]
    return [a for a in first if all(_signature(a) in sigs for sigs in rest)]


def is_path(action: argparse.Action) -> bool:
    if action.type is Path or isinstance(action.type, argparse.FileType):
        return True
    return bool(set(_metavar(action).split("|")) & _PATH_METAVARS)


def only_dirs(action: argparse.Action) -> bool:
    return set(_metavar(action).split("|")) == {"DIR"}


# --------------------------------------------------------------------------- epilogs


def _paragraphs(text: str | None) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text or "") if p.strip()]


def _is_examples(paragraph: str) -> bool:
    return paragraph.lstrip().lower().startswith("examples:")


def _is_layout(paragraph: str) -> bool:
    """Laid out by hand (indented lines, aligned columns): kept as it is, not filled."""
    lines = paragraph.strip("\n").splitlines()
    return any(line[:1].isspace() for line in lines[1:]) or any("  " in line.strip() for line in lines)


def _epilog_parts(epilog: str | None, drop: str) -> tuple[list[str], list[str]]:
    """(examples, other paragraphs) of an epilog, without the exit-code paragraph `drop`."""
    examples: list[str] = []
    other: list[str] = []
    for p in _paragraphs(epilog):
        if p.strip() == drop.strip():
            continue
        if _is_examples(p):
            _, _, body = p.strip("\n").partition("\n")  # the section or "Examples:" says what the header said
            examples.append(body)
        else:
            other.append(p)
    return examples, other


def _paragraph(p: str) -> list[str]:
    return preformatted(p) if _is_layout(p) else [".PP", prose(p)]


# --------------------------------------------------------------------------- manual pages for the CLIs


def _th(name: str, section: int) -> str:
    version = _load("unplugd").__version__
    # Reproducible: the date is the build's SOURCE_DATE_EPOCH (Debian and rpmbuild set it), or none.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    date = time.strftime("%Y-%m-%d", time.gmtime(int(epoch))) if epoch else ""
    # (a date's hyphens are hyphens: no \- here)
    return f'.TH {arg(name.upper())} {section} "{date}" {arg("unplugd " + version)} {arg(MANUALS[section])}'


_ELLIPSIS = "\\&.\\|.\\|."  # "..." that cannot start a request when it opens a line


def _option_usage(action: argparse.Action) -> list[str]:
    """An option or positional in a SYNOPSIS (.OP draws the brackets)."""
    repeat = isinstance(action, argparse._AppendAction)
    if action.option_strings:
        flag = max(action.option_strings, key=len)
        if action.required:
            text = bold(flag) + (" " + italic(_metavar(action)) if _takes_value(action) else "")
            return [text + (" " + _ELLIPSIS if repeat else "")]
        line = f".OP {arg(flag)}" + (f" {arg(_metavar(action))}" if _takes_value(action) else "")
        return [line] + ([_ELLIPSIS] if repeat else [])
    metavar = _metavar(action)
    name = italic(metavar)
    # A metavar of several words ("VM DEVICE") already spells out what the list holds.
    many = "" if " " in metavar else " " + _ELLIPSIS
    if action.nargs == "?":
        return [f"[{name}]"]
    if action.nargs == "*":
        return [f"[{name}{many}]"]
    if action.nargs == "+":
        return [f"{name}{many}"]
    return [name]


def _option_item(action: argparse.Action, prog: str) -> list[str]:
    flags = ", ".join(bold(s) for s in action.option_strings) if action.option_strings else italic(_metavar(action))
    if action.option_strings and _takes_value(action):
        flags += " " + italic(_metavar(action))
    text = _help(action, prog)
    if action.choices is not None and action.metavar is not None:
        text += f" (one of: {', '.join(str(c) for c in action.choices)})"
    if action.required and action.option_strings:
        text += " (required)"
    return [".TP", flags, prose(text) if text else "\\&"]


def _synopsis(tool: Tool, parser: argparse.ArgumentParser, shared: list[argparse.Action]) -> list[str]:
    top = [a for a in _visible(parser) if a.option_strings and not isinstance(a, argparse._HelpAction)]
    shared_sigs = {_signature(a) for a in shared}
    out = [".SH SYNOPSIS"]
    for name, _, sub in _commands(parser):
        out.append(f".SY {arg(tool.prog)}")
        for a in top:
            out += _option_usage(a)
        out.append(bold(name))
        if shared:
            out.append(f"[{italic('OPTIONS')}]")
        # Options before positionals, as argparse's usage line has them.
        own = [a for a in _visible(sub) if not isinstance(a, argparse._HelpAction) and _signature(a) not in shared_sigs]
        for a in sorted(own, key=lambda a: not a.option_strings):
            out += _option_usage(a)
        out.append(".YS")
    return out


def manpage(tool: Tool) -> str:
    parser: argparse.ArgumentParser = _load(tool.parser)()
    exits = _load(tool.exitcodes)
    drop: str = exits.help_paragraph()
    shared = shared_options(parser)
    shared_sigs = {_signature(a) for a in shared}
    examples, notes = _epilog_parts(parser.epilog, drop)

    out = [
        f'.\\" Generated by packaging/docs/generate.py from {tool.parser} and {tool.exitcodes}: do not edit.',
        _th(tool.prog, tool.section),
        ".SH NAME",
        f"{esc(tool.prog)} \\- {esc(tool.summary)}",
    ]
    out += _synopsis(tool, parser, shared)

    out.append(".SH DESCRIPTION")
    for p in _paragraphs(parser.description):
        out += _paragraph(p)
    for p in notes:
        out += _paragraph(p)

    top = [a for a in _visible(parser) if a.option_strings]
    out.append(".SH OPTIONS")
    if shared:
        out += [".PP", "Every command takes these options:"]
    for a in [*top, *shared]:
        out += _option_item(a, tool.prog)

    out.append(".SH COMMANDS")
    for name, helptext, sub in _commands(parser):
        out.append(f".SS {arg(tool.prog + ' ' + name)}")
        description = sub.description or helptext
        for p in _paragraphs(description):
            out += _paragraph(p[:1].upper() + p[1:])
        for a in _visible(sub):
            if _signature(a) in shared_sigs or isinstance(a, argparse._HelpAction):
                continue
            out += _option_item(a, f"{tool.prog} {name}")
        if sub.epilog and sub.epilog != parser.epilog:
            sub_examples, sub_notes = _epilog_parts(sub.epilog, drop)
            for p in sub_notes:
                out += _paragraph(p)
            for ex in sub_examples:
                out += [".PP", "Examples:", *preformatted(ex)]

    out.append(".SH EXIT STATUS")
    scope = getattr(exits, "SCOPE", None)
    if scope:
        out += [".PP", prose(f"Exit codes ({scope}):")]
    for code, meaning in exits.MEANING.items():
        out += [".TP", bold(str(int(code))), prose(meaning)]

    if examples:
        out.append(".SH EXAMPLES")
        for ex in examples:
            out += preformatted(ex)

    files = _files(tool)
    if files:
        out.append(".SH FILES")
        for path, what in files:
            out += [".TP", italic(path), prose(what)]
    out += [".SH SEE ALSO", _see_also(tool.see_also)]
    return "\n".join(out) + "\n"


def _see_also(pages: Iterable[str]) -> str:
    refs = []
    for page in pages:
        name, _, section = page.partition("(")
        refs.append(f"{bold(name)}({section}")
    return ",\n".join(refs)


def _files(tool: Tool) -> list[tuple[str, str]]:
    if tool.prog != "unplugd":
        return []
    config = _load("unplugd.agent.config")
    defaults = config.Config()
    return [
        (str(config.DEFAULT_PATH), "the configuration, read by unplugd serve; see unplugd.conf(5)"),
        (str(defaults.server.socket), "the gRPC service's unix socket (server.socket)"),
        (
            str(defaults.server.report_socket),
            "the running agent's report, beside server.socket: unplugd inspect asks it first and scans "
            "itself only when no agent answers (or with --local); UNPLUGD_REPORT_SOCKET names another",
        ),
        (
            f"/dev/virtio-ports/{defaults.transports.virtio_serial.name}",
            "the virtio-serial port the agent bridges when transports.virtio_serial is enabled",
        ),
    ]


# --------------------------------------------------------------------------- unplugd.conf(5)


@dataclasses.dataclass
class ConfKey:
    name: str
    literal: str  # the value as written in packaging/config.toml
    commented: bool  # shown only as a comment: the key has no default


@dataclasses.dataclass
class ConfGroup:
    comment: list[str]
    keys: list[ConfKey]


@dataclasses.dataclass
class ConfSection:
    name: str
    groups: list[ConfGroup]


def code_keys(cls: type[Any], prefix: str = "") -> dict[str, dict[str, tuple[Any, Any]]]:
    """{section: {key: (type, default)}} of unplugd.agent.config's dataclasses.

    A field with compare=False (Config.source) is bookkeeping, not a key in the file.
    """
    hints = typing.get_type_hints(cls)
    sections: dict[str, dict[str, tuple[Any, Any]]] = {}
    own: dict[str, tuple[Any, Any]] = {}
    defaults = cls()
    for f in dataclasses.fields(cls):
        if not f.compare:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            sections.update(code_keys(typing.cast(type[Any], hint), f"{prefix}{f.name}."))
        else:
            own[f.name] = (hint, getattr(defaults, f.name))
    if own:
        sections[prefix.rstrip(".")] = own
    return sections


def parse_documented_config(
    text: str, known: Mapping[str, Mapping[str, object]]
) -> tuple[list[str], list[ConfSection]]:
    """(header comment lines, sections) of packaging/config.toml, each key with the comment above it."""
    header: list[str] = []
    sections: list[ConfSection] = []
    pending: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        section = sections[-1] if sections else None
        if not line:
            continue
        if m := re.fullmatch(r"\[([\w.]+)\]", line):
            sections.append(ConfSection(m.group(1), []))
            pending = []
            continue
        if section is None:
            if line.startswith("#"):
                header.append(line[1:].strip())
            continue
        commented = re.fullmatch(r"#\s*(\w+)\s*=\s*(.+)", line)
        if commented and commented.group(1) in known.get(section.name, {}):
            key = ConfKey(commented.group(1), commented.group(2).strip(), commented=True)
        elif line.startswith("#"):
            pending.append(line[1:].strip())
            continue
        elif m := re.fullmatch(r"(\w+)\s*=\s*(.+)", line):
            key = ConfKey(m.group(1), m.group(2).strip(), commented=False)
        else:
            raise SystemExit(f"packaging/config.toml: cannot read line {raw!r}")
        if pending or not section.groups:
            section.groups.append(ConfGroup(pending, []))
            pending = []
        section.groups[-1].keys.append(key)
    return header, sections


def check_config_agrees(text: str, sections: list[ConfSection]) -> None:
    """packaging/config.toml and unplugd.agent.config must say the same; SystemExit names the key if not."""
    config = _load("unplugd.agent.config")
    known = code_keys(config.Config)
    documented = {(s.name, k.name): k for s in sections for g in s.groups for k in g.keys}
    for section, keys in known.items():
        for name, (_, default) in keys.items():
            key = documented.get((section, name))
            if key is None:
                raise SystemExit(f"packaging/config.toml does not document {section}.{name}")
            if key.commented and default is not None:
                raise SystemExit(f"packaging/config.toml: {section}.{name} has a default; state it, not a comment")
    for section, name in documented:
        if name not in known.get(section, {}):
            raise SystemExit(f"packaging/config.toml documents {section}.{name}, which unplugd.agent.config lacks")
    try:
        parsed = config.parse_config(tomllib.loads(text), source="packaging/config.toml")
    except config.ConfigError as exc:
        raise SystemExit(str(exc)) from exc
    if parsed != config.Config():
        raise SystemExit("packaging/config.toml states values that differ from unplugd.agent.config's defaults")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _type_name(inner)
    if typing.get_origin(hint) is tuple:
        return f"list of {_type_name(typing.get_args(hint)[0])}s"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def conf_manpage(config_toml: Path) -> str:
    config = _load("unplugd.agent.config")
    known = code_keys(config.Config)
    text = config_toml.read_text(encoding="utf-8")
    header, sections = parse_documented_config(text, known)
    check_config_agrees(text, sections)
    path = str(config.DEFAULT_PATH)
    out = [
        '.\\" Generated by packaging/docs/generate.py from packaging/config.toml '
        "and unplugd.agent.config: do not edit.",
        _th("unplugd.conf", 5),
        ".SH NAME",
        f"unplugd.conf \\- {esc(CONF_SUMMARY)}",
        ".SH SYNOPSIS",
        italic(path),
        ".SH DESCRIPTION",
    ]
    # The header's first line names the file (SYNOPSIS does); "#" alone separates paragraphs.
    body = "\n".join(header[1:] if header and header[0].startswith(path) else header)
    for p in _paragraphs(body):
        out += _paragraph(p)
    out += [".PP", prose("The file is TOML (https://toml.io). Each table and key is described below with its default.")]
    out.append(".SH KEYS")
    for section in sections:
        out.append(f".SS {arg('[' + section.name + ']')}")
        for group in section.groups:
            out.append(".PP")
            for i, key in enumerate(group.keys):
                hint, _ = known[section.name][key.name]
                kind = _type_name(hint)
                if key.commented:
                    line = f"{bold(key.name)} ({esc(kind)}; unset by default; for example {esc(key.literal)})"
                else:
                    line = f"{bold(key.name)} = {esc(key.literal)} ({esc(kind)})"
                out += ([".br"] if i else []) + [line]
            if group.comment:
                out += [".RS 4", prose(" ".join(group.comment)), ".RE"]
    out += [
        ".SH FILES",
        ".TP",
        italic(path),
        prose("read by unplugd serve at start (unplugd serve --config FILE names another)"),
        ".SH SEE ALSO",
        _see_also(CONF_SEE_ALSO),
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- bash completion


def _words(items: Iterable[str]) -> str:
    return " ".join(items)


def _sh_name(prog: str) -> str:
    return "_" + re.sub(r"\W", "_", prog)


def _offer(words: str) -> str:
    """Complete $cur from a list of words (one per line from compgen, so no word splitting of names)."""
    return f'mapfile -t COMPREPLY < <(compgen -W "{words}" -- "$cur")'


def _value_cases(actions: Iterable[argparse.Action], fn: str) -> list[str]:
    """`case $prev` arms: what follows an option that takes a value."""
    lines: list[str] = []
    for a in actions:
        if not a.option_strings or not _takes_value(a):
            continue
        pattern = "|".join(a.option_strings)
        if a.choices is not None:
            body = _offer(_words(str(c) for c in a.choices))
        elif is_path(a):
            body = f"{fn}_files {'-d' if only_dirs(a) else '-f'}"
        else:
            body = "COMPREPLY=()"  # free text (a name, a number): nothing to offer
        lines.append(f"            {pattern}) {body}; return ;;")
    return lines


def completion(tool: Tool) -> str:
    parser: argparse.ArgumentParser = _load(tool.parser)()
    fn = _sh_name(tool.prog)
    top = [a for a in _visible(parser) if a.option_strings]
    commands = _commands(parser)
    top_valued = [s for a in top if _takes_value(a) for s in a.option_strings]
    top_options = _words(s for a in top for s in a.option_strings)
    out = [
        f"# bash completion for {tool.prog}",
        f"# Generated by packaging/docs/generate.py from {tool.parser}: do not edit.",
        "# shellcheck shell=bash",
        "",
        f"{fn}_files() {{",
        "    # $1: -f files or -d directories. bash-completion's _filedir when loaded (quoting, ~); compgen if not.",
        "    if declare -F _filedir >/dev/null; then",
        "        if [[ $1 == -d ]]; then _filedir -d; else _filedir; fi",
        "        return",
        "    fi",
        "    compopt -o filenames 2>/dev/null",
        '    mapfile -t COMPREPLY < <(compgen "$1" -- "$cur")',
        "}",
        "",
        f"{fn}() {{",
        "    local cur prev words cword",
        "    if declare -F _init_completion >/dev/null; then",
        "        _init_completion || return",
        "    else",
        '        words=("${COMP_WORDS[@]}"); cword=$COMP_CWORD',
        "        cur=${COMP_WORDS[COMP_CWORD]}; prev=${COMP_WORDS[COMP_CWORD-1]}",
        "    fi",
        "    # The command is the first word that is neither an option nor an option's value.",
        '    local cmd="" i',
        "    for ((i = 1; i < cword; i++)); do",
        "        case ${words[i]} in",
    ]
    if top_valued:
        out.append(f"            {'|'.join(top_valued)}) ((i++)) ;;")
    out += [
        "            -*) ;;",
        "            *) cmd=${words[i]}; break ;;",
        "        esac",
        "    done",
        "    case $cmd in",
        '        "")',
        "            case $prev in",
        *_value_cases(top, fn),
        "            esac",
        f"            if [[ $cur == -* ]]; then {_offer(top_options)}",
        f"            else {_offer(_words(name for name, _, _ in commands))}; fi",
        "            return ;;",
    ]
    for name, _, sub in commands:
        actions = _visible(sub)
        options = _words(s for a in actions for s in a.option_strings)
        positional = [a for a in actions if not a.option_strings]
        files = [a for a in positional if is_path(a)]
        if files:
            rest = f"{fn}_files {'-d' if only_dirs(files[0]) else '-f'}"
        elif any(a.choices for a in positional):
            choices = _words(str(c) for a in positional for c in (a.choices or ()))
            rest = _offer(choices)
        else:
            rest = "COMPREPLY=()"  # a VM or device name: nothing this script can know
        out += [
            f"        {name})",
            "            case $prev in",
            *_value_cases(actions, fn),
            "            esac",
            f"            if [[ $cur == -* ]]; then {_offer(options)}; else {rest}; fi",
            "            return ;;",
        ]
    out += [
        "    esac",
        "}",
        f"complete -F {fn} {tool.prog}",
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- main


def outputs(repo: Path = REPO) -> Iterator[tuple[str, str]]:
    """(relative path, text) of every file generated."""
    for tool in TOOLS:
        yield f"man/{tool.prog}.{tool.section}", manpage(tool)
    yield "man/unplugd.conf.5", conf_manpage(repo / "packaging" / "config.toml")
    for tool in TOOLS:
        yield f"bash-completion/{tool.prog}", completion(tool)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("outdir", type=Path, help="where man/ and bash-completion/ are written")
    args = ap.parse_args(argv)
    map_checkout()
    for rel, text in outputs():
        dest: Path = args.outdir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
        print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
