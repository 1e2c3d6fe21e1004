"""Hostile names on real kernel objects: a loop disk mounted at a directory whose name holds a
newline, an ANSI escape and bytes that are not UTF-8, held open by a process whose name does too.

The kernel writes these names into mountinfo and comm as they are; `unplugd inspect`, `inspect
--json`, `check` and GetReport over a real server must still answer, and the disk must still be
BUSY. Loop disks are no PCI functions, so one synthetic function owns the loop disk (as in
test_inspect_live.py); everything else is the live system through the real collectors.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.loopdev import (
    LoopDisk,
    loop_disk,
    mounted_in_private_namespace,
    require_tools,
    run,
    wait_for,
)
from tests.integration.netns import NetNS, netns  # noqa: F401 (fixture)
from tests.integration.test_inspect_live import SYNTHETIC, TABLE, synthetic_function
from unplugd.agent import cli, engine, render
from unplugd.agent.config import Config
from unplugd.agent.daemon.events import EventSources
from unplugd.agent.model import Collected
from unplugd.agent.roots import Roots
from unplugd.agent.rpc.server import AgentServer
from unplugd.text import wire_text
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import agent_service_pb2_grpc, report_pb2

EVIL = b"\n\x1b[31mRED\xff\xfe"  # a newline, "red" in ANSI, two bytes that are not UTF-8
COMM = b"sl\x1b[2J\xff\n"  # comm is the exec'd file's name: "clear the screen", a bad byte, a newline
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[LoopDisk]:
    require_tools()
    with loop_disk(tmp_path, TABLE) as d:
        run("mkfs.ext4", "-q", "-F", str(d.part_node(0)))
        yield d


@pytest.fixture
def synthetic(disk: LoopDisk, monkeypatch: pytest.MonkeyPatch) -> LoopDisk:
    """The loop disk under a PCI function, for every scan of this test (CLI and server alike)."""
    real = engine.collect_pci  # type: ignore[attr-defined]  # the name engine.scan calls

    def with_loop(roots: Roots, pci_ids: object) -> Collected[list[object]]:
        functions, problems = real(roots, pci_ids)  # type: ignore[arg-type]
        return Collected([*functions, synthetic_function(disk.disk)], list(problems))

    monkeypatch.setattr(engine, "collect_pci", with_loop)
    return disk


@pytest.fixture
def hostile(synthetic: LoopDisk, tmp_path: Path) -> Iterator[tuple[LoopDisk, bytes, subprocess.Popen[bytes]]]:
    """Partition 1 mounted at tmp/EVIL (private namespace); partition 2 held by a process named COMM."""
    mount_point = os.fsencode(tmp_path) + b"/mnt" + EVIL
    link = os.fsencode(tmp_path) + b"/" + COMM
    os.symlink(b"/bin/sleep", link)
    with mounted_in_private_namespace(synthetic.part_node(0), Path(os.fsdecode(mount_point))):
        with open(synthetic.part_node(1), "rb") as node:
            holder = subprocess.Popen([link, "300"], stdin=node)
        try:
            comm = Path(f"/proc/{holder.pid}/comm")
            wait_for(lambda: comm.read_bytes() == COMM + b"\n", what="the exec of the hostile name")
            yield synthetic, mount_point, holder
        finally:
            holder.kill()
            holder.wait()


def _function(report: dict[str, object]) -> dict[str, object]:
    (f,) = [f for f in report["functions"] if f["address"] == str(SYNTHETIC)]  # type: ignore[attr-defined]
    return f  # type: ignore[no-any-return]


def test_inspect_json_judges_the_disk(
    hostile: tuple[LoopDisk, bytes, subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    disk, mount_point, holder = hostile
    assert cli.main(["inspect", "--json", "--no-probe", "--device", disk.disk]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert not RAW_CONTROL.search(out.replace("\n", ""))
    f = _function(json.loads(out))
    assert f["state"] == "FUNCTION_STATE_BUSY"
    reasons = {r["code"]: r for r in f["reasons"]}  # type: ignore[attr-defined]
    assert reasons["REASON_CODE_MOUNTED"]["mountPoint"] == wire_text(os.fsdecode(mount_point))
    held = reasons["REASON_CODE_OPEN_BY_PROCESS"]["processes"]
    assert [p["pid"] for p in held] == [holder.pid]
    assert held[0]["command"] == wire_text(os.fsdecode(COMM))


def test_inspect_table_and_check(
    hostile: tuple[LoopDisk, bytes, subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    disk, _, _ = hostile
    assert cli.main(["inspect", "-v", "--no-probe"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "\x1b" not in out and not RAW_CONTROL.search(out)
    assert "\\033[31mRED\\377\\376" in out  # the mount point, escaped
    # every line is one the table means to write: one report, rendered, counted
    data = engine.inspect_data(Roots.live_system(), [disk.disk], exclusive_probe=False)
    lines = render.table_lines(data, show_all=True, verbose=True)
    reasons = sum(len(f["reasons"]) for f in data["functions"])
    problems = 2 + len(data["problems"]) if data["problems"] else 0
    assert len(lines) == 2 + len(data["functions"]) + reasons + problems
    assert cli.main(["check", "--no-probe", disk.parts[0]]) == cli.EXIT_BUSY
    assert not RAW_CONTROL.search(capsys.readouterr().out)


def test_get_report_over_a_real_server(
    hostile: tuple[LoopDisk, bytes, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    disk, mount_point, _ = hostile
    cfg = Config().with_overrides(socket=tmp_path / "run" / "agent.sock")
    server = AgentServer(cfg, roots=Roots.live_system(), sources=EventSources.none)
    server.start()
    channel = grpc.insecure_channel(server.target)
    try:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        report = stub.GetReport(pb.GetReportRequest(devices=[disk.disk]), timeout=60).report
    finally:
        channel.close()
        server.stop(grace=0.2)
    (f,) = [f for f in report.functions if f.address == str(SYNTHETIC)]
    assert f.state == report_pb2.FUNCTION_STATE_BUSY
    assert wire_text(os.fsdecode(mount_point)) in [r.mount_point for r in f.reasons]


def test_an_interface_named_with_escapes_and_bad_bytes(netns: NetNS) -> None:  # noqa: F811 (the fixture)
    """The kernel refuses '/', ':' and whitespace in an interface name, nothing else: sysfs and
    rtnetlink hand the agent the same bytes, and they meet under one name."""
    name = "d\x1b[31m" + os.fsdecode(b"\xff")  # 7 bytes: under IFNAMSIZ
    netns.ip("link", "add", name, "type", "veth", "peer", "name", "vpeer")
    netns.ip("link", "set", name, "up")
    netns.ip("addr", "add", "198.51.100.7/24", "dev", name)
    scan = netns.collect()
    assert scan["problems"] == []
    iface = scan["interfaces"][name]  # sysfs directory name == rtnetlink IFLA_IFNAME
    assert iface["admin_up"] is True
    assert [a["address"] for a in iface["addresses"]] == ["198.51.100.7"]
    assert wire_text(name) == "d\x1b[31m\\377"
