"""unplugctl's command line as data: the parser and the text of `--help`.

Stdlib only, apart from the exit codes: `unplugctl --help` and
packaging/docs/generate.py (the manual page and the bash completion, built
where grpc and protobuf may be absent) import this module and nothing heavy.
host/cli.py runs what it parses.
"""

from __future__ import annotations

import argparse
import functools

from unplugd.helpformat import RawDescriptionHelpFormatter
from unplugd.host.exitcodes import help_paragraph

TYPE_CHECKING = False  # not typing's: `--help` imports no more than it needs (see cli.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

__all__ = ["DEFAULT_JOBS", "EPILOG", "command_parser", "parser"]

# Fleet commands: domains asked at once. Each holds a libvirt call in a thread and an agent session
# (under a remote URI a virStream with a thread each way), so the bound caps threads. 16 overlaps 16
# round trips to remote hypervisors; on loopback (tests/bench/sec_fleet.py) 16 and 64 measure alike.
DEFAULT_JOBS = 16


def _path(text: str) -> Path:
    """argparse's type for file arguments: pathlib is imported when one is given, not for `--help`."""
    from pathlib import Path

    return Path(text)


# The longest timeout taken (~31 years): a wait is for ever before then, and grpc's deadlines are
# int64 nanoseconds since the epoch, which overflow ~7e9 s from now (WatchReport then failed at once:
# a reachable agent reported GUEST_UNREACHABLE).
MAX_SECONDS = 1e9


def _seconds(text: str, *, zero: bool) -> float:
    """argparse's type for a time in seconds: a finite number up to MAX_SECONDS, not negative
    (nan, inf and -1 parsed as floats and then meant nothing or "no time at all")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    low_ok = value >= 0 if zero else value > 0
    if not (low_ok and value <= MAX_SECONDS):  # False for nan too
        least = "at least 0" if zero else "more than 0"
        raise argparse.ArgumentTypeError(f"seconds must be {least} and at most {MAX_SECONDS:g}, not {text!r}")
    return value


def _wait_seconds(text: str) -> float:
    """--timeout: 0 is a valid wait (look once, do not wait)."""
    return _seconds(text, zero=True)


def _call_seconds(text: str) -> float:
    """A timeout for each call or domain: 0 would fail every call before it is sent."""
    return _seconds(text, zero=False)


EPILOG = """\
VM is a libvirt domain name (--connect URI, default qemu:///system; the agent is
found through the domain's <channel> named org.unplugd.agent.0), or a QEMU
process given as --qmp SOCKET with --agent ADDRESS (then VM may be omitted).

DEVICE is a libvirt alias or target (virtio-disk1, vdb, net1), a QEMU id or QOM
path, a guest PCI address (0000:01:00.0, the guest's numbering) or a PCI path
(0000:00/02.0/00.0 for a function, 0000:00/02.0/00 for the whole slot).

Remote URIs (qemu+ssh://, qemu+tls://, qemu+tcp://): the agent is reached through
libvirt itself (virDomainOpenChannel over the same connection), nothing to open on
the hypervisor. Several DOMAINs, --all-domains or several --connect URIs make
status and check fleet commands: every domain asked, --jobs at a time, one line
(--json: one JSON object) per domain, progress on stderr when it is a terminal.

Agent addresses: unix:/path  vsock:CID:PORT  hvsock:/vmm.sock:PORT
serial:/chardev.sock  tcp:HOST:PORT (mutual TLS).

{exit_codes}

examples:
  unplugctl status web1
  unplugctl check web1 vdb; echo $?
  unplugctl unplug web1 vdb --prepare --timeout 60
  unplugctl unplug web1 0000:00/02.1/00 --with-companions --json
  unplugctl wait-ready web1 net1 --timeout 300 && unplugctl unplug web1 net1
  unplugctl unplug web1 vdb --release --timeout 120
  unplugctl status --qmp /run/vm.qmp --agent vsock:42:1000
  unplugctl status web1 --connect qemu+ssh://root@hv1/system
  unplugctl status -c qemu+ssh://hv1/system -c qemu+ssh://hv2/system --all-domains --json
  unplugctl status -c qemu+ssh://hv1/system --all-domains --unpluggable 'model=hostdev*'
  unplugctl check -c qemu+ssh://hv1/system web1 web2 web3 net1

Multifunction slots under libvirt: libvirt refuses to detach a device that shares
a slot. With --with-companions unplugctl issues device_del on function 0 through
libvirt's QEMU monitor passthrough instead; libvirt then marks the domain
"tainted" (custom-monitor) for the rest of its life. QEMU removes the whole slot.
""".replace("{exit_codes}", help_paragraph())


class _Commands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Subcommands whose parsers are built when chosen: `unplugctl --help` lists every command from
    its one-line help, and a command builds its own parser only (~100 add_argument calls in all).
    add_command registers a name, its help and its builder; parse_args builds the chosen one,
    build_all every one (the manual page and the completion read them all)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._builders: dict[str, Callable[[], argparse.ArgumentParser]] = {}
        # what `choices` holds for a command not built yet: parse_args never meets it (__call__ builds first)
        self._unbuilt = argparse.ArgumentParser(prog=f"{self._prog_prefix} (not built)", add_help=False)

    def add_command(
        self,
        name: str,
        help: str,
        build: Callable[[argparse.ArgumentParser], None],
        *,
        common: Callable[[], argparse.ArgumentParser],
        epilog: str,
    ) -> None:
        def made() -> argparse.ArgumentParser:
            # what add_parser(name, parents=[common], ...) makes; its help line is the pseudo-action below
            p = argparse.ArgumentParser(
                prog=f"{self._prog_prefix} {name}",
                parents=[common()],
                epilog=epilog,
                formatter_class=RawDescriptionHelpFormatter,
            )
            build(p)
            return p

        self._choices_actions.append(self._ChoicesPseudoAction(name, (), help))
        self._builders[name] = made
        self._name_parser_map[name] = self._unbuilt

    def build(self, name: str) -> argparse.ArgumentParser:
        made = self._builders.pop(name, None)
        if made is not None:
            self._name_parser_map[name] = made()
        built: argparse.ArgumentParser = self._name_parser_map[name]
        return built

    def build_all(self) -> None:
        for name in list(self._builders):
            self.build(name)

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: Any = None
    ) -> None:
        if values and values[0] in self._builders:
            self.build(values[0])
        super().__call__(parser, namespace, values, option_string)


def parser(*, lazy: bool = False) -> argparse.ArgumentParser:
    """unplugctl's parser. lazy: each command's own parser is built when the command is parsed
    (cli.main: start-up); otherwise all at once, so that `choices` holds every command's parser."""
    p = argparse.ArgumentParser(
        prog="unplugctl",
        description="Is it safe to hot-unplug this PCI device from the VM right now? And then do it.",
        epilog=EPILOG,
        formatter_class=RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", action=_Commands)
    assert isinstance(sub, _Commands)
    common = functools.cache(_common)  # once a parser, for the commands built
    for name, helptext, build, epilog in (
        ("status", "every slot: hardware, guest state, verdict", _status, EPILOG),
        ("check", "verdict for one device (exit code says it)", _check, EPILOG),
        ("unplug", "unplug a device's slot, safely", _unplug, EPILOG),
        ("wait-ready", "wait until the guest releases a device", _wait_ready, EPILOG),
        (
            "release",
            "ask the guest to release a device (its release hooks), then wait until it is ready",
            _release,
            EPILOG,
        ),
        ("slots", "where a device can be hot-added: every bus, its free and taken slots", _slots, EPILOG),
        ("plug", "hot-add devices (a whole multifunction slot), confirmed by the guest", _plug, PLUG_EPILOG),
    ):
        sub.add_command(name, helptext, build, common=common, epilog=epilog)
    if not lazy:
        sub.build_all()
    return p


def command_parser(p: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of command `name`: a usage error found after parsing (cli._split_target) shows its
    usage line, not the top level's `unplugctl [-h] COMMAND ...`."""
    for action in p._actions:
        if isinstance(action, _Commands):
            return action.build(name)
    return p


def _common() -> argparse.ArgumentParser:
    """The options every command takes."""
    common = argparse.ArgumentParser(add_help=False, formatter_class=RawDescriptionHelpFormatter)
    common.add_argument(
        "--connect",
        "-c",
        action="append",
        metavar="URI",
        help="libvirt URI, local or remote (qemu+ssh://host/system); repeat for a fleet (default qemu:///system)",
    )
    common.add_argument("--qmp", metavar="SOCKET", help="talk to QEMU's QMP socket instead of libvirt")
    common.add_argument("--agent", metavar="ADDRESS", help="the guest agent (default under libvirt: its <channel>)")
    common.add_argument(
        "--agent-channel",
        choices=("auto", "socket", "libvirt"),
        default="auto",
        help="reach the <channel> by its socket path or through libvirt (virDomainOpenChannel); "
        "auto: the path on a local URI, libvirt on a remote one (default %(default)s)",
    )
    common.add_argument(
        "--force-channel", action="store_true", help="take the agent's channel from another libvirt client holding it"
    )
    common.add_argument("--tls-ca", type=_path, metavar="PEM", help="tcp: agents: CA that signed the agent's cert")
    common.add_argument("--tls-cert", type=_path, metavar="PEM", help="tcp: agents: our client certificate")
    common.add_argument("--tls-key", type=_path, metavar="PEM", help="tcp: agents: our client key")
    common.add_argument(
        "--agent-timeout",
        type=_call_seconds,
        default=5.0,
        metavar="S",
        help="seconds for each agent call (default %(default)s)",
    )
    common.add_argument(
        "--hypervisor-timeout",
        type=_call_seconds,
        default=10.0,
        metavar="S",
        help="seconds for each libvirt or QMP command (default %(default)s)",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    common.add_argument("--verbose", "-v", action="store_true", help="log progress to stderr; status: every reason")
    return common


def _status(st: argparse.ArgumentParser) -> None:
    st.add_argument("target", nargs="*", metavar="VM", help="VM (omit with --qmp); several: a fleet")
    st.add_argument(
        "--unpluggable",
        metavar="KEY=GLOB",
        help="fleet: only domains with a device matching alias|target|model|path=GLOB[,...] that is UNPLUGGABLE now",
    )
    st.add_argument("--all", action="store_true", help="also the infrastructure (root ports, bridges, chipset)")
    _fleet(st)


def _one_device(c: argparse.ArgumentParser) -> None:
    c.add_argument("target", nargs="+", metavar="VM DEVICE", help="VM (omit with --qmp) and DEVICE")


def _check(c: argparse.ArgumentParser) -> None:
    _one_device(c)
    _fleet(c)


def _unplug(c: argparse.ArgumentParser) -> None:
    _one_device(c)
    c.add_argument("--with-companions", action="store_true", help="also unplug the slot's other functions")
    c.add_argument("--prepare", action="store_true", help="lease the guest's block devices first")
    c.add_argument("--timeout", type=_wait_seconds, default=30.0, metavar="S", help="wait this long for removal")
    c.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    c.add_argument("--force", action="store_true", help="override the verdict (says what it overrides)")
    c.add_argument(
        "--release",
        action="store_true",
        help="first ask the guest to release the slot (its release hooks); unplug, with a lease, "
        "only if every function is then ready (--timeout bounds each half)",
    )


def _wait_ready(c: argparse.ArgumentParser) -> None:
    _one_device(c)
    c.add_argument("--timeout", type=_wait_seconds, required=True, metavar="S", help="give up after this many seconds")


def _release(c: argparse.ArgumentParser) -> None:
    _one_device(c)
    c.add_argument(
        "--timeout",
        type=_wait_seconds,
        default=60.0,
        metavar="S",
        help="seconds the guest may take, hooks and the wait (default %(default)s)",
    )


def _fleet(c: argparse.ArgumentParser) -> None:
    fleet = c.add_argument_group("fleet (several domains or --connect URIs)")
    fleet.add_argument("--all-domains", action="store_true", help="every running domain of each --connect URI")
    fleet.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=DEFAULT_JOBS,
        metavar="N",
        help="domains asked at once (default %(default)s)",
    )
    fleet.add_argument(
        "--domain-timeout",
        type=_call_seconds,
        default=60.0,
        metavar="S",
        help="give up on one domain after S seconds (default %(default)s)",
    )


PLUG_EPILOG = """\
DEVICE-SPEC is QEMU's -device syntax (virtio-net-pci,netdev=hn1,mac=52:54:00:00:00:01),
without bus=, addr= or multifunction=: unplugctl places the functions. Several specs fill
one slot as functions 0, 1, ... in the order given; they are added 1..7 first and function 0
last with multifunction=on (the guest hears of a slot when function 0 arrives). A free slot
is chosen unless --slot BUS:SLOT (br0:0x3, pci.0:7, rp1, or a slot path 0000:00/05.0/03).
With --qmp give no VM: every argument is a spec. --netdev and --blockdev create backends
first (QEMU's -netdev syntax; -blockdev as KEY=VALUE strings with dotted nesting, or JSON for
typed values). --file reads several slots from a JSON or TOML spec file ([[slots]] devices,
netdevs, blockdevs, slot).

unplugctl waits until the guest agent reports every new function at its PCI path with a
driver bound and its objects (an interface, a block device): PRESENT, else NO_DRIVER or
MISSING. If any is not PRESENT by --timeout, or the hypervisor rejects a spec halfway, what
was added is removed again (device_del, backends deleted) unless --keep-partial.

Under libvirt a DEVICE-SPEC is libvirt device XML (inline, or @FILE), attached live (and to
the config with --persistent); one function a slot: libvirt cannot hot-add a multifunction
slot, which unplugctl refuses and says to use --qmp for.

{exit_codes}

examples:
  unplugctl slots --qmp /run/vm.qmp --agent serial:/run/vm-agent.sock
  unplugctl plug --qmp /run/vm.qmp --agent serial:/run/vm-agent.sock --slot br0:0x3 \\
      --netdev user,id=hn1,restrict=on virtio-net-pci,netdev=hn1
  unplugctl plug --qmp /run/vm.qmp --agent unix:/run/a.sock --dry-run --netdev user,id=hn1 virtio-net-pci,netdev=hn1
  unplugctl plug web1 @nic.xml --persistent
""".replace("{exit_codes}", help_paragraph())


def _slots(sl: argparse.ArgumentParser) -> None:
    sl.add_argument("target", nargs="*", metavar="VM", help="VM (omit with --qmp)")


def _plug(pl: argparse.ArgumentParser) -> None:
    pl.add_argument("target", nargs="*", metavar="VM DEVICE-SPEC", help="VM (omit with --qmp), then device specs")
    pl.add_argument("--slot", metavar="BUS:SLOT", help="where (default: a free hotpluggable slot)")
    pl.add_argument("--netdev", action="append", default=[], metavar="SPEC", help="create this -netdev first")
    pl.add_argument("--blockdev", action="append", default=[], metavar="SPEC", help="create this -blockdev first")
    pl.add_argument("--file", type=_path, metavar="SPECFILE", help="slots to fill, from a JSON or TOML file")
    pl.add_argument("--timeout", type=_wait_seconds, default=60.0, metavar="S", help="wait this long for the guest")
    pl.add_argument("--keep-partial", action="store_true", help="on failure keep what was added")
    pl.add_argument("--persistent", action="store_true", help="libvirt: add to the domain's config too")
    pl.add_argument("--dry-run", action="store_true", help="show where everything would go, add nothing")
