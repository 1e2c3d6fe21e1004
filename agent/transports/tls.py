"""TCP, only with mutual TLS: the gRPC server's own TLS, client certificates required.

grpcio terminates TLS itself (no bridge): `add_mtls_port(server, tcp)` adds a
secure port whose credentials demand a client certificate signed by
`client_ca`. A client without a certificate, or with one from another CA,
fails the handshake before any RPC is seen.
"""

from __future__ import annotations

import logging
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


def server_credentials(cert: Path | None, key: Path | None, client_ca: Path | None) -> grpc.ServerCredentials:
    """Credentials that require and verify a client certificate."""
    return grpc.ssl_server_credentials(
        [(_read(key, "transports.tcp.key (private key)"), _read(cert, "transports.tcp.cert (certificate chain)"))],
        root_certificates=_read(client_ca, "transports.tcp.client_ca (CA for client certificates)"),
        require_client_auth=True,
    )


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
