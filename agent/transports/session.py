"""The guest's side of the virtio-serial session protocol, as a pure state machine.

The bridge (virtio_serial.py) feeds it decoded frames and backend events and
carries out the actions it returns; keeping the decisions here makes every
rule of PROTOCOL.md testable without a port or a socket.
"""

from __future__ import annotations

from dataclasses import dataclass

from unplugd.framing import Frame, FrameKind

__all__ = [
    "CloseBackend",
    "GuestSession",
    "OpenBackend",
    "SendFrame",
    "ToBackend",
]


@dataclass(frozen=True)
class OpenBackend:
    """Close any backend connection, then connect a new one for `session`."""

    session: int


@dataclass(frozen=True)
class CloseBackend:
    pass


@dataclass(frozen=True)
class ToBackend:
    data: bytes


@dataclass(frozen=True)
class SendFrame:
    frame: Frame


Action = OpenBackend | CloseBackend | ToBackend | SendFrame


class GuestSession:
    """At most one session is live; the newest OPEN wins.

    The guest cannot see one host client leave and the next arrive, so a
    session ends when the host says CLOSE, when a new OPEN arrives, or when
    the backend hangs up. Frames of any other session are stale: dropped,
    answered once with CLOSE so a confused host learns its session is gone.
    """

    def __init__(self) -> None:
        self.current: int | None = None
        self.connected = False
        self.stale_frames = 0
        self._told_closed: set[int] = set()

    def on_frame(self, frame: Frame) -> list[Action]:
        kind, sid = frame.kind, frame.session
        if kind is FrameKind.OPEN:
            if sid == self.current:
                # the host retries OPEN until it sees ACCEPT; do not reset twice
                return [SendFrame(Frame(FrameKind.ACCEPT, sid))] if self.connected else []
            self.current, self.connected = sid, False
            self._told_closed.discard(sid)
            return [OpenBackend(sid)]
        if sid != self.current:
            self.stale_frames += 1
            if kind is FrameKind.DATA and sid not in self._told_closed:
                if len(self._told_closed) > 64:
                    self._told_closed.clear()
                self._told_closed.add(sid)
                return [SendFrame(Frame(FrameKind.CLOSE, sid, b"stale session"))]
            return []
        if kind is FrameKind.DATA:
            # bytes that arrive before the backend is connected are queued by the bridge
            return [ToBackend(frame.payload)] if frame.payload else []
        if kind is FrameKind.CLOSE:
            self.current, self.connected = None, False
            return [CloseBackend()]
        # ACCEPT travels guest -> host only
        self.stale_frames += 1
        return []

    def on_backend_connected(self, session: int) -> list[Action]:
        """The bridge's connection for `session` is up; a stale one it closes itself."""
        if session != self.current:
            return []
        self.connected = True
        return [SendFrame(Frame(FrameKind.ACCEPT, session))]

    def on_backend_failed(self, session: int, reason: str) -> list[Action]:
        if session != self.current:
            return []
        self.current, self.connected = None, False
        return [SendFrame(Frame(FrameKind.CLOSE, session, reason.encode()[:512]))]

    def on_backend_closed(self, session: int) -> list[Action]:
        """The backend (the agent's gRPC server) hung up on `session`."""
        if session != self.current:
            return []
        self.current, self.connected = None, False
        return [CloseBackend(), SendFrame(Frame(FrameKind.CLOSE, session, b"agent closed the connection"))]

    def on_host_gone(self) -> list[Action]:
        """The port reported the host side closed (read 0 / POLLHUP)."""
        if self.current is None:
            return []
        self.current, self.connected = None, False
        return [CloseBackend()]
