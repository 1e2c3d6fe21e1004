"""The generated code must load on current PyPI protobuf/grpcio (host) and on
Debian 12's python3-protobuf 3.21 / python3-grpcio 1.51 (the guest package)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

ROUNDTRIP = r"""
import json, sys
import google.protobuf, grpc
from google.protobuf import json_format
from unplugd.v1 import report_pb2, agent_service_pb2, agent_service_pb2_grpc
r = report_pb2.Report(hostname="g")
f = r.functions.add(address="0000:00:06.1", pci_path="0000:00/06.1", state=report_pb2.FUNCTION_STATE_BUSY)
f.reasons.add(code=report_pb2.REASON_CODE_MOUNTED, detail="vdb1 on /data", blocking=True)
wire = agent_service_pb2.GetReportResponse(report=r).SerializeToString()
back = agent_service_pb2.GetReportResponse.FromString(wire)
assert back.report == r
assert hasattr(agent_service_pb2_grpc, "AgentServiceStub")
print(json.dumps({"protobuf": google.protobuf.__version__, "grpc": grpc.__version__,
                  "json": json.loads(json_format.MessageToJson(back.report))}))
"""


def _run(python: str) -> dict[str, object]:
    out = subprocess.run(
        [python, "-c", ROUNDTRIP],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / ".dev"), "PATH": "/usr/bin:/bin"},
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _check(result: dict[str, object]) -> None:
    fn = result["json"]["functions"][0]  # type: ignore[index]
    assert fn["pciPath"] == "0000:00/06.1"
    assert fn["state"] == "FUNCTION_STATE_BUSY"
    assert fn["reasons"][0]["code"] == "REASON_CODE_MOUNTED"


def test_loads_on_this_venv() -> None:
    import sys

    _check(_run(sys.executable))


def test_loads_on_debian_python3_protobuf() -> None:
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no Debian python3")
    probe = subprocess.run(["/usr/bin/python3", "-c", "import google.protobuf, grpc"], capture_output=True)
    if probe.returncode != 0:
        pytest.fail("Debian's python3-protobuf/python3-grpcio missing: `make dev` installs them")
    result = _run("/usr/bin/python3")
    # Debian 12 python3-protobuf 3.21.12 reports its Python runtime as 4.21.12
    assert str(result["protobuf"]).startswith("4.21"), result["protobuf"]
    assert str(result["grpc"]).startswith("1.51"), result["grpc"]
    _check(result)
