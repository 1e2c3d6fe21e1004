"""Many fake VMs in one process: QMP endpoints replaying a real QEMU's answers, and fake agents.

    python -m tests.bench.fake_fleet --dir DIR --count N --recording REC.json --report REPORT.bin

DIR/qmp-I.sock answers every QMP command with what a real QEMU answered to
the same command and arguments (REC.json, recorded by qmp_proxy.py in front
of a real QEMU); DIR/agent-I.sock is a gRPC AgentService whose GetReport
returns REPORT.bin (a GetReportResponse the real engine produced for a tree
with the same PCI layout). One gRPC server listens on all N agent sockets.
Prints "ready" once every socket listens; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from concurrent import futures
from pathlib import Path
from typing import Any

from tests.bench.qmp_proxy import json_messages


def _key(command: str, arguments: Any) -> str:
    return json.dumps([command, arguments or {}], sort_keys=True)


async def _qmp_endpoint(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rec: dict[str, Any]) -> None:
    writer.write(rec["greeting"].encode())
    await writer.drain()
    answers: dict[str, Any] = rec["answers"]
    async for _, msg in json_messages(reader):
        if not isinstance(msg, dict):
            continue
        command = msg.get("execute", "")
        key = _key(command, msg.get("arguments"))
        reply: dict[str, Any]
        if command == "qmp_capabilities":
            reply = {"return": {}}
        elif key in answers:
            reply = {"return": answers[key]}
        else:
            reply = {"error": {"class": "GenericError", "desc": f"not recorded: {key}"}}
        if "id" in msg:
            reply["id"] = msg["id"]
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()
    writer.close()


def _agent_server(paths: list[Path], report: bytes) -> Any:
    import grpc

    from unplugd.v1 import agent_service_pb2 as pb
    from unplugd.v1 import agent_service_pb2_grpc as pb_grpc

    canned = pb.GetReportResponse.FromString(report)

    # The base servicer answers UNIMPLEMENTED to what is not overridden; status needs only these.
    class FakeAgent(pb_grpc.AgentServiceServicer):
        def GetReport(self, request: Any, context: Any) -> Any:
            return canned

        def GetAgentInfo(self, request: Any, context: Any) -> Any:
            return pb.GetAgentInfoResponse(version="bench-fake", capabilities=["report"])

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_AgentServiceServicer_to_server(FakeAgent(), server)  # type: ignore[abstract]
    for path in paths:
        if not server.add_insecure_port(f"unix:{path}"):
            raise RuntimeError(f"cannot listen on {path}")
    server.start()
    return server


async def _serve(directory: Path, count: int, rec: dict[str, Any], report: bytes) -> None:
    agent = _agent_server([directory / f"agent-{i}.sock" for i in range(count)], report)
    servers = []
    for i in range(count):

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await _qmp_endpoint(r, w, rec)

        servers.append(await asyncio.start_unix_server(handle, path=str(directory / f"qmp-{i}.sock")))
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    print("ready", flush=True)
    try:
        await done.wait()
    finally:
        for s in servers:
            s.close()
        agent.stop(0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--recording", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()
    rec = json.loads(args.recording.read_text())
    asyncio.run(_serve(args.dir, args.count, rec, args.report.read_bytes()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
