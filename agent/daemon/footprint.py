"""What the serving agent keeps out of its memory: Python's ssl module, which grpc would load through asyncio.

grpc's cygrpc imports asyncio (for grpc.aio) and asyncio.base_events / sslproto / selector_events
each `try: import ssl`. Importing ssl maps libssl and libcrypto and runs OpenSSL's initialisation:
~4 MiB of the agent's RSS on PyPI's grpcio 1.85 (libcrypto alone 2.9-3.4 MiB resident), measured
with tests/bench/rss_breakdown.py. The agent never hands asyncio an SSL context: its bridges
(vsock, virtio-serial) splice plain bytes, and TLS on TCP is grpc's own (BoringSSL or the system's
OpenSSL inside grpc, with transports/tls.py importing ssl only to check the files when TCP is
configured). So asyncio is imported once with ssl hidden, as on a Python built without ssl, which
asyncio supports; ssl stays importable for whoever asks for it later.
"""

from __future__ import annotations

import sys

__all__ = ["import_asyncio_without_ssl"]


def import_asyncio_without_ssl() -> bool:
    """Import asyncio without letting it import ssl; False when asyncio or ssl was imported already (no-op)."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return False
    sys.modules["ssl"] = None  # type: ignore[assignment]  # None in sys.modules: `import ssl` raises ImportError
    try:
        import asyncio  # noqa: F401  # imported for its side effect: asyncio's modules bind ssl = None
    finally:
        del sys.modules["ssl"]
    return True
