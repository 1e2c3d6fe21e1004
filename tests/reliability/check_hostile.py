"""Hostile input, tried many times: names users choose, bytes on the wire, trees handed to --root.

- a real loop disk mounted, in a private mount namespace, at directories whose names are random
  bytes (newlines, escapes, bytes that are not UTF-8; anything but '/' and NUL): each time the
  table carries no raw control character, the JSON parses, the disk is BUSY with MOUNTED and its
  mount point comes back byte for byte from the wire encoding;
- random bytes sent as the request of every AgentService method to a real server: each answered
  INVALID_ARGUMENT, the server still serving afterwards;
- `unplugd inspect --root` of trees that try to lead out (a link to /etc/shadow, a FIFO, a device
  node) and of directories that are no capture: exit status and time taken.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from tests.integration.loopdev import loop_disk, mounted_in_private_namespace
from tests.integration.loopdev import run as run_tool
from tests.integration.test_inspect_live import SYNTHETIC, TABLE, synthetic_function
from tests.reliability.registry import Options, Row
from unplugd.agent import engine, render
from unplugd.agent.config import Config
from unplugd.agent.daemon.events import EventSources
from unplugd.agent.model import Collected
from unplugd.agent.reportdata import to_json
from unplugd.agent.roots import Roots
from unplugd.agent.rpc.server import AgentServer
from unplugd.text import unescape_octal
from unplugd.v1 import agent_service_pb2, agent_service_pb2_grpc

__all__ = ["run"]

NAMES = 50  # each a mount in a fresh namespace and a full scan: ~0.2 s apiece
GARBAGE = 100  # random payloads per method
TREES = 5  # each hostile tree inspected this often
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
REPO = Path(__file__).resolve().parents[2]


def _hostile_name(rng: random.Random) -> bytes:
    pool = [b for b in range(1, 256) if b != ord("/")]
    core = bytes(rng.choice(pool) for _ in range(rng.randint(1, 24)))
    return b"m-" + core + b"\n\x1b[31m"  # always a newline and an escape, plus random bytes


def _mount_names(tmp: Path) -> Row:
    rng = random.Random(8)
    outcomes: Counter[str] = Counter()
    real: Any = engine.collect_pci  # type: ignore[attr-defined]
    with loop_disk(tmp, TABLE) as disk:
        run_tool("mkfs.ext4", "-q", "-F", str(disk.part_node(0)))

        def with_loop(roots: Roots, pci_ids: Any) -> Collected[list[Any]]:
            functions, problems = real(roots, pci_ids)
            return Collected([*functions, synthetic_function(disk.disk)], list(problems))

        engine.collect_pci = with_loop  # type: ignore[attr-defined,assignment]
        try:
            for _ in range(NAMES):
                name = _hostile_name(rng)
                point = Path(os.fsdecode(os.fsencode(tmp) + b"/" + name))
                with mounted_in_private_namespace(disk.part_node(0), point):
                    outcomes[_judge(point)] += 1
        finally:
            engine.collect_pci = real  # type: ignore[attr-defined]
    bad = sum(v for k, v in outcomes.items() if k != "ok")
    return Row(
        "loop disk mounted at a random hostile name (newline, ESC, non-UTF-8 bytes)",
        f"{NAMES} names",
        ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
        ok=bad == 0,
    )


def _judge(point: Path) -> str:
    report = engine.inspect_data(Roots.live_system(), [], exclusive_probe=False)
    if RAW_CONTROL.search("\n".join(render.table_lines(report, show_all=True, verbose=True))):
        return "raw control character in the table"
    data = json.loads(to_json(report))
    fn = next((f for f in data["functions"] if f["address"] == str(SYNTHETIC)), None)
    if fn is None or not fn["state"].endswith("BUSY"):
        return "disk not BUSY"
    mounted = [r for r in fn.get("reasons", []) if r["code"].endswith("MOUNTED")]
    if not mounted:
        return "no MOUNTED reason"
    want = os.fsencode(point)
    if not any(
        want == os.fsencode(unescape_octal(r["detail"]).split(" is mounted on ", 1)[1].rsplit(" (", 1)[0])
        for r in mounted
        if " is mounted on " in r["detail"]
    ):
        return "mount point not recovered from the wire"
    return "ok"


def _garbage(tmp: Path) -> Row:
    rng = random.Random(9)
    socket = tmp / "agent.sock"
    config = Config().with_overrides(socket=socket)
    codes: Counter[str] = Counter()
    methods = list(agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].methods)
    server = AgentServer(config, roots=Roots.live_system(), sources=EventSources.none)
    server.start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            for method in methods:
                streaming = method.server_streaming
                path = f"/unplugd.v1.AgentService/{method.name}"
                for _ in range(GARBAGE):
                    payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
                    try:
                        if streaming:  # a watch that parsed: its first message is enough
                            next(iter(channel.unary_stream(path, None, None)(payload, timeout=10)))
                        else:
                            channel.unary_unary(path, None, None)(payload, timeout=10)
                        codes["parsed and answered"] += 1
                    except grpc.RpcError as exc:
                        codes[exc.code().name] += 1
            stub = agent_service_pb2_grpc.AgentServiceStub(channel)
            alive = bool(stub.GetAgentInfo(agent_service_pb2.GetAgentInfoRequest(), timeout=30).version)
    finally:
        server.stop(grace=0.2)
    # Random bytes can happen to be a valid message; those are answered (or refused for what they say).
    wrong = codes["INTERNAL"] + codes["UNKNOWN"]
    return Row(
        f"random bytes as the request of each of {len(methods)} methods",
        f"{GARBAGE * len(methods)} calls",
        ", ".join(f"{k} {v}" for k, v in sorted(codes.items())) + f"; serving afterwards: {alive}",
        ok=wrong == 0 and alive,
    )


def _trees(tmp: Path) -> list[Row]:
    rows: list[Row] = []

    def shadow_link(d: Path) -> None:
        (d / "sys/class/block").mkdir(parents=True)
        os.symlink("/etc/shadow", d / "sys/class/block/uevent")

    def fifo(d: Path) -> None:
        (d / "sys/bus/pci/devices").mkdir(parents=True)
        (d / "proc").mkdir()
        os.mkfifo(d / "proc/swaps")

    def no_capture(d: Path) -> None:
        (d / "etc").mkdir()

    cases = {
        "a link to /etc/shadow as a sysfs file": shadow_link,
        "a FIFO where /proc/swaps is read": fifo,
        "a directory that is no capture": no_capture,
    }
    for what, build in cases.items():
        codes: Counter[int] = Counter()
        worst = 0.0
        for i in range(TREES):
            tree = tmp / f"tree-{len(rows)}-{i}"
            tree.mkdir()
            build(tree)
            t0 = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "unplugd.agent.cli", "inspect", "--json", "--root", str(tree)],
                capture_output=True,
                timeout=60,
                check=False,
                cwd=REPO,
            )
            worst = max(worst, time.monotonic() - t0)
            codes[proc.returncode] += 1
            leaked = b"root:" in proc.stdout
        rows.append(
            Row(
                f"inspect --root, {what}",
                f"{TREES} runs",
                ", ".join(f"exit {k} x{v}" for k, v in sorted(codes.items()))
                + f"; slowest {worst:.1f} s"
                + ("; /etc/shadow LEAKED" if leaked else ""),
                ok=not leaked and worst < 30 and 1 not in codes,
            )
        )
    return rows


def run(options: Options) -> list[Row]:
    del options
    with tempfile.TemporaryDirectory(prefix="unplugd-hostile-") as work:
        tmp = Path(work)
        return [_mount_names(tmp), _garbage(tmp), *_trees(tmp)]
