"""A fake engine and an in-process agent server for the rpc tests, and typed client helpers.

FakeEngine keeps a small inventory (a disk function and a NIC function) and
a per-function state the test can change; it records what the service
passes in (leased, own_claims) so tests can assert on it.

next_message, cancel, details and trailing_values type the few client calls
whose grpc-stubs declarations are narrower or looser than grpcio's runtime.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar, cast

import grpc

from unplugd.agent.config import Config, VirtioSerialConfig
from unplugd.agent.daemon.events import EventSources
from unplugd.agent.daemon.scans import EngineApi
from unplugd.agent.errors import UnknownDevice
from unplugd.agent.model import BlockDevice, Inventory, PciFunction
from unplugd.agent.roots import Roots
from unplugd.agent.rpc.server import AgentServer
from unplugd.pci import PciAddress, PciPath
from unplugd.v1 import agent_service_pb2_grpc, report_pb2

DISK_FN = PciAddress.parse("0000:00:06.0")
NIC_FN = PciAddress.parse("0000:00:07.0")


def _function(
    addr: PciAddress, *, block_devices: tuple[str, ...] = (), net_interfaces: tuple[str, ...] = ()
) -> PciFunction:
    return PciFunction(
        address=addr,
        path=PciPath(0, 0, ((addr.slot, addr.function),)),
        vendor_id=0x1AF4,
        device_id=0x1001,
        class_code=0x010000,
        driver="virtio-pci",
        is_bridge=False,
        hotplug_slot=str(addr.slot),
        block_devices=block_devices,
        net_interfaces=net_interfaces,
    )


@dataclass
class FakeEngine:
    inventory: Inventory = field(
        default_factory=lambda: Inventory(
            functions=(_function(DISK_FN, block_devices=("vdb",)), _function(NIC_FN, net_interfaces=("eth1",))),
            block_devices={
                "vdb": BlockDevice("vdb", "disk", (254, 16), 1 << 30),
                "vdb1": BlockDevice("vdb1", "part", (254, 17), 1 << 29, parent="vdb"),
            },
        )
    )
    states: dict[str, int] = field(
        default_factory=lambda: {
            str(DISK_FN): report_pb2.FUNCTION_STATE_READY,
            str(NIC_FN): report_pb2.FUNCTION_STATE_BUSY,
        }
    )
    fail_with: Exception | None = None
    calls: list[tuple[str, object]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def scan(self, roots: Roots, *, own_claims: Collection[str] = ()) -> Inventory:
        self._record("scan", frozenset(own_claims))
        return self.inventory

    def inspect(
        self,
        roots: Roots,
        devices: Sequence[str] = (),
        *,
        leased: Mapping[PciAddress, str] = {},
        own_claims: Collection[str] = (),
    ) -> report_pb2.Report:
        self._record("inspect", (tuple(devices), dict(leased), frozenset(own_claims)))
        chosen = {str(f.address) for f in self.select(self.inventory, devices)}
        report = report_pb2.Report(hostname="fake")
        with self.lock:
            states = dict(self.states)
        for fn in self.inventory.functions:
            if str(fn.address) not in chosen:
                continue
            f = report.functions.add(address=str(fn.address), pci_path=str(fn.path), state=states[str(fn.address)])
            if fn.address in leased:
                f.reasons.add(
                    code=report_pb2.REASON_CODE_LEASED, detail=f"leased by {leased[fn.address]}", blocking=False
                )
            report.slots.add(address=fn.address.slot_key, functions=[str(fn.address)])
        return report

    def select(self, inventory: Inventory, names: Sequence[str]) -> list[PciFunction]:
        if self.fail_with is not None:
            raise self.fail_with
        if not names:
            return list(inventory.functions)
        out = []
        for name in names:
            match = [
                f
                for f in inventory.functions
                if name in (str(f.address), str(f.path)) or name in f.block_devices or name in f.net_interfaces
            ]
            if not match:
                raise UnknownDevice(name)
            out += [f for f in match if f not in out]
        return out

    def functions(self, roots: Roots) -> report_pb2.Report:
        self._record("functions", None)
        report = report_pb2.Report(hostname="fake")
        for fn in self.inventory.functions:
            report.functions.add(address=str(fn.address), pci_path=str(fn.path))
        return report

    def set_state(self, addr: PciAddress, state: int) -> None:
        with self.lock:
            self.states[str(addr)] = state

    def _record(self, what: str, arg: object) -> None:
        with self.lock:
            self.calls.append((what, arg))

    def count(self, what: str) -> int:
        with self.lock:
            return sum(1 for name, _ in self.calls if name == what)


class FakeLinks:
    def __init__(self, up: Collection[str] = ("eth1",)) -> None:
        self.up = set(up)
        self.log: list[tuple[str, bool]] = []

    def is_up(self, name: str) -> bool:
        return name in self.up

    def set_up(self, name: str, up: bool) -> None:
        self.log.append((name, up))
        (self.up.add if up else self.up.discard)(name)


@contextmanager
def running_server(
    tmp_path: Path,
    engine: EngineApi | None = None,
    *,
    mutations: bool = False,
    links: FakeLinks | None = None,
    config: Config | None = None,
    report_json: Callable[[], bytes] | None = None,
) -> Iterator[tuple[AgentServer, agent_service_pb2_grpc.AgentServiceStub]]:
    if config is None:
        # The virtio-serial bridge is on by default; these servers serve a captured tree, not this machine's port.
        no_serial = replace(Config().transports, virtio_serial=VirtioSerialConfig(enabled=False))
        config = replace(Config(), transports=no_serial)
    cfg = config.with_overrides(socket=tmp_path / "run" / "agent.sock", enable_mutations=mutations)
    # A captured-tree root: nothing here can touch the live system's devices.
    server = AgentServer(
        cfg,
        roots=Roots.under(tmp_path / "tree"),
        engine=engine or FakeEngine(),
        sources=EventSources.none,
        links=links or FakeLinks(),
        report_json=report_json,
    )
    server.start()
    channel = grpc.insecure_channel(server.target)
    try:
        yield server, agent_service_pb2_grpc.AgentServiceStub(channel)
    finally:
        channel.close()
        server.stop(grace=0.2)


# -- client calls, typed at the grpc-stubs boundary -----------------------------------------

T = TypeVar("T")


def next_message(stream: grpc.CallIterator[T]) -> T:
    """The stream's next message (StopIteration at its end, RpcError on a failed call).

    grpc-stubs declares CallIterator with __iter__ only; grpcio's call object is its own
    iterator (__iter__ returns self), so iter() goes on where the stream is, it does not restart.
    """
    return next(iter(stream))


def cancel(call: grpc.RpcContext) -> None:
    """Cancel a client call."""
    # grpc-stubs leaves RpcContext.cancel unannotated (an untyped call under --strict);
    # grpcio's returns whether it cancelled, which no test here needs.
    cast("Callable[[], object]", call.cancel)()


def details(err: grpc.RpcError) -> str:
    """The status message of a failed call; every status this server sends carries one."""
    text = err.details()
    assert text is not None, f"{err.code()} without details"
    return text


def trailing_values(err: grpc.RpcError, key: str) -> list[str]:
    """The text values of a failed call's trailing metadata under `key`, in order."""
    # grpc-stubs types RpcError.trailing_metadata() as _Metadatum with bytes values; grpcio's
    # items are (key, value) pairs, value a str for keys without the "-bin" suffix: grpc.Metadata.
    pairs = cast("grpc.Metadata", err.trailing_metadata())
    values = []
    for k, v in pairs:
        if k == key:
            assert isinstance(v, str), (k, v)
            values.append(v)
    return values
