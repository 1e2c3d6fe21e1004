"""What the serving agent keeps out of its memory: Python's ssl module, and the heap its start-up freed.

grpc's cygrpc imports asyncio (for grpc.aio) and asyncio.base_events / sslproto / selector_events
each `try: import ssl`. Importing ssl maps libssl and libcrypto and runs OpenSSL's initialisation:
~4 MiB of the agent's RSS on PyPI's grpcio 1.85 (libcrypto alone 2.9-3.4 MiB resident), measured
with tests/bench/rss_breakdown.py. The agent never hands asyncio an SSL context: its bridges
(vsock, virtio-serial) splice plain bytes, and TLS on TCP is grpc's own (BoringSSL or the system's
OpenSSL inside grpc, with transports/tls.py importing ssl only to check the files when TCP is
configured). So asyncio is imported once with ssl hidden, as on a Python built without ssl, which
asyncio supports; ssl stays importable for whoever asks for it later.

Start-up (imports, protobuf's descriptor pools, the server's set-up) frees ~3 MiB of malloc's main
heap below chunks that stay live, so glibc cannot give it back by shrinking the heap: the idle agent
kept it until later traffic happened to free the top (41.2 MiB idle, 39.0 after 300 GetReports,
PyPI grpcio). malloc_trim(0) once the server is up hands those free pages back (38.0 idle);
they are free, not cached, so nothing is lost but the page faults if the heap grows again.

glibc gives each new thread that mallocs its own arena (up to 8 per core), and a thread arena keeps
what it once held: with 8 concurrent clients the agent ended at 40.4, 40.6, 44.4 and 40.4 MiB, and
at 39.4-39.6 MiB in 4 runs with one arena (PyPI grpcio, 8 x 100 GetReports). The GIL serialises the
Python threads' allocations anyway and glibc's per-thread caches serve most small ones without the
arena's lock, so serve asks for one arena (mallopt M_ARENA_MAX) before grpc starts its threads.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["import_asyncio_without_ssl", "one_malloc_arena", "release_free_heap"]

M_ARENA_MAX = -8  # glibc's malloc.h: mallopt's parameter number for the arena limit


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


def release_free_heap() -> bool:
    """Give malloc's free pages back to the kernel (glibc's malloc_trim(0)); False where the C library has none."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # None: this process's own symbols (libc among them)
    if trim is None:  # musl, or another libc: nothing to trim with, nothing lost
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


def one_malloc_arena() -> bool:
    """Every thread allocates from malloc's main arena (mallopt(M_ARENA_MAX, 1)); False where the libc cannot."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, 1))  # 1 on success
