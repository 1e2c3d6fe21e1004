"""The one mapping from exceptions to gRPC status codes.

    UnknownDevice, LeaseNotFound      -> NOT_FOUND
    MutationDisabled                  -> PERMISSION_DENIED
    ClaimConflict                     -> FAILED_PRECONDITION (reasons in the message
                                         and as `unplugd-reason` trailing metadata)
    ReleaseInProgress                 -> FAILED_PRECONDITION (another RequestRelease runs hooks)
    InvalidArgument, ValueError       -> INVALID_ARGUMENT
    ReadError, ParseError             -> UNAVAILABLE (the system changed or could not be
                                         read; asking again may work)
    WatchStopped                      -> UNAVAILABLE (the watcher died; watch again)
    anything else                     -> INTERNAL (logged with its traceback)

A request that does not parse (a malformed message, a string field that is not
valid UTF-8) never reaches the servicer: grpc would answer it with INTERNAL and
log a traceback. DecodeGuard answers it with INVALID_ARGUMENT and one log line.

The servicer never lets an exception escape: a bad request or a vanished
device ends that call, not the server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from unplugd.agent.errors import (
    ClaimConflict,
    InvalidArgument,
    LeaseNotFound,
    MutationDisabled,
    ParseError,
    ReadError,
    ReleaseInProgress,
    UnknownDevice,
    WatchStopped,
)

__all__ = ["REASON_METADATA_KEY", "DecodeGuard", "RpcStatus", "guard_registered", "reject_undecodable", "status_for"]

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # grpc-stubs makes these generic; grpc itself does not
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Generic = grpc.GenericRpcHandler[Any, Any]

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
    if isinstance(exc, ReleaseInProgress):
        return RpcStatus(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
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


# --------------------------------------------------------------------------- undecodable requests


class _Undecodable:
    """What a request that does not parse becomes, so that the call, not grpc, answers it."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError; whatever else a parser raises is the same news
            return _Undecodable(str(exc) or type(exc).__name__)

    return parse


def _refusing(behavior: Callable[[Any, grpc.ServicerContext], Any], method: str) -> Callable[..., Any]:
    def run(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            log.warning("rejected an undecodable request", extra={"call": method, "error": request.error})
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request to {method} is not a valid message (malformed, or a string that is not UTF-8)",
            )
        return behavior(request, context)

    return run


def reject_undecodable(handler: _Handler, method: str) -> _Handler:
    """The same handler, answering a request that does not parse with INVALID_ARGUMENT.

    Only unary requests (every AgentService call): a streamed request is parsed message
    by message inside grpc's iterator, where no handler can step in.
    """
    if handler.request_streaming or handler.request_deserializer is None:
        return handler
    kind = "unary_stream" if handler.response_streaming else "unary_unary"
    # grpc's RpcMethodHandler is a namedtuple (1.51 on Debian 12 as on current PyPI)
    replaced: _Handler = handler._replace(  # type: ignore[attr-defined]
        request_deserializer=_tolerant(handler.request_deserializer),
        **{kind: _refusing(getattr(handler, kind), method)},
    )
    return replaced


class DecodeGuard(grpc.GenericRpcHandler):  # type: ignore[type-arg,unused-ignore]
    """A generic handler whose methods answer undecodable requests with INVALID_ARGUMENT."""

    def __init__(self, inner: _Generic) -> None:
        self._inner = inner
        self._handlers: dict[str, _Handler | None] = {}  # one wrapping per method, not per call

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> _Handler | None:
        method: str = handler_call_details.method
        if method not in self._handlers:
            found = self._inner.service(handler_call_details)
            self._handlers[method] = None if found is None else reject_undecodable(found, method)
        return self._handlers[method]


def guard_registered(service: str, handlers: Mapping[str, _Handler]) -> dict[str, _Handler]:
    """add_registered_method_handlers' form (code generated by grpcio-tools >= 1.62)."""
    return {name: reject_undecodable(h, f"/{service}/{name}") for name, h in handlers.items()}
