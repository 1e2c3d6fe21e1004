"""unplugctl's exit codes and output, with a fake hypervisor and a fake agent behind open_session."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.host_fakes import ROOT_Q35, FakeAgent, FakeBackend, func, gfunc, port, report, topology
from unplugd.host import cli
from unplugd.host.errors import DomainNotFound
from unplugd.host.topology import Function, Removal, Topology
from unplugd.leaselabel import lease_label

RP1, RP2, OFF = port("0000:00/02.0", "rp1"), port("0000:00/02.1", "rp2"), port("0000:00/02.2", "rp3", hotplug=False)


def topo() -> Topology:
    return topology(
        (
            ROOT_Q35,
            2,
            [func(ROOT_Q35, 2, i, qemu_id=f"rp{i + 1}", is_bridge=True, hotpluggable=False) for i in range(3)],
        ),
        (RP1, 0, [func(RP1, 0, qemu_id="disk1", targets=("vdb",))]),
        (RP2, 0, [func(RP2, 0, 0, qemu_id="mf-disk"), func(RP2, 0, 1, qemu_id="mf-net")]),
        (OFF, 0, [func(OFF, 0, qemu_id="off-net")]),
    )


ROOTS = [gfunc(f"0000:00:02.{i}", f"0000:00/02.{i}") for i in range(3)]
MF = [gfunc("0000:02:00.0", "0000:00/02.1/00.0"), gfunc("0000:02:00.1", "0000:00/02.1/00.1")]
OFFG = gfunc("0000:03:00.0", "0000:00/02.2/00.0", ifaces=("enp3s0",))
READY = report(*ROOTS, gfunc("0000:01:00.0", "0000:00/02.0/00.0", blocks=("vdb",)), *MF, OFFG)
BUSY = report(
    *ROOTS,
    gfunc("0000:01:00.0", "0000:00/02.0/00.0", "BUSY", reasons=[("MOUNTED", "vdb1 on /srv", True)], blocks=("vdb",)),
    *MF,
    OFFG,
)
GONE = report(*ROOTS, *MF, OFFG)


def slot_of(fn: Function) -> list[Removal]:
    s = topo().slot_of(fn.path)
    assert s is not None
    return [Removal(f.qemu_id, f.qom_path) for f in s.functions]


@pytest.fixture
def session(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Replace open_session; returns the (backend, agent) the next command will see."""
    state: dict[str, object] = {"backend": FakeBackend(topo(), slot_of), "agent": FakeAgent(READY, GONE)}

    @contextlib.asynccontextmanager
    async def fake(args: argparse.Namespace) -> AsyncIterator[cli.Session]:
        state["args"] = args
        yield cli.Session(state["backend"], state["agent"], args.vm or "vm")  # type: ignore[arg-type]

    monkeypatch.setattr(cli, "open_session", fake)
    return state


@pytest.mark.parametrize(
    ("device", "guest", "code"),
    [
        ("vdb", READY, 0),
        ("vdb", BUSY, 3),
        ("vdb", None, 4),
        ("off-net", READY, 5),
        ("mf-net", READY, 6),
        ("0000:00/02.1/00", READY, 0),  # the whole slot: no companions
        ("0000:01:00.0", BUSY, 3),  # guest address
    ],
)
def test_check_exit_codes(session, capsys, device: str, guest, code: int) -> None:  # type: ignore[no-untyped-def]
    session["agent"] = FakeAgent(guest) if guest is not None else None
    assert cli.main(["check", "dom", device]) == code
    verdict = {v: k for k, v in cli.EXIT.items()}[code]
    assert verdict.value in capsys.readouterr().out


def test_check_json(session, capsys) -> None:  # type: ignore[no-untyped-def]
    session["agent"] = FakeAgent(BUSY)
    assert cli.main(["check", "dom", "disk1", "--json"]) == 3
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "BLOCKED_BY_GUEST"
    assert doc["functions"][0]["guest"]["reasons"][0]["code"] == "MOUNTED"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["check", "dom"],
        ["unplug", "a", "b", "c"],  # several VMs are a fleet, and only status and check ask fleets
        ["unplug", "dom", "vdb", "--timeout", "soon"],
        ["wait-ready", "dom", "vdb"],  # --timeout is required
        ["frobnicate", "dom"],
        ["status", "a", "--all-domains"],  # names or every domain, not both
        ["check", "--all-domains"],  # a fleet check still needs its DEVICE
        ["check", "a", "b", "vdb", "--unpluggable", "model=*"],  # a status option
        ["status", "a", "b", "--qmp", "/run/q.sock"],  # fleets are libvirt's
        ["status", "a", "--unpluggable", "colour=red"],  # KEY is alias, target, model or path
        ["unplug", "a", "vdb", "-c", "qemu:///system", "-c", "qemu+ssh://hv/system"],  # one URI to unplug on
        # seconds that mean nothing: a negative wait, nan, inf, past what grpc's deadlines hold, a 0 per call
        ["wait-ready", "dom", "vdb", "--timeout", "-1"],
        ["wait-ready", "dom", "vdb", "--timeout", "nan"],
        ["wait-ready", "dom", "vdb", "--timeout", "inf"],
        ["unplug", "dom", "vdb", "--timeout", "1e10"],
        ["release", "dom", "vdb", "--timeout", "-5"],
        ["check", "dom", "vdb", "--agent-timeout", "0"],
        ["status", "dom", "--hypervisor-timeout", "nan"],
        ["status", "a", "b", "--domain-timeout", "-1"],
    ],
)
def test_usage_errors_exit_2(session, capsys, argv: list[str]) -> None:  # type: ignore[no-untyped-def]
    assert cli.main(argv) == 2


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["unplug", "dom"], "usage: unplugctl unplug "),
        (["status", "a", "--all-domains"], "usage: unplugctl status "),
        (["plug", "--qmp", "/run/q.sock"], "usage: unplugctl plug "),
    ],
)
def test_usage_errors_show_the_commands_usage(session, capsys, argv: list[str], usage: str) -> None:  # type: ignore[no-untyped-def]
    """Not the top level's `usage: unplugctl [-h] COMMAND ...`, which says nothing of the command's arguments."""
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith(usage)


def test_bad_seconds_say_why(session, capsys) -> None:  # type: ignore[no-untyped-def]
    """inf reached grpc as a deadline it cannot hold: a reachable agent read GUEST_UNREACHABLE (exit 4)."""
    assert cli.main(["wait-ready", "dom", "vdb", "--timeout", "inf"]) == 2
    assert "argument --timeout: seconds must be at least 0 and at most 1e+09, not 'inf'" in capsys.readouterr().err
    assert "args" not in session  # refused before anything was opened


def test_zero_timeout_looks_once(session, capsys) -> None:  # type: ignore[no-untyped-def]
    session["agent"] = FakeAgent(BUSY)
    assert cli.main(["wait-ready", "dom", "vdb", "--timeout", "0"]) == 3


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("bogus", "expected unix:PATH, vsock:CID:PORT, hvsock:PATH:PORT, serial:PATH or tcp:HOST:PORT"),
        ("vsock:x:1", "CID must be a number up to 4294967295, not 'x'"),
    ],
)
def test_a_bad_agent_address_is_named_once(capsys, tmp_path, address: str, why: str) -> None:  # type: ignore[no-untyped-def]
    """It read "bad agent address 'bogus': 'bogus': expected ..."."""
    assert cli.main(["status", "--qmp", str(tmp_path / "qmp.sock"), "--agent", address]) == 2
    assert capsys.readouterr().err == f"unplugctl: bad agent address {address!r}: {why}\n"


def test_unknown_device_is_a_usage_error(session, capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli.main(["check", "dom", "nope"]) == 2
    assert "no device matches 'nope'" in capsys.readouterr().err


def test_backend_failure_exits_1(session, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    @contextlib.asynccontextmanager
    async def broken(args: argparse.Namespace) -> AsyncIterator[cli.Session]:
        raise DomainNotFound("no domain 'dom' on qemu:///system")
        yield  # pragma: no cover

    monkeypatch.setattr(cli, "open_session", broken)
    assert cli.main(["status", "dom"]) == 1
    assert "no domain 'dom'" in capsys.readouterr().err


def test_qmp_without_qemu_qmp_is_one_clear_line(monkeypatch, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Debian 12 has no qemu.qmp: --qmp must say so and how to get it, not print a traceback."""
    from unplugd.host.backends import qmp

    # None in sys.modules makes `import qemu.qmp` raise ImportError, as on a host without it.
    monkeypatch.setitem(sys.modules, "qemu", None)
    monkeypatch.setitem(sys.modules, "qemu.qmp", None)
    qmp._client_class.cache_clear()
    try:
        code = cli.main(["status", "--qmp", str(tmp_path / "qmp.sock"), "--agent", "unix:/x"])
    finally:
        qmp._client_class.cache_clear()
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines() == [f"unplugctl: {qmp.QMP_MISSING}"]
    assert "qemu.qmp" in err and "pip install qemu.qmp" in err


def test_qmp_form_takes_device_alone(session) -> None:  # type: ignore[no-untyped-def]
    assert cli.main(["check", "--qmp", "/run/q.sock", "--agent", "unix:/x", "vdb"]) == 0
    args = session["args"]
    assert args.vm is None and args.device == "vdb" and args.qmp == "/run/q.sock"


def test_status_table_and_json(session, capsys) -> None:  # type: ignore[no-untyped-def]
    session["agent"] = FakeAgent(READY)
    assert cli.main(["status", "dom"]) == 0
    out = capsys.readouterr().out
    assert "0000:00/02.2/00" in out and "hotplug='off'" in out
    assert cli.main(["status", "dom", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    verdicts = {s["slotPath"]: s["verdict"] for s in doc["slots"]}
    assert verdicts["0000:00/02.0/00"] == "UNPLUGGABLE"
    assert verdicts["0000:00/02.2/00"] == "NOT_HOTPLUGGABLE"
    assert doc["guestReachable"] is True


def test_guest_text_is_escaped_in_every_table(session, capsys) -> None:  # type: ignore[no-untyped-def]
    """A reason, a name and a problem from the guest cannot add a line or colour the terminal."""
    evil = "\n\x1b[2J\x1b[31mOK\u202e"
    guest = report(
        *ROOTS,
        gfunc(
            "0000:01:00.0",
            "0000:00/02.0/00.0",
            "BUSY",
            reasons=[("MOUNTED", "vdb1 on /srv" + evil, True)],
            blocks=("vdb" + evil,),
        ),
        *MF,
        OFFG,
    )
    guest.problems.add(object="/proc/1/mountinfo" + evil, detail="bad" + evil)
    session["agent"] = FakeAgent(guest)
    for argv in (["status", "dom"], ["check", "dom", "disk1"]):
        cli.main(argv)
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\u202e" not in out
        assert "\\033[2J" in out
        assert not any(line.startswith("\\033") or line.startswith("OK") for line in out.splitlines())


# A fresh process: pytest's own log handlers on the root logger would keep the CLI's from being set.
_EVIL_UNPLUG = """
import contextlib, sys
from tests.unit import test_unplugctl as t
from tests.unit.host_fakes import FakeAgent, FakeBackend, gfunc, report
from unplugd.host import cli

evil = "\\n\\x1b[2J\\x1b[31mOK\\u202e"
busy = gfunc("0000:01:00.0", "0000:00/02.0/00.0", "BUSY", reasons=[("MOUNTED", "on /srv" + evil, True)])
guest = report(*t.ROOTS, busy, *t.MF, t.OFFG)

@contextlib.asynccontextmanager
async def fake(args):
    yield cli.Session(FakeBackend(t.topo(), t.slot_of), FakeAgent(guest, t.GONE), "dom")

cli.open_session = fake
sys.exit(cli.main(sys.argv[1:]))
"""


def test_verbose_log_lines_escape_guest_text() -> None:
    """With -v the orchestrator logs what --force overrides, the guest's reason included: escaped
    as the progress line beside it is, it cannot clear the screen or add a line."""
    argv = [sys.executable, "-c", _EVIL_UNPLUG, "unplug", "-v", "dom", "vdb", "--force", "--timeout", "5"]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    logged = [line for line in proc.stderr.splitlines() if line.startswith("INFO note: --force overrides")]
    assert len(logged) == 1
    assert logged[0].endswith("on /srv\\012\\033[2J\\033[31mOK\\342\\200\\256")
    assert "\x1b" not in proc.stderr and "\u202e" not in proc.stderr


def test_unplug_progress_on_stderr_outcome_on_stdout(session, capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli.main(["unplug", "dom", "vdb", "--timeout", "5"]) == 0
    cap = capsys.readouterr()
    assert "deleted" in cap.err and "requested" in cap.err
    assert "UNPLUGGED" in cap.out and "disk1 (0000:00/02.0/00.0): removed, gone from the guest" in cap.out


def test_unplug_refused_exits_with_the_verdict(session, capsys) -> None:  # type: ignore[no-untyped-def]
    session["agent"] = FakeAgent(BUSY)
    assert cli.main(["unplug", "dom", "vdb"]) == 3
    assert "--force" in capsys.readouterr().out
    assert not [c for c in session["backend"].calls if c.startswith("unplug")]
    assert cli.main(["unplug", "dom", "mf-net", "--force"]) == 6


def test_unplug_forced_json_lists_overrides(session, capsys) -> None:  # type: ignore[no-untyped-def]
    session["agent"] = FakeAgent(BUSY, GONE)
    assert cli.main(["unplug", "dom", "vdb", "--force", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["outcome"] == "UNPLUGGED"
    assert doc["overridden"][0]["verdict"] == "BLOCKED_BY_GUEST"


def test_unplug_json_names_the_lease_by_its_label_never_its_id(session, capsys) -> None:  # type: ignore[no-untyped-def]
    """A lease id is a credential (renew, release); the JSON ends up in a management system's logs."""
    session["agent"] = FakeAgent(READY, READY, GONE)  # the check, the check under the lease, the confirmation
    assert cli.main(["unplug", "dom", "vdb", "--prepare", "--timeout", "5", "--json"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert doc["outcome"] == "UNPLUGGED" and doc["leaseReleased"] is True
    assert doc["leaseLabel"] == lease_label("lease-1") and "lease-1" not in out


def test_unplug_pending_exits_7(session, capsys) -> None:  # type: ignore[no-untyped-def]
    session["backend"] = FakeBackend(topo(), lambda fn: [])
    assert cli.main(["unplug", "dom", "vdb", "--timeout", "0.2"]) == 7


def test_sigterm_mid_wait_ends_as_sigint_does(session, capsys) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM while an unplug waits: the lease is released and the pending unplug said, exit 143.
    SIGTERM's default killed the process on the spot, the guest's lease held until it expired."""

    class Terminated(FakeBackend):
        async def request_unplug(self, fn: Function, *, via_monitor: bool = False) -> None:
            await super().request_unplug(fn, via_monitor=via_monitor)
            os.kill(os.getpid(), signal.SIGTERM)

    session["backend"] = Terminated(topo(), lambda fn: [])
    session["agent"] = agent = FakeAgent(READY)  # the same report before and after the lease
    received: list[int] = []
    # before the fix this handler, not the default, would receive it: the test fails instead of the worker dying
    before = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        code = cli.main(["unplug", "dom", "vdb", "--prepare", "--timeout", "5"])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 143 and not received
    err = capsys.readouterr().err
    assert "interrupted: the unplug of disk1 was requested" in err
    assert "released: the lease was released" in err
    assert agent.calls[-1] == "release lease-1"


def test_dry_run(session, capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli.main(["unplug", "dom", "mf-disk", "--with-companions", "--prepare", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "step 1: prepare" in out and "DRY_RUN" in out
    assert not [c for c in session["backend"].calls if c.startswith("unplug")]


def test_wait_ready(session, capsys) -> None:  # type: ignore[no-untyped-def]
    agent = FakeAgent(BUSY)
    agent.watch_reports = [BUSY, READY]
    session["agent"] = agent
    assert cli.main(["wait-ready", "dom", "vdb", "--timeout", "5"]) == 0
    agent2 = FakeAgent(BUSY)
    agent2.watch_reports = [BUSY]
    session["agent"] = agent2
    assert cli.main(["wait-ready", "dom", "vdb", "--timeout", "0.2"]) == 3


def test_help_has_examples(capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "unplugctl check web1 vdb" in out and "tainted" in out and "6 needs companions" in out


def test_every_command_help_has_examples(capsys) -> None:  # type: ignore[no-untyped-def]
    """plug's own epilog replaced the examples of the others and had none."""
    for command in ("status", "check", "unplug", "wait-ready", "release", "slots", "plug"):
        assert cli.main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "\nexamples:\n  unplugctl " in out, command
    assert "unplugctl plug web1 @nic.xml --persistent" in out


def test_tls_flags_go_together(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from unplugd.host.cli import UsageError, _tls_files, parser

    base = ["check", "--qmp", "q.sock", "--agent", "tcp:127.0.0.1:5000", "vdb"]
    assert _tls_files(parser().parse_args(base)) is None
    files = [tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem")]
    flags = ["--tls-ca", str(files[0]), "--tls-cert", str(files[1]), "--tls-key", str(files[2])]
    full = parser().parse_args([*base, *flags])
    tls = _tls_files(full)
    assert tls is not None and (tls.ca, tls.cert, tls.key) == tuple(files)
    with pytest.raises(UsageError, match="together"):
        _tls_files(parser().parse_args([*base, "--tls-ca", str(files[0])]))
