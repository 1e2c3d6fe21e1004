"""The report socket: `unplugd inspect` answered by the running agent, and every way back to the local scan.

Client half (agent/reportsock.py, agent/entry.py) against small servers that misbehave on
purpose; the agent's half (daemon/reportserver.py) in a real AgentServer with a real gRPC
client beside it.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

import unplugd
from tests.unit.rpc_fakes import running_server
from unplugd.agent import cli, entry, reportsock
from unplugd.agent.config import Config, ServerConfig, VirtioSerialConfig
from unplugd.v1 import agent_service_pb2 as pb

DOC = {"functions": [], "hostname": "vm", "agentVersion": unplugd.__version__, "fromCapture": False}
GOOD = json.dumps(DOC).encode()


@contextlib.contextmanager
def serving(path: Path, handle: Callable[[socket.socket], None]) -> Iterator[Path]:
    """A unix socket server at `path` that runs `handle` on each connection (in a thread)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    conns: list[socket.socket] = []

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        srv.shutdown(socket.SHUT_RDWR)
        srv.close()
        thread.join(5)
        for conn in conns:
            conn.close()


def sends(body: bytes) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        with conn:
            conn.sendall(body)

    return handle


def never_answers(conn: socket.socket) -> None:
    time.sleep(30)  # the connection stays open and silent; the test closes it


@pytest.fixture
def local_scan(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], bool]]:
    """cli.main replaced: records how entry.main fell back to it (the arguments, ask_agent)."""
    calls: list[tuple[list[str], bool]] = []

    def fake_main(argv: list[str], *, ask_agent: bool = True) -> int:
        calls.append((list(argv), ask_agent))
        return 0

    monkeypatch.setattr(cli, "main", fake_main)
    return calls


def _point_at(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    monkeypatch.setenv(reportsock.SOCKET_ENV, str(path))


# ---------------------------------------------------------------------------------- the client


def test_the_default_socket_is_beside_the_default_grpc_socket() -> None:
    assert str(ServerConfig().report_socket) == reportsock.DEFAULT_REPORT_SOCKET
    assert ServerConfig(socket=Path("/srv/x/agent.sock")).report_socket == Path("/srv/x/report.sock")


def test_no_agent_is_a_quiet_fallback(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_scan: list[tuple[list[str], bool]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _point_at(monkeypatch, tmp_path / "report.sock")
    failed = reportsock.ask()
    assert isinstance(failed, reportsock.Failed) and not failed.loud
    assert entry.main(["inspect", "--json"]) == 0
    assert local_scan == [(["inspect", "--json"], False)]  # scanned here, without asking again
    assert capsys.readouterr().err == ""


def test_a_stale_socket_nobody_listens_on_is_a_quiet_fallback(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_scan: list[tuple[list[str], bool]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "report.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # the file stays, nobody accepts: ECONNREFUSED
    _point_at(monkeypatch, path)
    failed = reportsock.ask()
    assert isinstance(failed, reportsock.Failed) and not failed.loud and "refused" in failed.why
    assert entry.main(["inspect"]) == 0
    assert local_scan == [(["inspect"], False)]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "without an answer"),
        (b"garbage\x00\xff", "not a whole report"),
        (GOOD[: len(GOOD) // 2], "not a whole report"),  # the agent died while writing
        (GOOD + b" {}", "not a whole report"),
        (b"[1, 2]", "not a whole report"),
        (GOOD.replace(b'"vm"', b"NaN"), "not a whole report"),
        (json.dumps({**DOC, "agentVersion": "0.0.1-old"}).encode(), "version '0.0.1-old'"),
        (json.dumps({k: v for k, v in DOC.items() if k != "agentVersion"}).encode(), "version None"),
        (json.dumps({**DOC, "fromCapture": True}).encode(), "captured tree"),
    ],
    ids=["empty", "garbage", "truncated", "trailing", "not-an-object", "nan", "other-version", "no-version", "capture"],
)
def test_a_bad_answer_is_one_line_on_stderr_and_the_local_scan(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_scan: list[tuple[list[str], bool]],
    capsys: pytest.CaptureFixture[str],
    body: bytes,
    why: str,
) -> None:
    with serving(tmp_path / "report.sock", sends(body)) as path:
        _point_at(monkeypatch, path)
        assert entry.main(["inspect", "--json", "--all"]) == 0
    assert local_scan == [(["inspect", "--json", "--all"], False)]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and why in err and "inspecting here instead" in err


def test_a_malformed_answer_is_refused_where_json_decoder_was_never_imported() -> None:
    """In `unplugd inspect` json.decoder is never imported, and then _json's scanner fails on a
    document cut short or holding a raw control character with SystemError, not JSONDecodeError:
    a traceback and exit 1, where pytest (which imports json) saw the fallback."""
    bodies = [GOOD[: len(GOOD) // 2], GOOD.replace(b'"vm"', b'"\x1b[2J"'), b'{"functions": [}']
    code = (
        "import sys\nfrom unplugd.agent import reportsock\n"
        "assert 'json.decoder' not in sys.modules\n"
        f"print([type(reportsock.check_answer(b)).__name__ for b in {bodies!r}])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == repr(["Failed"] * len(bodies)), done.stderr


def test_an_agent_that_never_answers_times_out_into_the_local_scan(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_scan: list[tuple[list[str], bool]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(reportsock, "TIMEOUT_S", 0.3)
    with serving(tmp_path / "report.sock", never_answers) as path:
        _point_at(monkeypatch, path)
        assert entry.main(["inspect", "--json"]) == 0
    assert local_scan == [(["inspect", "--json"], False)]
    assert "did not answer within 0.3 s" in capsys.readouterr().err


def test_a_good_answer_is_printed_as_sent_and_nothing_is_scanned(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_scan: list[tuple[list[str], bool]],
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    with serving(tmp_path / "report.sock", sends(GOOD)) as path:
        _point_at(monkeypatch, path)
        assert entry.main(["inspect", "--json"]) == 0
    assert local_scan == []
    assert capfdbinary.readouterr().out == GOOD + b"\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "--local"],
        ["inspect", "--json", "--root", "/x"],
        ["inspect", "--device", "vdb"],
        ["inspect", "--no-probe"],
        ["-v", "inspect"],
        ["check", "vdb"],
        ["inspect", "--js"],  # an abbreviation: argparse's, which asks the agent itself (cli._run_inspect)
    ],
)
def test_other_command_lines_go_to_the_cli_without_asking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_scan: list[tuple[list[str], bool]], argv: list[str]
) -> None:
    asked: list[int] = []

    def count(conn: socket.socket) -> None:
        asked.append(1)
        conn.close()

    with serving(tmp_path / "report.sock", count) as path:
        _point_at(monkeypatch, path)
        assert entry.main(argv) == 0
        time.sleep(0.05)
    assert local_scan == [(argv, True)]
    assert asked == []


def test_argparse_path_asks_the_agent_unless_told_not_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    """`inspect --js` (argparse's abbreviation) is still answered by the agent; --local is not."""
    with serving(tmp_path / "report.sock", sends(GOOD)) as path:
        _point_at(monkeypatch, path)
        assert cli.main(["inspect", "--js"]) == 0
        assert capfdbinary.readouterr().out == GOOD + b"\n"
        assert cli.main(["inspect", "--json", "--local"]) == 0  # this process's own scan of this machine
        assert json.loads(capfdbinary.readouterr().out)["functions"] != []


# ---------------------------------------------------------------------------------- the agent


def _config(max_workers: int = 16, max_watchers: int = 8) -> Config:
    no_serial = replace(Config().transports, virtio_serial=VirtioSerialConfig(enabled=False))
    server = replace(ServerConfig(), max_workers=max_workers, max_watchers=max_watchers)
    return replace(Config(), transports=no_serial, server=server)


def _read_all(path: Path, send: bytes = b"") -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        c.connect(str(path))
        if send:
            with contextlib.suppress(OSError):
                c.sendall(send)
        chunks = []
        with contextlib.suppress(ConnectionResetError):  # unread bytes in the agent's queue: reset after the data
            while chunk := c.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def test_the_agent_answers_each_connection_with_a_fresh_report_on_a_root_only_socket(tmp_path: Path) -> None:
    made: list[int] = []

    def produce() -> bytes:
        made.append(1)
        return json.dumps({**DOC, "hostname": f"scan {len(made)}"}).encode()

    with running_server(tmp_path, config=_config(), report_json=produce) as (server, _):
        path = server.config.server.report_socket
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        answers = [json.loads(_read_all(path))["hostname"] for _ in range(10)]
    assert answers == [f"scan {i}" for i in range(1, 11)]  # never a cached answer
    assert not path.exists()  # removed on stop


def test_the_agent_reads_nothing_a_client_sends_and_stays_up(tmp_path: Path) -> None:
    with running_server(tmp_path, config=_config(), report_json=lambda: GOOD) as (server, stub):
        path = server.config.server.report_socket
        got = _read_all(path, send=os.urandom(1 << 20))
        assert got in (GOOD, b"")  # the report, or closed: never anything else
        assert _read_all(path) == GOOD
        assert stub.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=10).version == unplugd.__version__


def test_a_stale_report_socket_is_replaced(tmp_path: Path) -> None:
    stale = tmp_path / "run" / "report.sock"
    stale.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))
    with running_server(tmp_path, config=_config(), report_json=lambda: GOOD) as (server, _):
        assert server.config.server.report_socket == stale
        assert _read_all(stale) == GOOD


def test_clients_that_never_read_cannot_take_the_workers_grpc_needs(tmp_path: Path) -> None:
    """4 workers, 1 watcher: one report slot. With more clients than slots, none reading an
    answer too big for the socket's buffers, GetAgentInfo is still answered at once: without
    the cap every worker would wait out the write timeout (10 s) on a client."""
    big = b" " * (64 << 20)
    with running_server(tmp_path, config=_config(max_workers=4, max_watchers=1), report_json=lambda: big) as (
        server,
        stub,
    ):
        path = server.config.server.report_socket
        idle = []
        for _ in range(5):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(path))
            idle.append(c)
        try:
            time.sleep(0.5)  # every answer that may start has started
            for _ in range(3):
                assert stub.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=5).version == unplugd.__version__
        except grpc.RpcError as exc:  # DEADLINE_EXCEEDED: the workers were all held
            pytest.fail(f"gRPC starved by report clients: {exc.code()}")
        finally:
            for c in idle:
                c.close()


FAST_PATH = """
import sys
before = set(sys.modules)
from unplugd.agent.entry import main
code = main(["inspect", "--json"])
sys.stderr.write(repr(sorted(set(sys.modules) - before)))
raise SystemExit(code)
"""


def test_the_agent_answered_path_imports_only_builtins_and_its_two_modules(tmp_path: Path) -> None:
    """What makes it fast: no argparse, json, socket, enum, re or typing (each ms of a ~13 ms command)."""
    with serving(tmp_path / "report.sock", sends(GOOD)) as path:
        done = subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path[:0] = {sys.path!r}\n{FAST_PATH}"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, reportsock.SOCKET_ENV: str(path)},
        )
    assert done.stdout == GOOD.decode() + "\n"
    loaded = ast.literal_eval(done.stderr)
    assert [m for m in loaded if m not in ("__future__", "_json", "_socket")] == [
        "unplugd",
        "unplugd.agent",
        "unplugd.agent.entry",
        "unplugd.agent.reportsock",
    ]


class _Terminal(io.TextIOWrapper):
    def isatty(self) -> bool:
        return True


def test_json_on_a_terminal_is_indented_as_the_local_scan_indents_it(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = io.BytesIO()
    out = _Terminal(raw, encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", out)
    answer = reportsock.check_answer(GOOD)
    assert isinstance(answer, reportsock.Answer)
    assert entry.print_answer(answer, as_json=True, show_all=False, verbose=False) == 0
    assert raw.getvalue().decode() == json.dumps(DOC, indent=2) + "\n"  # cli._json_text's indent
