"""Model + verdicts -> Report message, and its JSON on this venv's protobuf and Debian's 3.21."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fixtures.model_builders import OTHER_NS, disk, fn, iface, inventory, mount, part, v4
from unplugd.agent.model import DeviceNode, ScanProblem
from unplugd.agent.readiness.policy import evaluate
from unplugd.agent.readiness.reasons import Code, FunctionVerdict, ProcessRef, Reason, State
from unplugd.agent.report import build_report, from_data, report_from_json, state_name, to_json, worst
from unplugd.agent.reportdata import Data, keep_functions, report_data
from unplugd.v1 import report_pb2

VDB = fn("0000:00:06.0", block=["vdb"], nodes=[DeviceNode("/dev/vdb", (252, 16), "block")])
VDC = fn("0000:00:06.1", block=["vdc"], hotplug=None)
ETH1 = fn("0000:00:08.0", nets=["eth1"])
BLOCK = [disk("vdb", (252, 16)), part("vdb1", (252, 17), "vdb"), disk("vdc", (252, 32))]


def report_for(**kw: object) -> report_pb2.Report:
    return from_data(data_for(**kw))


def data_for(**kw: object) -> Data:
    inv = inventory(
        [VDB, VDC, ETH1],
        block=BLOCK,
        mounts=[
            mount((252, 17), "/data", "/dev/vdb1", ns=OTHER_NS, ns_pid=9, mount_id=200),
            mount((252, 17), "/mnt", "/dev/vdb1", mount_id=100),
        ],
        ifaces=[iface("eth1", addrs=[v4("192.0.2.5")])],
        problems=[ScanProblem("/proc/9/fd", "Permission denied", ("devno:1:1",))],
        **kw,  # type: ignore[arg-type]
    )
    return report_data(inv, evaluate(inv))


def test_every_code_has_a_proto_value_and_back() -> None:
    names = report_pb2.ReasonCode.keys()
    proto = {n.removeprefix("REASON_CODE_") for n in names} - {"UNSPECIFIED"}
    assert proto == {c.value for c in Code}


def test_function_fields() -> None:
    r = report_for()
    f = r.functions[0]
    assert (f.address, f.pci_path, f.slot, f.slot_path) == ("0000:00:06.0", "0000:00/06.0", "0000:00:06", "0000:00/06")
    assert (f.vendor_id, f.device_id, f.class_code, f.driver) == ("1af4", "1042", "010000", "virtio-pci")
    assert f.state == report_pb2.FUNCTION_STATE_BUSY
    assert f.hotplug_slot == "6"
    assert [b.name for b in f.block_devices] == ["vdb", "vdb1"]
    vdb1 = f.block_devices[1]
    assert (vdb1.kind, vdb1.devno, vdb1.parent) == ("part", "252:17", "vdb")
    assert list(vdb1.mount_points) == ["/mnt", "/data"]  # own namespace first
    assert [(n.path, n.devno, n.type) for n in f.device_nodes] == [("/dev/vdb", "252:16", "block")]


def test_reasons_keep_their_objects() -> None:
    inv = inventory([VDB], block=BLOCK)
    reason = Reason(
        Code.OPEN_BY_PROCESS,
        "pid 5 (dd) holds /dev/vdb (fd 3)",
        object="/dev/vdb",
        chain=("vdb",),
        processes=(ProcessRef(5, "dd", ("/dev/vdb (fd 3)",)),),
        addresses=("192.0.2.1/24",),
        mount_point="/x",
    )
    v = FunctionVerdict(VDB.address, VDB.path, State.BUSY, (reason,))
    msg = build_report(inv, [v]).functions[0].reasons[0]
    assert msg.code == report_pb2.REASON_CODE_OPEN_BY_PROCESS
    assert (msg.detail, msg.blocking, msg.object, msg.mount_point) == (reason.detail, True, "/dev/vdb", "/x")
    assert list(msg.chain) == ["vdb"] and list(msg.addresses) == ["192.0.2.1/24"]
    proc = msg.processes[0]
    assert (proc.pid, proc.command, list(proc.fds)) == (5, "dd", ["/dev/vdb (fd 3)"])


def test_slots_group_functions_and_take_the_worst_state() -> None:
    r = report_for()
    slots = {s.address: s for s in r.slots}
    assert list(slots["0000:00:06"].functions) == ["0000:00:06.0", "0000:00:06.1"]
    assert slots["0000:00:06"].state == report_pb2.FUNCTION_STATE_BUSY
    assert slots["0000:00:06"].hotplug_slot == "6"
    assert slots["0000:00:08"].state == report_pb2.FUNCTION_STATE_BUSY


def test_report_header_and_problems() -> None:
    r = report_for()
    assert (r.hostname, r.kernel, r.from_capture) == ("guest", "6.1.0", False)
    assert r.agent_version
    assert r.generated_at.seconds > 0
    assert [(p.object, p.detail) for p in r.problems] == [("/proc/9/fd", "Permission denied")]


def test_net_interface_message() -> None:
    eth1 = report_for().functions[2].net_interfaces[0]
    assert (eth1.name, eth1.admin_up, eth1.operstate, eth1.carrier) == ("eth1", True, "up", True)
    assert list(eth1.addresses) == ["192.0.2.5/24"]


def test_keep_functions_keeps_whole_slots() -> None:
    r = from_data(keep_functions(data_for(), {"0000:00:06.1"}))
    assert [f.address for f in r.functions] == ["0000:00:06.1"]
    assert [s.address for s in r.slots] == ["0000:00:06"]
    assert list(r.slots[0].functions) == ["0000:00:06.0", "0000:00:06.1"]
    assert r.slots[0].state == report_pb2.FUNCTION_STATE_BUSY  # the sibling's state still counts


def test_json_is_canonical_and_prints_defaults() -> None:
    data = json.loads(to_json(report_for()))
    f = data["functions"][1]
    assert set(f) >= {"address", "pciPath", "state", "reasons"}
    assert f["state"] == "FUNCTION_STATE_BUSY"
    hp = f["reasons"][0]
    assert hp["code"] == "REASON_CODE_NO_HOTPLUG_DRIVER" and hp["blocking"] is True
    assert data["functions"][0]["isBridge"] is False  # a default value, still printed
    assert report_from_json(to_json(report_for())).functions[0].address == "0000:00:06.0"


def test_warning_prints_blocking_false() -> None:
    inv = inventory([VDB], block=BLOCK)
    v = FunctionVerdict(VDB.address, VDB.path, State.READY, (Reason(Code.LEASED, "lease", blocking=False),))
    reason = json.loads(to_json(build_report(inv, [v])))["functions"][0]["reasons"][0]
    assert reason["blocking"] is False


@pytest.mark.parametrize(
    ("states", "expected"),
    [((), State.READY), ((State.READY, State.UNKNOWN), State.UNKNOWN), ((State.BUSY, State.UNKNOWN), State.BUSY)],
)
def test_worst(states: tuple[State, ...], expected: State) -> None:
    assert worst(states) is expected


def test_state_name() -> None:
    assert state_name(report_pb2.FUNCTION_STATE_UNKNOWN) == "UNKNOWN"


DEBIAN_JSON = r"""
import json, google.protobuf
from unplugd.agent.report import to_json
from unplugd.v1 import report_pb2
r = report_pb2.Report()
f = r.functions.add(address="0000:00:06.0", pci_path="0000:00/06.0", state=report_pb2.FUNCTION_STATE_READY)
f.reasons.add(code=report_pb2.REASON_CODE_LEASED, detail="lease", blocking=False)
print(json.dumps({"protobuf": google.protobuf.__version__, "json": json.loads(to_json(r))}))
"""


def test_json_on_debian_python3_protobuf() -> None:
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no Debian python3")
    out = subprocess.run(
        ["/usr/bin/python3", "-c", DEBIAN_JSON],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / ".dev"), "PATH": "/usr/bin:/bin"},
    )
    result = json.loads(out.stdout)
    assert result["protobuf"].startswith("4.21")
    reason = result["json"]["functions"][0]["reasons"][0]
    assert reason == {"code": "REASON_CODE_LEASED", "detail": "lease", "blocking": False, "object": "",
                      "chain": [], "mountPoint": "", "processes": [], "addresses": []}  # fmt: skip
