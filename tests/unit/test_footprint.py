"""daemon/footprint.py: asyncio imported without ssl still serves plain streams, and ssl stays importable."""

from __future__ import annotations

import ast
import subprocess
import sys

# Run in a fresh interpreter: this one has imported asyncio and ssl long ago.
PROBE = """
import sys
from unplugd.agent.daemon.footprint import import_asyncio_without_ssl
first = import_asyncio_without_ssl()
ssl_after_asyncio = "ssl" in sys.modules
import asyncio, socket

async def echo() -> bytes:
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    b.sendall(b"plain bytes")
    data = await reader.readexactly(11)
    writer.close()
    b.close()
    return data

data = asyncio.run(echo())
import ssl
print(repr([first, ssl_after_asyncio, data, ssl.PROTOCOL_TLS_SERVER is not None, import_asyncio_without_ssl()]))
"""


def test_asyncio_without_ssl_streams_and_ssl_later() -> None:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {sys.path!r}\n{PROBE}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    first, ssl_after_asyncio, data, ssl_works, second = ast.literal_eval(out)
    assert first is True and ssl_after_asyncio is False
    assert data == b"plain bytes" and ssl_works
    assert second is False  # asyncio is there already: nothing to do
