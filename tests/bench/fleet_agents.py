"""Fake agents for the fleet section: one gRPC server on N unix sockets answering a canned report.

    python -m tests.bench.fleet_agents --dir DIR --count N --report REPORT.bin

DIR/agent-I.sock for I in 0..N-1 (the servicer of fake_fleet.py, without its QMP endpoints).
Prints "ready" once every socket listens; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from tests.bench.fake_fleet import _agent_server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()
    server = _agent_server([args.dir / f"agent-{i}.sock" for i in range(args.count)], args.report.read_bytes())
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop(0)
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(main())
