"""Frames of the virtio-serial session protocol (PROTOCOL.md), shared by both ends.

Pure: no I/O, no asyncio, stdlib only (it runs on Debian's python3 in the guest
and in the host's venv). A frame is

    offset size
       0    4   magic  b"\\x9fUPD"
       4    1   version (1)
       5    1   kind: OPEN, ACCEPT, DATA, CLOSE
       6    2   reserved, 0
       8    4   session id, non-zero
      12    4   payload length, at most MAX_PAYLOAD
      16    4   CRC-32 of bytes 0..15
      20    n   payload
    20+n    4   CRC-32 of the payload, seeded with the header CRC

all integers big-endian. The header has its own CRC so that a corrupted length
is caught before the decoder waits for a payload that will never come; the
payload CRC is seeded with the header CRC so a payload cannot be spliced onto
another frame's header.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_FRAME",
    "MAX_PAYLOAD",
    "TRAILER_SIZE",
    "VERSION",
    "DecoderStats",
    "Frame",
    "FrameDecoder",
    "FrameKind",
    "data_frames",
    "encode_frame",
    "sync_preamble",
]

MAGIC = b"\x9fUPD"
VERSION = 1
MAX_PAYLOAD = 16 * 1024
_HEADER = struct.Struct(">4sBBHII")
HEADER_SIZE = _HEADER.size + 4
TRAILER_SIZE = 4
MAX_FRAME = HEADER_SIZE + MAX_PAYLOAD + TRAILER_SIZE
_U32 = struct.Struct(">I")


class FrameKind(enum.IntEnum):
    OPEN = 1  # host -> guest: start session, reset the backend connection
    ACCEPT = 2  # guest -> host: the backend for this session is connected
    DATA = 3  # both ways: bytes of the session's stream
    CLOSE = 4  # both ways: the session is over (payload: a reason, UTF-8)


@dataclass(frozen=True)
class Frame:
    kind: FrameKind
    session: int
    payload: bytes = b""

    def __post_init__(self) -> None:
        if not 0 < self.session <= 0xFFFFFFFF:
            raise ValueError(f"session id must be a non-zero 32-bit number, not {self.session}")
        if len(self.payload) > MAX_PAYLOAD:
            raise ValueError(f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")


def encode_frame(frame: Frame) -> bytes:
    head = _HEADER.pack(MAGIC, VERSION, int(frame.kind), 0, frame.session, len(frame.payload))
    head_crc = zlib.crc32(head)
    return b"".join((head, _U32.pack(head_crc), frame.payload, _U32.pack(zlib.crc32(frame.payload, head_crc))))


def data_frames(session: int, data: bytes) -> list[bytes]:
    """Encoded DATA frames carrying `data`, split at MAX_PAYLOAD."""
    view = memoryview(data)
    return [
        encode_frame(Frame(FrameKind.DATA, session, bytes(view[i : i + MAX_PAYLOAD])))
        for i in range(0, len(data), MAX_PAYLOAD)
    ]


def sync_preamble() -> bytes:
    """Bytes a new host client sends before its first OPEN.

    A previous client may have died in the middle of a frame; the guest's
    decoder then waits for the rest of that frame's payload. MAX_FRAME zero
    bytes are enough to complete any such frame (its CRC then fails and the
    decoder rescans), and zeros contain no magic, so they are skipped.
    """
    return bytes(MAX_FRAME)


@dataclass
class DecoderStats:
    frames: int = 0
    # bytes skipped while looking for the next magic (garbage, stale tails)
    skipped_bytes: int = 0
    # candidate frames rejected: header CRC, unknown version/kind, bad length, payload CRC
    rejected_frames: int = 0


_KINDS = {int(k) for k in FrameKind}


class FrameDecoder:
    """Turns an untrusted byte stream into frames; never raises on bad input.

    Anything that is not a whole, checksummed frame is dropped and the
    decoder resynchronises on the next magic. Memory stays bounded: at most
    one MAX_FRAME plus the last `feed` is buffered.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.stats = DecoderStats()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        """Forget a partial frame (the stream it came from is gone)."""
        self.stats.skipped_bytes += len(self._buf)
        self._buf.clear()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        out: list[Frame] = []
        while (frame_or_wait := self._next()) is not None:
            if isinstance(frame_or_wait, Frame):
                out.append(frame_or_wait)
        return out

    def _skip(self, n: int) -> None:
        del self._buf[:n]
        self.stats.skipped_bytes += n

    def _next(self) -> Frame | bool | None:
        """One step: a frame, True (made progress, call again) or None (need more bytes)."""
        buf = self._buf
        start = buf.find(MAGIC)
        if start < 0:
            # keep a tail that may be the beginning of a magic split across feeds
            keep = min(len(buf), len(MAGIC) - 1)
            if len(buf) > keep:
                self._skip(len(buf) - keep)
            return None
        if start:
            self._skip(start)
        if len(buf) < HEADER_SIZE:
            return None
        _magic, version, kind, reserved, session, length = _HEADER.unpack_from(buf, 0)
        (head_crc,) = _U32.unpack_from(buf, _HEADER.size)
        if (
            zlib.crc32(memoryview(buf)[: _HEADER.size]) != head_crc
            or version != VERSION
            or kind not in _KINDS
            or reserved != 0
            or session == 0
            or length > MAX_PAYLOAD
        ):
            self._reject()
            return True
        end = HEADER_SIZE + length
        if len(buf) < end + TRAILER_SIZE:
            return None
        payload = bytes(buf[HEADER_SIZE:end])
        (crc,) = _U32.unpack_from(buf, end)
        if zlib.crc32(payload, head_crc) != crc:
            self._reject()
            return True
        del buf[: end + TRAILER_SIZE]
        self.stats.frames += 1
        return Frame(FrameKind(kind), session, payload)

    def _reject(self) -> None:
        # Drop only the magic's first byte: a real frame may start inside
        # what looked like this one (a truncated frame followed by a good one).
        self.stats.rejected_frames += 1
        self._skip(1)
