"""framing.py: round trips, and every kind of damage dropped with resynchronisation."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from unplugd.agent.transports.session import (
    CloseBackend,
    GuestSession,
    OpenBackend,
    SendFrame,
    ToBackend,
)
from unplugd.framing import (
    HEADER_SIZE,
    MAGIC,
    MAX_FRAME,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameKind,
    data_frames,
    encode_frame,
    sync_preamble,
)


def frames(*specs: tuple[FrameKind, int, bytes]) -> list[Frame]:
    return [Frame(k, s, p) for k, s, p in specs]


def feed_bytewise(decoder: FrameDecoder, data: bytes) -> list[Frame]:
    out: list[Frame] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    return out


SAMPLE = frames(
    (FrameKind.OPEN, 7, b""),
    (FrameKind.DATA, 7, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    (FrameKind.DATA, 7, bytes(range(256)) * 3),
    (FrameKind.DATA, 7, MAGIC * 10),  # payload that contains the magic
    (FrameKind.CLOSE, 7, b"bye"),
)
WIRE = b"".join(encode_frame(f) for f in SAMPLE)


def test_round_trip_in_one_feed() -> None:
    d = FrameDecoder()
    assert d.feed(WIRE) == SAMPLE
    assert d.buffered == 0
    assert d.stats.skipped_bytes == 0 and d.stats.rejected_frames == 0


def test_round_trip_byte_by_byte() -> None:
    assert feed_bytewise(FrameDecoder(), WIRE) == SAMPLE


def test_round_trip_random_splits() -> None:
    rng = random.Random(1)
    for _ in range(200):
        d, out, i = FrameDecoder(), [], 0
        while i < len(WIRE):
            n = rng.randint(1, 300)
            out += d.feed(WIRE[i : i + n])
            i += n
        assert out == SAMPLE


def test_max_payload_round_trip_and_limits() -> None:
    big = Frame(FrameKind.DATA, 1, b"x" * MAX_PAYLOAD)
    assert FrameDecoder().feed(encode_frame(big)) == [big]
    assert len(encode_frame(big)) == MAX_FRAME
    with pytest.raises(ValueError):
        Frame(FrameKind.DATA, 1, b"x" * (MAX_PAYLOAD + 1))
    with pytest.raises(ValueError):
        Frame(FrameKind.DATA, 0)
    with pytest.raises(ValueError):
        Frame(FrameKind.DATA, 1 << 32)


def test_data_frames_split_at_max_payload() -> None:
    data = bytes(random.Random(2).getrandbits(8) for _ in range(MAX_PAYLOAD * 2 + 5))
    got = FrameDecoder().feed(b"".join(data_frames(9, data)))
    assert [len(f.payload) for f in got] == [MAX_PAYLOAD, MAX_PAYLOAD, 5]
    assert b"".join(f.payload for f in got) == data
    assert data_frames(9, b"") == []


def test_every_single_bit_flip_is_caught_and_the_next_frame_survives() -> None:
    victim = encode_frame(Frame(FrameKind.DATA, 3, b"hello, agent"))
    after = Frame(FrameKind.DATA, 3, b"still here")
    for bit in range(len(victim) * 8):
        damaged = bytearray(victim)
        damaged[bit // 8] ^= 1 << (bit % 8)
        d = FrameDecoder()
        got = d.feed(bytes(damaged) + encode_frame(after))
        # a flip in the 4 magic bytes makes it garbage; anywhere else a checksum fails
        assert got == [after], f"bit {bit}"
        assert d.stats.rejected_frames + d.stats.skipped_bytes > 0


@pytest.mark.parametrize("cut", [1, 3, 4, 10, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 5, -1])
def test_truncated_frame_followed_by_good_frames(cut: int) -> None:
    victim = encode_frame(Frame(FrameKind.DATA, 3, b"y" * 100))[:cut]
    good = [Frame(FrameKind.OPEN, 4), Frame(FrameKind.DATA, 4, b"z" * 50)]
    d = FrameDecoder()
    got = d.feed(victim + b"".join(encode_frame(f) for f in good))
    if cut >= HEADER_SIZE or cut < 0:
        # The truncated frame's header is intact, so the decoder waits for its
        # 100-byte payload; the good frames complete it, its CRC fails, and it
        # rescans: they come out once enough bytes (a sync preamble) follow.
        got += d.feed(sync_preamble())
    assert got == good


def test_truncated_header_claiming_max_length_is_flushed_by_sync_preamble() -> None:
    head = encode_frame(Frame(FrameKind.DATA, 3, b"q" * MAX_PAYLOAD))[: HEADER_SIZE + 10]
    nxt = Frame(FrameKind.OPEN, 99)
    d = FrameDecoder()
    assert d.feed(head) == []
    assert d.feed(sync_preamble() + encode_frame(nxt)) == [nxt]


def test_garbage_between_frames() -> None:
    rng = random.Random(3)
    pieces, expected = [], []
    for i in range(50):
        pieces.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40))))
        if i % 7 == 0:
            pieces.append(MAGIC + b"\x01\x03")  # a fake start of a frame
        f = Frame(FrameKind.DATA, 5, f"frame {i}".encode())
        pieces.append(encode_frame(f))
        expected.append(f)
    assert FrameDecoder().feed(b"".join(pieces)) == expected


def _header(version: int = 1, kind: int = 3, reserved: int = 0, session: int = 1, length: int = 4) -> bytes:
    head = struct.pack(">4sBBHII", MAGIC, version, kind, reserved, session, length)
    return head + struct.pack(">I", zlib.crc32(head))


@pytest.mark.parametrize(
    "header",
    [
        _header(length=MAX_PAYLOAD + 1),
        _header(length=0xFFFFFFFF),
        _header(version=2),
        _header(kind=0),
        _header(kind=9),
        _header(reserved=1),
        _header(session=0),
    ],
    ids=["len+1", "huge-len", "version", "kind0", "kind9", "reserved", "session0"],
)
def test_well_checksummed_but_invalid_headers_are_rejected_without_waiting(header: bytes) -> None:
    good = Frame(FrameKind.DATA, 2, b"ok")
    d = FrameDecoder()
    # no payload follows: a decoder that believed the length would wait forever
    assert d.feed(header + encode_frame(good)) == [good]
    assert d.stats.rejected_frames >= 1


def test_payload_spliced_onto_another_header_is_rejected() -> None:
    a = encode_frame(Frame(FrameKind.DATA, 1, b"AAAA"))
    b = encode_frame(Frame(FrameKind.DATA, 2, b"BBBB"))
    spliced = a[:HEADER_SIZE] + b[HEADER_SIZE:]
    assert FrameDecoder().feed(spliced) == []


def test_magic_split_across_feeds_is_kept() -> None:
    f = Frame(FrameKind.CLOSE, 8)
    wire = b"junk" + encode_frame(f)
    d = FrameDecoder()
    assert d.feed(wire[:6]) == []  # b"junk" + first two magic bytes
    assert d.feed(wire[6:]) == [f]


def test_garbage_only_keeps_memory_bounded() -> None:
    d = FrameDecoder()
    rng = random.Random(4)
    for _ in range(100):
        d.feed(bytes(rng.getrandbits(8) for _ in range(1000)).replace(MAGIC[:1], b"\0"))
        assert d.buffered < len(MAGIC)


def test_random_corruption_never_raises_and_never_invents_frames() -> None:
    """Property: whatever is done to a stream, every frame out of it is one that went in."""
    rng = random.Random(5)
    originals = [
        Frame(FrameKind(rng.randint(1, 4)), rng.randint(1, 5), rng.randbytes(rng.randint(0, 200))) for _ in range(40)
    ]
    wire = bytearray(b"".join(encode_frame(f) for f in originals))
    for _ in range(300):
        damaged = bytearray(wire)
        for _ in range(rng.randint(1, 10)):
            op, pos = rng.randint(0, 2), rng.randrange(len(damaged))
            if op == 0:
                damaged[pos] ^= 1 << rng.randint(0, 7)
            elif op == 1:
                del damaged[pos : pos + rng.randint(1, 30)]
            else:
                damaged[pos:pos] = rng.randbytes(rng.randint(1, 30))
        got = FrameDecoder().feed(bytes(damaged) + sync_preamble())
        assert all(f in originals for f in got)
        # damage is local: most frames survive
        assert len(got) >= len(originals) - 20


def test_reset_forgets_partial_frame() -> None:
    d = FrameDecoder()
    d.feed(encode_frame(Frame(FrameKind.DATA, 1, b"abc"))[:-2])
    d.reset()
    f = Frame(FrameKind.OPEN, 2)
    assert d.feed(encode_frame(f)) == [f]


# -- the guest session state machine ------------------------------------


def test_session_open_accept_data_close() -> None:
    s = GuestSession()
    assert s.on_frame(Frame(FrameKind.OPEN, 1)) == [OpenBackend(1)]
    # data before the backend is up goes to the bridge's queue
    assert s.on_frame(Frame(FrameKind.DATA, 1, b"a")) == [ToBackend(b"a")]
    assert s.on_backend_connected(1) == [SendFrame(Frame(FrameKind.ACCEPT, 1))]
    assert s.on_frame(Frame(FrameKind.DATA, 1, b"b")) == [ToBackend(b"b")]
    assert s.on_frame(Frame(FrameKind.CLOSE, 1)) == [CloseBackend()]
    assert s.current is None


def test_session_repeated_open_is_acknowledged_not_reset() -> None:
    s = GuestSession()
    s.on_frame(Frame(FrameKind.OPEN, 1))
    assert s.on_frame(Frame(FrameKind.OPEN, 1)) == []  # not connected yet: ACCEPT comes when it is
    s.on_backend_connected(1)
    assert s.on_frame(Frame(FrameKind.OPEN, 1)) == [SendFrame(Frame(FrameKind.ACCEPT, 1))]


def test_new_session_supersedes_and_stale_frames_are_dropped() -> None:
    s = GuestSession()
    s.on_frame(Frame(FrameKind.OPEN, 1))
    s.on_backend_connected(1)
    assert s.on_frame(Frame(FrameKind.OPEN, 2)) == [OpenBackend(2)]
    # late bytes of session 1: dropped, the sender told once
    assert s.on_frame(Frame(FrameKind.DATA, 1, b"old")) == [SendFrame(Frame(FrameKind.CLOSE, 1, b"stale session"))]
    assert s.on_frame(Frame(FrameKind.DATA, 1, b"old")) == []
    assert s.on_frame(Frame(FrameKind.CLOSE, 1)) == []
    assert s.on_backend_connected(1) == []  # a late connection of session 1 is not accepted
    assert s.stale_frames == 3
    assert s.current == 2


def test_backend_failure_and_hangup_close_the_session() -> None:
    s = GuestSession()
    s.on_frame(Frame(FrameKind.OPEN, 5))
    assert s.on_backend_failed(5, "No such file") == [SendFrame(Frame(FrameKind.CLOSE, 5, b"No such file"))]
    assert s.current is None
    s.on_frame(Frame(FrameKind.OPEN, 6))
    s.on_backend_connected(6)
    acts = s.on_backend_closed(6)
    assert CloseBackend() in acts and SendFrame(Frame(FrameKind.CLOSE, 6, b"agent closed the connection")) in acts
    assert s.on_backend_closed(6) == []


def test_host_gone_and_accept_from_host_ignored() -> None:
    s = GuestSession()
    assert s.on_host_gone() == []
    s.on_frame(Frame(FrameKind.OPEN, 5))
    assert s.on_frame(Frame(FrameKind.ACCEPT, 5)) == []
    assert s.on_host_gone() == [CloseBackend()]
    assert s.current is None
