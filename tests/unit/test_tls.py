"""TCP with mutual TLS: throwaway CAs made with the openssl command line, a real
gRPC server on 127.0.0.1, AgentClient and raw grpc clients."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Awaitable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import grpc.aio
import pytest

from tests.unit.fake_agent import FakeAgent
from unplugd.agent.config import TcpConfig
from unplugd.agent.transports.tls import TlsError, add_mtls_port, server_credentials
from unplugd.host.client import AgentClient, AgentUnreachable, SyncAgentClient, TlsFiles
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import agent_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


# A fresh unencrypted P-256 key for each certificate request.
_NEW_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(d: Path, name: str) -> None:
    openssl(
        "req",
        "-x509",
        *_NEW_EC_KEY,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "1",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
        cwd=d,
    )


def make_leaf(d: Path, ca: str, name: str, *, san: str, usage: str) -> None:
    openssl(
        "req",
        "-new",
        *_NEW_EC_KEY,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "1",
        "-extfile",
        f"{name}.ext",
        cwd=d,
    )


@dataclass
class Pki:
    d: Path

    def p(self, name: str) -> Path:
        return self.d / name

    def client(self, name: str = "client", ca: str = "ca") -> TlsFiles:
        return TlsFiles(ca=self.p(f"{ca}.pem"), cert=self.p(f"{name}.pem"), key=self.p(f"{name}.key"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_leaf(d, "ca", "server", san="DNS:localhost,IP:127.0.0.1,DNS:agent.guest.test", usage="serverAuth")
    make_leaf(d, "ca", "client", san="DNS:unplugctl", usage="clientAuth")
    make_leaf(d, "other-ca", "stranger", san="DNS:unplugctl", usage="clientAuth")
    return Pki(d)


@pytest.fixture
def tcp_agent(pki: Pki) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_AgentServiceServicer_to_server(FakeAgent(), server)
    bound = add_mtls_port(
        server,
        TcpConfig(
            enabled=True,
            listen="127.0.0.1:0",
            cert=pki.p("server.pem"),
            key=pki.p("server.key"),
            client_ca=pki.p("ca.pem"),
        ),
    )
    server.start()
    yield bound
    server.stop(0)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def test_mutual_tls_works(pki: Pki, tcp_agent: str) -> None:
    async def main() -> None:
        async with AgentClient(f"tcp:{tcp_agent}", tls=pki.client(), timeout=5) as client:
            report = await client.get_report(["0000:00:03.0"])
            assert [f.address for f in report.functions] == ["0000:00:03.0"]

    run(main())
    # the sync facade, and a server name other than the address (cert SAN)
    port = tcp_agent.rpartition(":")[2]
    with SyncAgentClient(f"tcp:127.0.0.1:{port}", tls=pki.client(), tls_server_name="agent.guest.test") as sync:
        assert sync.get_agent_info().version == "test"


def test_client_without_certificate_is_refused(pki: Pki, tcp_agent: str) -> None:
    async def main() -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=pki.p("ca.pem").read_bytes())
        async with grpc.aio.secure_channel(tcp_agent, creds) as channel:
            stub = cast("pb_grpc.AgentServiceAsyncStub", pb_grpc.AgentServiceStub(channel))
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=5)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE

    run(main())


def test_client_certificate_from_another_ca_is_refused(pki: Pki, tcp_agent: str) -> None:
    async def main() -> None:
        stranger = TlsFiles(ca=pki.p("ca.pem"), cert=pki.p("stranger.pem"), key=pki.p("stranger.key"))
        async with AgentClient(f"tcp:{tcp_agent}", tls=stranger, timeout=5, connect_timeout=3) as client:
            with pytest.raises(AgentUnreachable) as exc:
                await client.get_report()
            assert exc.value.address == f"tcp:{tcp_agent}"

    run(main())


def test_plaintext_client_is_refused(tcp_agent: str) -> None:
    async def main() -> None:
        async with grpc.aio.insecure_channel(tcp_agent) as channel:
            stub = cast("pb_grpc.AgentServiceAsyncStub", pb_grpc.AgentServiceStub(channel))
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=3)
            assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    run(main())


def test_client_does_not_trust_a_server_from_another_ca(pki: Pki, tcp_agent: str) -> None:
    async def main() -> None:
        wrong_root = TlsFiles(ca=pki.p("other-ca.pem"), cert=pki.p("client.pem"), key=pki.p("client.key"))
        async with AgentClient(f"tcp:{tcp_agent}", tls=wrong_root, timeout=5, connect_timeout=3) as client:
            with pytest.raises(AgentUnreachable):
                await client.get_report()

    run(main())


def test_tcp_without_tls_material_is_refused(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mutual TLS"):
        AgentClient("tcp:127.0.0.1:1")
    with pytest.raises(TlsError, match="mutual TLS"):
        server_credentials(pki.p("server.pem"), pki.p("server.key"), None)
    with pytest.raises(TlsError, match="No such file"):
        server_credentials(pki.p("server.pem"), tmp_path / "missing.key", pki.p("ca.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(TlsError, match="not a PEM"):
        server_credentials(tmp_path / "junk.pem", pki.p("server.key"), pki.p("ca.pem"))
    with pytest.raises(ValueError, match="TLS file"):
        TlsFiles(ca=tmp_path / "nope.pem", cert=pki.p("client.pem"), key=pki.p("client.key")).credentials()
