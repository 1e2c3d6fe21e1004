"""Listener: one address the agent answers on, as GetAgentInfo reports it.

Here, not in rpc/, so that transports never import the gRPC layer: the
bridges (bridges.py) and TLS (tls.py) name what they listen on, and
rpc/server.py collects their Listeners with its own unix socket's.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Listener"]


@dataclass(frozen=True)
class Listener:
    transport: str  # unix | vsock | virtio-serial | tcp-mtls
    address: str
