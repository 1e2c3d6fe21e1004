"""Generated protobuf code is committed; it must match what proto/generate.py makes now."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

GENERATED = REPO / "proto" / "unplugd" / "v1"


def test_generated_code_is_current(tmp_path: Path) -> None:
    python = os.environ.get("UNPLUGD_PROTOC_PYTHON")
    if not python or not Path(python).exists():
        pytest.skip("run through `make test`: it provides the grpcio-tools 1.51.3 venv")
    env = dict(os.environ, PATH=f"{Path(python).parent}:{os.environ['PATH']}")
    subprocess.run([python, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)], check=True, env=env)
    fresh = sorted(p.relative_to(tmp_path / "unplugd" / "v1") for p in (tmp_path / "unplugd" / "v1").iterdir())
    committed = sorted(p.relative_to(GENERATED) for p in GENERATED.glob("*_pb2*"))
    assert fresh == committed, "generated file set differs: run `make proto`"
    stale = [str(n) for n in fresh if (tmp_path / "unplugd" / "v1" / n).read_bytes() != (GENERATED / n).read_bytes()]
    assert not stale, f"stale generated code {stale}: run `make proto` and commit"
