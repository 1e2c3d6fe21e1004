"""A tiny in-test AgentService on a unix socket: answers depend on the request,
so a test can tell that each client got its own answer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import agent_service_pb2_grpc as pb_grpc
from unplugd.v1 import report_pb2

# GetReport(["slow"]) takes this long
SLOW_SECONDS = 1.0


def report_for(devices: list[str], hostname: str = "guest") -> report_pb2.Report:
    report = report_pb2.Report(hostname=hostname)
    for i, name in enumerate(devices or ["0000:00:02.0"]):
        report.functions.add(address=name, pci_path=f"0000:00/{i:02x}.0", state=report_pb2.FUNCTION_STATE_READY)
    return report


class FakeAgent(pb_grpc.AgentServiceServicer):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.leases: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def GetReport(self, request: pb.GetReportRequest, context: grpc.ServicerContext) -> pb.GetReportResponse:
        self.calls.append("GetReport")
        if "missing" in request.devices:
            context.abort(grpc.StatusCode.NOT_FOUND, "no PCI function matches 'missing'")
        if "slow" in request.devices:
            time.sleep(SLOW_SECONDS)
        return pb.GetReportResponse(report=report_for(list(request.devices)))

    def GetAgentInfo(self, request: pb.GetAgentInfoRequest, context: grpc.ServicerContext) -> pb.GetAgentInfoResponse:
        self.calls.append("GetAgentInfo")
        return pb.GetAgentInfoResponse(version="test", capabilities=["report", "watch"], hostname="guest")

    def WatchReport(
        self, request: pb.WatchReportRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchReportResponse]:
        self.calls.append("WatchReport")
        devices = list(request.devices)
        yield pb.WatchReportResponse(report=report_for(devices), changed=devices, initial=True)
        for n in range(3):
            time.sleep(0.05)
            report = report_for(devices)
            busy = n % 2 == 0
            report.functions[0].state = report_pb2.FUNCTION_STATE_BUSY if busy else report_pb2.FUNCTION_STATE_READY
            yield pb.WatchReportResponse(report=report, changed=[report.functions[0].address])

    def PrepareUnplug(
        self, request: pb.PrepareUnplugRequest, context: grpc.ServicerContext
    ) -> pb.PrepareUnplugResponse:
        self.calls.append("PrepareUnplug")
        if request.lease_seconds > 900:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "lease_seconds above 900")
        lease = f"lease-{len(self.leases) + 1}"
        self.leases[lease] = list(request.devices)
        return pb.PrepareUnplugResponse(
            lease_id=lease,
            functions=list(request.devices),
            interfaces_down=["eth1"] if request.take_interfaces_down else [],
        )

    def ReleaseUnplug(
        self, request: pb.ReleaseUnplugRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseUnplugResponse:
        self.calls.append("ReleaseUnplug")
        if self.leases.pop(request.lease_id, None) is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no lease {request.lease_id!r}")
        return pb.ReleaseUnplugResponse(released=True)

    def RequestRelease(
        self, request: pb.RequestReleaseRequest, context: grpc.ServicerContext
    ) -> pb.RequestReleaseResponse:
        # As a guest with the default configuration answers: release hooks are off.
        self.calls.append("RequestRelease")
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "RequestRelease is disabled; set [release] enabled = true")


def serve_fake_agent(path: Path) -> tuple[grpc.Server, FakeAgent]:
    agent = FakeAgent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_AgentServiceServicer_to_server(agent, server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    return server, agent
