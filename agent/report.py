"""Model + verdicts -> Report message: the one place protobuf meets the model.

The mapping itself is reportdata.py's (plain data, no protobuf: what `unplugd inspect --json`
prints); here it becomes the message the agent serves. Also protobuf's own JSON of a message,
written so it works on Debian 12's python3-protobuf 3.21 as well as on current PyPI protobuf.
json_format is imported only by the JSON functions: the agent and the table output never need
it (it pulls in text_format and friends: ~2 MiB and ~15 ms on Debian's protobuf).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from unplugd.agent.model import Inventory
from unplugd.agent.readiness.reasons import FunctionVerdict
from unplugd.agent.reportdata import Data, report_data, worst
from unplugd.v1 import report_pb2

__all__ = ["build_report", "from_data", "report_from_json", "state_name", "to_json", "worst"]


def state_name(state: int) -> str:
    """FUNCTION_STATE_BUSY -> 'BUSY'."""
    return report_pb2.FunctionState.Name(state).removeprefix("FUNCTION_STATE_")  # type: ignore[arg-type]


def build_report(inventory: Inventory, verdicts: Sequence[FunctionVerdict]) -> report_pb2.Report:
    """The Report for the functions that have a verdict, in inventory order."""
    return from_data(report_data(inventory, verdicts))


def from_data(data: Data) -> report_pb2.Report:
    """The message of reportdata's dict; ValueError names a field or enum label the proto lacks."""
    return report_pb2.Report(**data)


@functools.cache
def _json_kwargs() -> dict[str, bool]:
    # Fields at their default (blocking: false, admin_up: false) must still be
    # printed. protobuf 3.21 (Debian 12) calls that including_default_value_fields;
    # 5.26 renamed it always_print_fields_with_no_presence and 6.x dropped the old name.
    import inspect

    from google.protobuf import json_format

    params = inspect.signature(json_format.MessageToJson).parameters
    if "always_print_fields_with_no_presence" in params:
        return {"always_print_fields_with_no_presence": True}
    return {"including_default_value_fields": True}


def to_json(report: report_pb2.Report, *, indent: int | None = 2) -> str:
    """The canonical JSON mapping (lowerCamelCase names, enum names as strings)."""
    from google.protobuf import json_format

    kwargs: Any = _json_kwargs()
    return json_format.MessageToJson(report, indent=indent, **kwargs)


def report_from_json(text: str) -> report_pb2.Report:
    """Parse what to_json wrote (tests and recorded verdicts use it)."""
    from google.protobuf import json_format

    report = report_pb2.Report()
    json_format.Parse(text, report)
    return report
