"""The one exception -> status mapping."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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


@pytest.mark.parametrize(
    ("exc", "code"),
    [
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
    ],
)
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


# --------------------------------------------------------------------------- undecodable requests

_BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 (devices / lease_id), a string whose bytes are not UTF-8
_MALFORMED = b"\x0a\x7f\x01"  # field 1 claims 127 bytes and has 1


@pytest.mark.parametrize("payload", [_BAD_UTF8, _MALFORMED], ids=["invalid-utf8", "malformed"])
@pytest.mark.parametrize(
    ("method", "streaming"),
    [
        ("GetReport", False),
        ("WatchReport", True),
        ("ReleaseUnplug", False),
        ("PrepareUnplug", False),
    ],
)
def test_undecodable_request_is_invalid_argument_with_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, method: str, streaming: bool, payload: bytes
) -> None:
    """grpc itself would answer INTERNAL and log a traceback ("Exception deserializing request!")."""
    from tests.unit.rpc_fakes import running_server

    caplog.set_level(logging.DEBUG)
    with running_server(tmp_path, mutations=True) as (server, _):
        channel = grpc.insecure_channel(server.target)
        path = f"/unplugd.v1.AgentService/{method}"
        open_call = channel.unary_stream if streaming else channel.unary_unary
        call: Any = open_call(path, None, None)  # no (de)serializers: raw bytes both ways
        with pytest.raises(grpc.RpcError) as err:
            result = call(payload, timeout=5)
            if streaming:
                next(result)
        channel.close()
    error: Any = err.value  # a grpc.Call too; grpc-stubs does not say so
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid message" in error.details()
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a client's bad bytes"
    rejected = [r for r in caplog.records if r.getMessage() == "rejected an undecodable request"]
    assert len(rejected) == 1 and rejected[0].call == path  # type: ignore[attr-defined]


def test_a_valid_request_still_reaches_the_servicer(tmp_path: Path) -> None:
    from tests.unit.rpc_fakes import running_server
    from unplugd.v1 import agent_service_pb2 as pb

    with running_server(tmp_path) as (server, _):
        channel = grpc.insecure_channel(server.target)
        call: Any = channel.unary_unary("/unplugd.v1.AgentService/GetReport", None, None)
        data = call(pb.GetReportRequest(devices=["vdb"]).SerializeToString(), timeout=5)
        channel.close()
    assert [f.address for f in pb.GetReportResponse.FromString(data).report.functions] == ["0000:00:06.0"]
