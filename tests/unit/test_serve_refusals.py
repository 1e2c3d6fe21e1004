"""The agent never reports healthy with a transport missing, and bad settings stop `serve` with one clear line.

TCP enabled with unusable TLS files and a vsock port that cannot be bound
fail the start; the virtio-serial bridge waits for its port (it appears
later at boot) and does not. `serve` runs as a process with NOTIFY_SOCKET
set, so the test sees what systemd would: READY=1 or not.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import REPO
from tests.unit.rpc_fakes import FakeEngine
from tests.unit.test_tls import Pki, make_ca, make_leaf
from unplugd.agent.config import Config, TcpConfig, TransportsConfig, VirtioSerialConfig, VsockConfig
from unplugd.agent.daemon.events import EventSources
from unplugd.agent.roots import Roots
from unplugd.agent.rpc import health
from unplugd.agent.rpc.server import AgentServer, BridgeSet, ServeError
from unplugd.agent.transports.bridges import start_bridges
from unplugd.agent.transports.tls import TlsError, server_credentials

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_leaf(d, "ca", "server", san="DNS:localhost,IP:127.0.0.1", usage="serverAuth")
    make_leaf(d, "ca", "other", san="DNS:localhost", usage="serverAuth")
    (d / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    return Pki(d)


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        check = ch.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health.HealthCheckRequest.SerializeToString,
            response_deserializer=health.HealthCheckResponse.FromString,
        )
        return int(check(health.HealthCheckRequest(service=""), timeout=5).status)


_NO_SERIAL = VirtioSerialConfig(enabled=False)  # on by default; only the test that wants it enables it


def _server(tmp_path: Path, transports: TransportsConfig, **kw: object) -> AgentServer:
    cfg = Config(transports=transports).with_overrides(socket=tmp_path / "run" / "agent.sock")
    return AgentServer(cfg, roots=Roots.under(tmp_path / "tree"), engine=FakeEngine(), sources=EventSources.none, **kw)  # type: ignore[arg-type]


@needs_openssl
@pytest.mark.parametrize(
    ("files", "why"),
    [
        ({"key": "missing.key"}, "No such file"),
        ({"cert": "."}, "Is a directory"),
        ({"cert": "server.key"}, "are not a certificate and its"),  # a key where the certificate goes
        ({"cert": "junk.pem"}, "are not a certificate and its"),  # PEM armour, no certificate inside
        ({"key": "other.key"}, "are not a certificate and its"),  # another certificate's key
        ({"client_ca": "server.key"}, "client_ca: no CA certificate"),
    ],
)
def test_unusable_tls_files_are_refused(pki: Pki, files: dict[str, str], why: str) -> None:
    paths = {"cert": pki.p("server.pem"), "key": pki.p("server.key"), "client_ca": pki.p("ca.pem")}
    paths.update({k: pki.p(v) for k, v in files.items()})
    with pytest.raises(TlsError, match=why):
        server_credentials(paths["cert"], paths["key"], paths["client_ca"])


@needs_openssl
def test_tcp_with_a_mismatched_key_fails_the_start_and_is_never_healthy(pki: Pki, tmp_path: Path) -> None:
    tcp = TcpConfig(
        enabled=True, listen="127.0.0.1:0", cert=pki.p("server.pem"), key=pki.p("other.key"), client_ca=pki.p("ca.pem")
    )
    server = _server(tmp_path, TransportsConfig(tcp=tcp, virtio_serial=_NO_SERIAL))
    with pytest.raises(ServeError, match="TCP with mutual TLS cannot be served"):
        server.start()
    server.stop(grace=0)
    assert not server.socket_path.exists()
    good = TcpConfig(
        enabled=True, listen="127.0.0.1:0", cert=pki.p("server.pem"), key=pki.p("server.key"), client_ca=pki.p("ca.pem")
    )
    with _server(tmp_path, TransportsConfig(tcp=good, virtio_serial=_NO_SERIAL)) as ok:
        assert [x.transport for x in ok.listeners()] == ["unix", "tcp-mtls"]
        assert _health(ok.target) == health.SERVING


def test_vsock_that_cannot_listen_fails_the_start_never_healthy(tmp_path: Path) -> None:
    seen: list[int] = []

    def bridges(config: Config, backend: Path) -> BridgeSet:
        # The unix socket already answers while bridges start: it must not say SERVING yet.
        seen.append(_health(f"unix:{backend}"))

        def no_vsock(port: int) -> socket.socket:
            raise OSError(97, "Address family not supported by protocol")

        return start_bridges(config, backend, roots=Roots.under(tmp_path / "tree"), vsock_factory=no_vsock)

    server = _server(
        tmp_path, TransportsConfig(vsock=VsockConfig(enabled=True), virtio_serial=_NO_SERIAL), bridges=bridges
    )
    with pytest.raises(ServeError, match=r"vsock bridge .* cannot start: Address family not supported"):
        server.start()
    server.stop(grace=0)
    assert seen == [health.NOT_SERVING]
    assert not server.socket_path.exists()


def test_virtio_serial_waits_for_its_port_and_starts(tmp_path: Path) -> None:
    (tmp_path / "tree" / "dev").mkdir(parents=True)

    def bridges(config: Config, backend: Path) -> BridgeSet:
        return start_bridges(config, backend, roots=Roots.under(tmp_path / "tree"))

    with _server(tmp_path, TransportsConfig(virtio_serial=VirtioSerialConfig(enabled=True)), bridges=bridges) as server:
        assert "virtio-serial" in [x.transport for x in server.listeners()]
        assert _health(server.target) == health.SERVING


# -- `unplugd serve` as systemd runs it ----------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        yield path, sock


def _serve(tmp_path: Path, config: str, notify: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "c.toml").write_text(config)
    (tmp_path / "tree").mkdir(exist_ok=True)
    env = {"PYTHONPATH": str(REPO / ".dev"), "PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": str(notify)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "unplugd.agent.cli",
            "serve",
            "--socket",
            str(tmp_path / "run" / "agent.sock"),
            "--root",
            str(tmp_path / "tree"),
            "--log-format",
            "text",
            "--config",
            str(tmp_path / "c.toml"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _notified(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ("[mutations]\nmax_lease_seconds = 100000\n", "mutations.max_lease_seconds"),
        ("[server]\nmax_watchers = 0\n", "server.max_watchers"),
        ("[watch]\nfd_rescan_seconds = inf\n", "watch.fd_rescan_seconds"),
    ],
)
def test_serve_exits_with_one_line_naming_the_key(
    tmp_path: Path, notify_socket: tuple[Path, socket.socket], config: str, key: str
) -> None:
    path, sock = notify_socket
    done = _serve(tmp_path, config, path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "level=error" in lines[0], done.stderr
    assert _notified(sock) == []


@needs_openssl
def test_serve_with_unusable_tls_exits_non_zero_without_ready(
    pki: Pki, tmp_path: Path, notify_socket: tuple[Path, socket.socket]
) -> None:
    path, sock = notify_socket
    config = (
        f'[transports.tcp]\nenabled = true\nlisten = "127.0.0.1:0"\ncert = "{pki.p("server.pem")}"\n'
        f'key = "{pki.p("other.key")}"\nclient_ca = "{pki.p("ca.pem")}"\n'
    )
    done = _serve(tmp_path, config, path)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "level=error" in line]
    assert len(errors) == 1 and "transports.tcp.key" in errors[0] and "Traceback" not in done.stderr
    assert not any("READY=1" in m for m in _notified(sock))
    assert not (tmp_path / "run" / "agent.sock").exists()
    assert os.listdir(tmp_path / "run") == []
