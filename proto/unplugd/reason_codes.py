"""Reason codes: the bare name people, the planner and the agent's Code use <-> the wire value.

The proto enum prefixes every value with REASON_CODE_ (buf's rule: enum values are unique across a
package), so MOUNTED travels as REASON_CODE_MOUNTED. This is the one place that knows the prefix.
"""

from __future__ import annotations

from unplugd.v1 import report_pb2

__all__ = ["PREFIX", "code_name", "code_value"]

PREFIX = "REASON_CODE_"


def code_name(value: report_pb2.ReasonCode.ValueType) -> str:
    """The bare name of a wire value (REASON_CODE_MOUNTED's number -> "MOUNTED").

    A number this side does not know comes from a newer peer (proto3 enums are open, so it arrives
    intact): it reads as "CODE_<n>" rather than failing the whole report; the reason's own
    `blocking` flag still says whether it blocks.
    """
    try:
        return report_pb2.ReasonCode.Name(value).removeprefix(PREFIX)
    except ValueError:
        return f"CODE_{int(value)}"


def code_value(name: str) -> report_pb2.ReasonCode.ValueType:
    """The wire value of a bare name ("MOUNTED" -> REASON_CODE_MOUNTED's number); ValueError if unknown."""
    return report_pb2.ReasonCode.Value(PREFIX + name)
