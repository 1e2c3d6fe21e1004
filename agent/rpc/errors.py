"""The one mapping from exceptions to gRPC status codes.

    UnknownDevice, LeaseNotFound      -> NOT_FOUND
    MutationDisabled                  -> PERMISSION_DENIED
    ClaimConflict                     -> FAILED_PRECONDITION (reasons in the message
                                         and as `unplugd-reason` trailing metadata)
    InvalidArgument, ValueError       -> INVALID_ARGUMENT
    ReadError, ParseError             -> UNAVAILABLE (the system changed or could not be
                                         read; asking again may work)
    WatchStopped                      -> UNAVAILABLE (the watcher died; watch again)
    anything else                     -> INTERNAL (logged with its traceback)

The servicer never lets an exception escape: a bad request or a vanished
device ends that call, not the server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from unplugd.agent.errors import (
    ClaimConflict,
    InvalidArgument,
    LeaseNotFound,
    MutationDisabled,
    ParseError,
    ReadError,
    UnknownDevice,
    WatchStopped,
)

__all__ = ["REASON_METADATA_KEY", "RpcStatus", "status_for"]

log = logging.getLogger(__name__)

REASON_METADATA_KEY = "unplugd-reason"


@dataclass(frozen=True)
class RpcStatus:
    code: grpc.StatusCode
    message: str
    # Trailing metadata: one ("unplugd-reason", text) per claim conflict reason.
    metadata: tuple[tuple[str, str], ...] = ()


def status_for(exc: BaseException, *, call: str = "") -> RpcStatus:
    """The status a failed call ends with; unexpected errors are logged here."""
    if isinstance(exc, UnknownDevice | LeaseNotFound):
        return RpcStatus(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, MutationDisabled):
        return RpcStatus(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    if isinstance(exc, ClaimConflict):
        meta = tuple((REASON_METADATA_KEY, _metadata_safe(r)) for r in exc.reasons)
        return RpcStatus(grpc.StatusCode.FAILED_PRECONDITION, str(exc), meta)
    if isinstance(exc, InvalidArgument | ValueError):
        return RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, str(exc) or type(exc).__name__)
    if isinstance(exc, ReadError | ParseError):
        log.warning("call failed reading system state", extra={"call": call, "error": str(exc)})
        return RpcStatus(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, WatchStopped):
        return RpcStatus(grpc.StatusCode.UNAVAILABLE, str(exc))
    log.error("internal error", exc_info=exc, extra={"call": call})
    return RpcStatus(grpc.StatusCode.INTERNAL, f"internal error in the agent ({type(exc).__name__}); see its log")


def _metadata_safe(text: str) -> str:
    # ASCII-only metadata values: anything else would fail the whole response.
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\n", " ")[:1024]
