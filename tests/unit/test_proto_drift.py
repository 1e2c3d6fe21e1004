"""Generated protobuf code is committed; it must match what proto/generate.py makes now."""

from __future__ import annotations

import os
import runpy
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.vm.image import cache_dir

GENERATED = REPO / "proto" / "unplugd" / "v1"
GENERATOR = REPO / "proto" / "generate.py"


def protoc_python() -> Path:
    """The tools venv's python: the Makefile's (UNPLUGD_PROTOC_PYTHON), else where `make protoc-venv` puts it."""
    named = os.environ.get("UNPLUGD_PROTOC_PYTHON")
    if named:
        return Path(named)
    tools = runpy.run_path(str(GENERATOR))["REQUIRED_TOOLS"]
    return cache_dir() / f"protoc-venv-{tools}" / "bin" / "python"


def test_generated_code_is_current(tmp_path: Path) -> None:
    python = protoc_python()
    if not python.exists():
        pytest.fail(f"no grpcio-tools venv at {python}: run `make protoc-venv` (part of `make dev`), then this test")
    env = dict(os.environ, PATH=f"{Path(python).parent}:{os.environ['PATH']}")
    subprocess.run([python, str(GENERATOR), "--out", str(tmp_path)], check=True, env=env)
    fresh = sorted(p.relative_to(tmp_path / "unplugd" / "v1") for p in (tmp_path / "unplugd" / "v1").iterdir())
    committed = sorted(p.relative_to(GENERATED) for p in GENERATED.glob("*_pb2*"))
    assert fresh == committed, "generated file set differs: run `make proto`"
    stale = [str(n) for n in fresh if (tmp_path / "unplugd" / "v1" / n).read_bytes() != (GENERATED / n).read_bytes()]
    assert not stale, f"stale generated code {stale}: run `make proto` and commit"
