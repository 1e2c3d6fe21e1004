"""Reason codes: bare names <-> wire values, the contract's one home of the REASON_CODE_ prefix."""

from __future__ import annotations

import pytest

from unplugd.agent.readiness.reasons import Code
from unplugd.reason_codes import code_name, code_value
from unplugd.v1 import report_pb2


def test_bare_names_map_to_the_proto_values() -> None:
    assert code_value("MOUNTED") == report_pb2.REASON_CODE_MOUNTED
    assert code_name(report_pb2.REASON_CODE_OPEN_BY_PROCESS) == "OPEN_BY_PROCESS"


@pytest.mark.parametrize("code", list(Code))
def test_every_agent_code_travels_and_comes_back(code: Code) -> None:
    assert code_name(code_value(code.value)) == code.value


@pytest.mark.parametrize("name", ["REASON_CODE_MOUNTED", "mounted", "NO_SUCH_CODE", ""])
def test_unknown_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        code_value(name)


def test_a_wire_value_from_a_newer_peer_reads_as_its_number() -> None:
    assert code_name(report_pb2.ReasonCode.ValueType(9999)) == "CODE_9999"
