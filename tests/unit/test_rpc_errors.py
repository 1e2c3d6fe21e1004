"""The one exception -> status mapping."""

from __future__ import annotations

import logging

import grpc
import pytest

from unplugd.agent.errors import (
    ClaimConflict,
    InvalidArgument,
    LeaseNotFound,
    MutationDisabled,
    NotPermitted,
    ParseError,
    ReadError,
    UnknownDevice,
    Vanished,
)
from unplugd.agent.rpc.errors import REASON_METADATA_KEY, status_for


@pytest.mark.parametrize(("exc", "code"), [
    (UnknownDevice("vdz"), grpc.StatusCode.NOT_FOUND),
    (LeaseNotFound(), grpc.StatusCode.NOT_FOUND),
    (MutationDisabled("PrepareUnplug"), grpc.StatusCode.PERMISSION_DENIED),
    (ClaimConflict("cannot prepare", ["vdb: busy"]), grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError("not a PCI address"), grpc.StatusCode.INVALID_ARGUMENT),
    (ReadError("/sys/x", "I/O error"), grpc.StatusCode.UNAVAILABLE),
    (Vanished("/proc/1", "gone"), grpc.StatusCode.UNAVAILABLE),
    (NotPermitted("/proc/1/fd", "denied"), grpc.StatusCode.UNAVAILABLE),
    (ParseError("mountinfo", "short line"), grpc.StatusCode.UNAVAILABLE),
    (RuntimeError("bug"), grpc.StatusCode.INTERNAL),
    (AttributeError("bug"), grpc.StatusCode.INTERNAL),
])
def test_mapping(exc: Exception, code: grpc.StatusCode) -> None:
    assert status_for(exc).code == code


def test_claim_conflict_carries_reasons_as_ascii_metadata() -> None:
    status = status_for(ClaimConflict("cannot prepare", ["vdb: in use", "vdc: mounted on /d\u00e9j\u00e0\n"]))
    assert "vdb: in use" in status.message and "vdc" in status.message
    assert [k for k, _ in status.metadata] == [REASON_METADATA_KEY] * 2
    assert all(v.isascii() and "\n" not in v for _, v in status.metadata)


def test_internal_errors_are_logged_without_details_to_the_client(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="unplugd.agent.rpc.errors"):
        status = status_for(KeyError("secret-internal-state"), call="GetReport")
    assert "secret-internal-state" not in status.message
    assert "KeyError" in status.message
    assert caplog.records and caplog.records[0].exc_info is not None
