"""daemon/footprint.py: asyncio without ssl still serves streams and TLS; malloc_trim and one arena do what they say."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.probe import probe
from tests.serving import wait_accepting
from tests.unit.test_tls import Pki, make_ca, make_leaf
from unplugd.host.client import SyncAgentClient

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
    first, ssl_after_asyncio, data, ssl_works, second = probe(PROBE)
    assert first is True and ssl_after_asyncio is False
    assert data == b"plain bytes" and ssl_works
    assert second is False  # asyncio is there already: nothing to do


# 20,000 blocks of 2,000 bytes (over pymalloc's 512: malloc's main heap), all freed but the last,
# which pins the heap's top: glibc cannot shrink the heap, only malloc_trim hands the pages back.
TRIM_PROBE = """
from unplugd.agent.daemon.footprint import release_free_heap

def rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")

blocks = [bytes(2000) + bytes([i % 256]) for i in range(20_000)]
keep = blocks[-1]
del blocks
before = rss_kib()
trimmed = release_free_heap()
print(repr([trimmed, before - rss_kib()]))
"""


def test_release_free_heap_gives_freed_pages_back() -> None:
    trimmed, released_kib = probe(TRIM_PROBE)
    assert trimmed is True  # glibc (Debian): malloc_trim exists
    assert released_kib > 20_000  # most of the ~40 MB freed


# Four threads malloc while all alive; glibc reserves each new arena as 64 MiB of address space whose
# unused part is PROT_NONE: such mappings (over 1 MiB, so no thread stack's 4 KiB guard) count arenas.
ARENA_PROBE = """
import sys, threading
from unplugd.agent.daemon.footprint import one_malloc_arena
limited = one_malloc_arena() if sys.argv[1] == "one" else None
barrier = threading.Barrier(5)

def work() -> None:
    keep = [bytes(10_000) + bytes([i % 256]) for i in range(100)]  # over pymalloc's 512 bytes: malloc
    barrier.wait()
    barrier.wait()
    del keep

threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
barrier.wait()
arenas = 0
for line in open("/proc/self/maps"):
    fields = line.split()
    start, end = (int(x, 16) for x in fields[0].split("-"))
    if fields[1] == "---p" and len(fields) == 5 and end - start > 1 << 20:
        arenas += 1
barrier.wait()
for t in threads:
    t.join()
print(repr([limited, arenas]))
"""


def _thread_arenas(mode: str) -> list[object]:
    result: list[object] = probe(ARENA_PROBE, mode)
    return result


def test_one_malloc_arena_keeps_threads_in_the_main_arena() -> None:
    assert _thread_arenas("default")[1] != 0  # glibc's default: the threads got arenas of their own
    assert _thread_arenas("one") == [True, 0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_leaf(d, "ca", "server", san="IP:127.0.0.1", usage="serverAuth")
    make_leaf(d, "ca", "client", san="DNS:unplugctl", usage="clientAuth")
    return Pki(d)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize("python", [sys.executable, "/usr/bin/python3"], ids=["venv", "debian"])
def test_serve_process_answers_mutual_tls_after_asyncio_without_ssl(pki: Pki, tmp_path: Path, python: str) -> None:
    """serve hid ssl from asyncio; TCP's TLS (grpc's own, the files checked with ssl) still serves."""
    port = _free_port()
    (tmp_path / "tree").mkdir()
    (tmp_path / "c.toml").write_text(
        f'[transports.tcp]\nenabled = true\nlisten = "127.0.0.1:{port}"\ncert = "{pki.p("server.pem")}"\n'
        f'key = "{pki.p("server.key")}"\nclient_ca = "{pki.p("ca.pem")}"\n'
        "[transports.virtio_serial]\nenabled = false\n"
    )
    sock = tmp_path / "run" / "agent.sock"
    argv = [python, "-m", "unplugd.agent.cli", "serve", "--socket", str(sock), "--root", str(tmp_path / "tree")]
    proc = subprocess.Popen(
        [*argv, "--log-format", "text", "--config", str(tmp_path / "c.toml")],
        env={"PYTHONPATH": str(REPO / ".dev"), "PATH": "/usr/bin:/bin"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_accepting(proc, sock)
        with SyncAgentClient(f"tcp:127.0.0.1:{port}", tls=pki.client(), timeout=10) as client:
            assert client.get_agent_info().version
            assert client.get_report().from_capture
    finally:
        proc.kill()
        proc.communicate(timeout=10)
