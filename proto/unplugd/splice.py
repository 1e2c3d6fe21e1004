"""Copy bytes both ways between two asyncio streams until both sides are done."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

__all__ = ["close_writer", "first_done", "splice"]

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


async def _pump(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: list[int], first: Callable[[], None] | None = None
) -> None:
    while data := await src.read(CHUNK):
        if first is not None and not count[0]:
            first()
        count[0] += len(data)
        dst.write(data)
        await dst.drain()
    # half-close: the peer may still answer
    if dst.can_write_eof():
        with contextlib.suppress(OSError):
            dst.write_eof()


async def first_done(tasks: Sequence[asyncio.Future[None]]) -> None:
    """Wait for the first of one connection's pumps to end, then cancel and reap the others,
    also when the caller itself is cancelled. Callers keep the tasks to ask which was cut short."""
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    *,
    label: str = "",
    on_reply: Callable[[], None] | None = None,
) -> tuple[int, int]:
    """Pump a->b and b->a; an error on either side closes both. Returns the bytes
    carried each way; `on_reply` is called when b sends its first bytes."""
    a_to_b, b_to_a = [0], [0]
    tasks = [
        asyncio.ensure_future(_pump(a[0], b[1], a_to_b)),
        asyncio.ensure_future(_pump(b[0], a[1], b_to_a, on_reply)),
    ]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(t.exception() is not None for t in done):
                log.debug("splice %s ended: %s", label, next(t.exception() for t in done if t.exception()))
                break
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_writer(a[1])
        await close_writer(b[1])
    return a_to_b[0], b_to_a[0]
