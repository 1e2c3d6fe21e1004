#!/usr/bin/env python3
"""Generate the Python code for proto/unplugd/v1/*.proto.

The one way generated code is made. It must run under grpcio-tools 1.51.3:
code from newer generators checks the protobuf runtime version at import and
refuses Debian 12's python3-protobuf 3.21, which the guest package uses.

    python proto/generate.py [--out DIR]

Without --out the files are written next to the .proto sources, where the
package imports them; tests/unit/test_proto_drift.py regenerates into a
temporary directory and fails if the committed files differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REQUIRED_TOOLS = "1.51.3"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    args = parser.parse_args()
    try:
        from importlib.metadata import version

        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit("grpcio-tools is not installed; run `make proto` (it builds the tools venv)")
    found = version("grpcio-tools")
    if found != REQUIRED_TOOLS:
        sys.exit(f"grpcio-tools {found} found, {REQUIRED_TOOLS} required (see the docstring)")
    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("unplugd/v1/*.proto"))
    out = str(args.out)
    argv = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    rc = protoc.main(argv)
    if rc != 0:
        sys.exit(f"protoc failed with exit code {rc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
