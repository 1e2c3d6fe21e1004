"""A QMP proxy in front of a real QEMU: records the conversation, and stands in for the guest on device_del.

Without a guest OS QEMU never completes an unplug (the guest must eject the
slot), so the proxy answers `device_del` itself, takes the time it arrived,
calls `on_unplug(id)` (the bench removes the functions from the fake guest's
tree there, as a guest would) and, after `guest_delay_s`, sends one
DEVICE_DELETED per function it returned, taking the time the last one left.
Everything else goes to QEMU and back unchanged. The proxy runs its own event
loop in a thread so the bench's clock sees both ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unplugd.splice import first_done

__all__ = ["QmpProxy", "UnplugTimes", "json_messages"]

OnUnplug = Callable[[str], list[tuple[str, str]]]  # device id -> [(id, QOM path)] that leave


async def json_messages(reader: asyncio.StreamReader) -> AsyncIterator[tuple[bytes, Any]]:
    """(raw bytes, decoded object) per JSON value in a stream.

    QMP clients need not end a command with a newline (qemu.qmp does not):
    QEMU's parser, like this one, splits the stream by JSON values.
    """
    decoder = json.JSONDecoder()
    buf = ""
    while chunk := await reader.read(65536):
        buf += chunk.decode("utf-8", "replace")
        while True:
            stripped = buf.lstrip()
            if not stripped:
                buf = ""
                break
            try:
                obj, end = decoder.raw_decode(stripped)
            except ValueError:
                buf = stripped
                break  # incomplete: wait for more
            buf = stripped[end:]
            yield stripped[:end].encode() + b"\n", obj


@dataclass
class UnplugTimes:
    device: str
    requested_at: float  # perf_counter when device_del arrived
    last_event_at: float = 0.0  # perf_counter after the last DEVICE_DELETED was written


@dataclass
class QmpProxy:
    upstream: Path
    listen: Path
    on_unplug: OnUnplug | None = None
    guest_delay_s: float = 0.05
    unplugs: list[UnplugTimes] = field(default_factory=list)
    # (command, canonical arguments) -> return value, as QEMU answered
    recorded: dict[str, Any] = field(default_factory=dict)
    greeting: bytes = b""
    commands: int = 0  # forwarded to QEMU, all connections
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.AbstractServer | None = None
    _tasks: set[asyncio.Future[None]] = field(default_factory=set)

    def start(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_unix_server(self._client, path=str(self.listen)))
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=main, name="bench-qmp-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(5)
        self._loop = None

    def __enter__(self) -> QmpProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def key(command: str, arguments: Any) -> str:
        return json.dumps([command, arguments or {}], sort_keys=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream), limit=64 * 1024 * 1024)
        pending: dict[str, str] = {}  # QMP id -> recording key
        lock = asyncio.Lock()  # whole lines only, from either direction

        async def send(line: bytes) -> None:
            async with lock:
                writer.write(line)
                await writer.drain()

        async def from_qemu() -> None:
            while line := await up_reader.readline():
                if not self.greeting and line.startswith(b'{"QMP"'):
                    self.greeting = line
                with contextlib.suppress(ValueError, TypeError):
                    msg = json.loads(line)
                    if isinstance(msg, dict) and "return" in msg and str(msg.get("id")) in pending:
                        self.recorded[pending.pop(str(msg.get("id")))] = msg["return"]
                await send(line)

        async def from_client() -> None:
            async for raw, msg in json_messages(reader):
                if isinstance(msg, dict) and msg.get("execute") == "device_del" and self.on_unplug is not None:
                    await self._device_del(msg, send)
                    continue
                if isinstance(msg, dict) and "execute" in msg:
                    self.commands += 1
                    if "id" in msg:
                        pending[str(msg["id"])] = self.key(msg["execute"], msg.get("arguments"))
                up_writer.write(raw)
                await up_writer.drain()

        try:
            await first_done([asyncio.ensure_future(from_qemu()), asyncio.ensure_future(from_client())])
        finally:
            up_writer.close()
            writer.close()

    async def _device_del(self, msg: dict[str, Any], send: Callable[[bytes], Any]) -> None:
        device = str((msg.get("arguments") or {}).get("id", ""))
        times = UnplugTimes(device, time.perf_counter())
        self.unplugs.append(times)
        assert self.on_unplug is not None
        reply: dict[str, Any] = {"return": {}}
        try:
            leaving = self.on_unplug(device)
        except Exception as exc:  # a bench bug must show up as a failed unplug, not a dropped connection
            leaving = []
            reply = {"error": {"class": "GenericError", "desc": f"bench proxy: {type(exc).__name__}: {exc}"}}
        if "id" in msg:
            reply["id"] = msg["id"]
        await send(json.dumps(reply).encode() + b"\n")

        async def later() -> None:
            await asyncio.sleep(self.guest_delay_s)
            for dev_id, path in leaving:
                now = time.time()
                event = {
                    "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
                    "event": "DEVICE_DELETED",
                    "data": {"device": dev_id, "path": path},
                }
                await send(json.dumps(event).encode() + b"\n")
            times.last_event_at = time.perf_counter()

        task = asyncio.ensure_future(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
