"""TCP, only with mutual TLS: the gRPC server's own TLS, client certificates required.

grpcio terminates TLS itself (no bridge): `add_mtls_port(server, tcp)` adds a
secure port whose credentials demand a client certificate signed by
`client_ca`. A client without a certificate, or with one from another CA,
fails the handshake before any RPC is seen.

grpcio takes any bytes as a certificate or key and only fails at each
handshake, while health says SERVING. So the files are loaded once with the
ssl module first: a missing or unreadable file, a PEM that is not a
certificate, a key that is not the certificate's: TlsError, and the agent
does not start.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Protocol

import grpc

from unplugd.agent.errors import AgentError

__all__ = ["TlsError", "add_mtls_port", "server_credentials"]

log = logging.getLogger(__name__)


class TlsError(AgentError):
    """TCP cannot be served: a TLS file is missing or unreadable, or the port cannot be bound."""


class _TcpSettings(Protocol):
    # agent.config.TcpConfig has these
    @property
    def listen(self) -> str: ...
    @property
    def cert(self) -> Path | None: ...
    @property
    def key(self) -> Path | None: ...
    @property
    def client_ca(self) -> Path | None: ...


class _SecurePortServer(Protocol):
    # grpc.Server and grpc.aio.Server
    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int: ...


def _read(path: Path | None, what: str) -> bytes:
    if path is None:
        raise TlsError(f"TCP needs {what}: the agent serves TCP only with mutual TLS")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsError(f"{what} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise TlsError(f"{what} {path}: not a PEM file")
    return data


def _no_password() -> bytes:
    # An encrypted key would ask for a passphrase on a terminal the service has not.
    return b""


def _check_usable(cert: Path, key: Path, client_ca: bytes) -> None:
    """What grpcio would only find at the first handshake: the files are a certificate, its key, and a CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"transports.tcp.cert {cert} and transports.tcp.key {key} are not a certificate and "
            f"its (unencrypted) private key: {getattr(exc, 'reason', None) or exc}"
        ) from exc
    try:
        ctx.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise TlsError(
            f"transports.tcp.client_ca: no CA certificate in it: {getattr(exc, 'reason', None) or exc}"
        ) from exc


def server_credentials(cert: Path | None, key: Path | None, client_ca: Path | None) -> grpc.ServerCredentials:
    """Credentials that require and verify a client certificate; TlsError unless the files are usable."""
    key_pem = _read(key, "transports.tcp.key (private key)")
    cert_pem = _read(cert, "transports.tcp.cert (certificate chain)")
    ca_pem = _read(client_ca, "transports.tcp.client_ca (CA for client certificates)")
    assert cert is not None and key is not None  # _read refused None
    _check_usable(cert, key, ca_pem)
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True)


def add_mtls_port(server: _SecurePortServer, tcp: _TcpSettings) -> str:
    """Add the TCP listener to `server` (before it starts); returns "host:port" as bound."""
    if not tcp.listen:
        raise TlsError("transports.tcp.listen is empty (host:port)")
    creds = server_credentials(tcp.cert, tcp.key, tcp.client_ca)
    try:
        port = server.add_secure_port(tcp.listen, creds)
    except RuntimeError as exc:
        raise TlsError(f"cannot listen on {tcp.listen}: {exc}") from exc
    if not port:
        raise TlsError(f"cannot listen on {tcp.listen}")
    host = tcp.listen.rpartition(":")[0]
    bound = f"{host}:{port}"
    log.info("TCP with mutual TLS on %s", bound)
    return bound
