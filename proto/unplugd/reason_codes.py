"""Reason codes: the bare name people, the planner and the agent's Code use <-> the wire value.

The proto enum prefixes every value with REASON_CODE_ (buf's rule: enum values are unique across a
package), so MOUNTED travels as REASON_CODE_MOUNTED. This is the one place that knows the prefix.
"""

from __future__ import annotations

from unplugd.v1 import report_pb2

__all__ = ["PREFIX", "code_name", "code_value"]

PREFIX = "REASON_CODE_"


def code_name(value: report_pb2.ReasonCode.ValueType) -> str:
    """The bare name of a wire value (REASON_CODE_MOUNTED's number -> "MOUNTED"); ValueError if unknown."""
    return report_pb2.ReasonCode.Name(value).removeprefix(PREFIX)


def code_value(name: str) -> report_pb2.ReasonCode.ValueType:
    """The wire value of a bare name ("MOUNTED" -> REASON_CODE_MOUNTED's number); ValueError if unknown."""
    return report_pb2.ReasonCode.Value(PREFIX + name)
