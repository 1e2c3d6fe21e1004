"""Release hooks on this machine (root): the runner's checks, timeouts and bounds on real processes,
and RequestRelease end to end through the agent's gRPC server with real hooks; the interface example hook
in a network namespace.

The server runs over a fake engine (tests/unit/rpc_fakes.py) whose disk function is mounted until a
hook creates a marker file: the hook's effect is real, the device is not.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest

from tests.conftest import REPO
from tests.integration.netns import NetNS, netns  # noqa: F401 (fixture)
from tests.unit.rpc_fakes import DISK_FN, FakeEngine, running_server
from unplugd.agent.config import Config, ReleaseConfig, VirtioSerialConfig
from unplugd.agent.model import Inventory, Mount
from unplugd.agent.mutations.release import HOOK_PATH, FunctionHolding, HookRun, HookStatus, MountHeld, run_hooks
from unplugd.agent.roots import Roots
from unplugd.pci import PciAddress
from unplugd.v1 import agent_service_pb2 as pb
from unplugd.v1 import report_pb2
from unplugd.v1.agent_service_pb2_grpc import AgentServiceStub

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="hooks must be owned by root")

HELD = FunctionHolding(
    "0000:00:06.0", "0000:00/06.0", "BUSY", ("vdb", "vdb1"), (MountHeld("vdb1", "/srv/da ta\n\\x", "ext4", 1),)
)


def hook(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    path = directory / name
    path.write_text(body)
    path.chmod(mode)
    return path


@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    d = tmp_path / "release.d"
    d.mkdir(mode=0o755)
    return d


def run(directory: Path, timeout: float = 5.0, max_output: int = 1000) -> dict[str, HookRun]:
    runs, _ = run_hooks(directory, HELD, timeout=timeout, max_output=max_output, deadline=time.monotonic() + 60)
    return {r.name: r for r in runs}


def test_hooks_run_in_lexical_order_with_environment_and_json(hooks: Path, tmp_path: Path) -> None:
    log = tmp_path / "order"
    hook(hooks, "20-second", f"#!/bin/sh\necho 20 >> {log}\n")
    hook(
        hooks,
        "10-first",
        f'#!/bin/sh\necho 10 >> {log}\nprintf "%s|%s" "$UNPLUGD_FUNCTION" '
        '"$UNPLUGD_MOUNT_POINTS"\necho oops >&2\nexit 7\n',
    )
    hook(
        hooks,
        "30-python",
        "#!/usr/bin/python3\nimport json, sys\nd = json.load(sys.stdin)\n"
        "print(d['function'], d['mounts'][0]['mountPoint'], d['blockDevices'])\n",
    )
    hook(hooks, "10-first~", "#!/bin/sh\nexit 99\n")  # an editor's backup: not a hook
    hook(hooks, ".hidden", "#!/bin/sh\nexit 99\n")
    got = run(hooks)
    assert list(got) == ["10-first", "20-second", "30-python"]
    assert log.read_text() == "10\n20\n"
    first, py = got["10-first"], got["30-python"]
    assert (first.status, first.exit_code) == (HookStatus.EXITED, 7)
    # the newline of the mount point is escaped: one item a line
    assert first.stdout == b"0000:00:06.0|/srv/da ta\\012\\134x"
    assert first.stderr == b"oops\n"
    assert py.stdout == b"0000:00:06.0 /srv/da ta\n\\134x ['vdb', 'vdb1']\n"


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        (0o775, "writable by group (mode 0775)"),
        (0o757, "writable by others (mode 0757)"),
        (0o644, "not executable by its owner (mode 0644)"),
    ],
)
def test_unsafe_hooks_are_refused_not_run(hooks: Path, tmp_path: Path, mode: int, why: str) -> None:
    marker = tmp_path / "ran"
    hook(hooks, "10-hook", f"#!/bin/sh\ntouch {marker}\n", mode)
    r = run(hooks)["10-hook"]
    assert (r.status, r.detail) == (HookStatus.REFUSED, why)
    assert not marker.exists()


def test_a_hook_owned_by_another_user_a_symlink_or_a_fifo_is_refused(hooks: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    os.chown(hook(hooks, "10-theirs", f"#!/bin/sh\ntouch {marker}\n"), 1000, 0)
    target = hook(tmp_path, "elsewhere", f"#!/bin/sh\ntouch {marker}\n")
    (hooks / "20-link").symlink_to(target)
    os.mkfifo(hooks / "30-fifo", 0o755)
    got = run(hooks)
    assert got["10-theirs"].detail == "owned by uid 1000, not root"
    assert got["20-link"].detail == "a symbolic link (hooks must be regular files)"
    assert got["30-fifo"].detail == "not a regular file"
    assert {r.status for r in got.values()} == {HookStatus.REFUSED}
    assert not marker.exists()


def test_an_unsafe_directory_runs_nothing(hooks: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hook(hooks, "10-hook", f"#!/bin/sh\ntouch {marker}\n")
    hooks.chmod(0o777)
    runs, had = run_hooks(hooks, HELD, timeout=5, max_output=100, deadline=time.monotonic() + 60)
    assert had and [(r.status, r.detail) for r in runs] == [
        (HookStatus.REFUSED, "the hooks directory is writable by group and others (mode 0777)")
    ]
    assert not marker.exists()
    assert run_hooks(hooks / "missing", HELD, timeout=5, max_output=100, deadline=time.monotonic() + 60) == ([], False)


def test_a_hanging_hook_is_killed_with_its_process_group(hooks: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "child"
    hook(hooks, "10-hang", f"#!/bin/sh\nsleep 300 &\necho $! > {pidfile}\necho started\nwait\n")
    r = run(hooks, timeout=1.0)["10-hang"]
    assert r.status is HookStatus.TIMED_OUT and r.signal == 9
    assert r.stdout == b"started\n"
    child = int(pidfile.read_text())
    assert not _alive(child)


def test_what_a_hook_leaves_running_is_killed_when_it_exits(hooks: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "child"
    hook(hooks, "10-bg", f"#!/bin/sh\nsleep 300 > /dev/null 2>&1 &\necho $! > {pidfile}\nexit 0\n")
    r = run(hooks, timeout=30.0)["10-bg"]
    assert (r.status, r.exit_code) == (HookStatus.EXITED, 0)
    assert not _alive(int(pidfile.read_text()))


def test_output_is_bounded_and_a_chatty_hook_never_blocks(hooks: Path) -> None:
    # 10 MiB on each stream, far more than a pipe holds: the hook must not block on a full pipe.
    hook(hooks, "10-chatty", "#!/bin/sh\nhead -c 10485760 /dev/zero\nhead -c 10485760 /dev/zero >&2\n")
    r = run(hooks, timeout=30.0, max_output=100)["10-chatty"]
    assert (r.status, r.exit_code) == (HookStatus.EXITED, 0)
    assert r.stdout == b"\0" * 100 and r.stdout_truncated
    assert r.stderr == b"\0" * 100 and r.stderr_truncated


def _alive(pid: int) -> bool:
    """Whether `pid` still runs 5 s on: SIGKILL is delivered when the process is next scheduled,
    not when kill() returns, and a loaded machine may take a moment."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        time.sleep(0.05)
    return True


# ------------------------------------------------------------------------------------------ the RPC


@dataclass
class MarkerEngine(FakeEngine):
    """The disk function is mounted (BUSY) until `marker` exists; then READY."""

    marker: Path = Path("/nonexistent")
    seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        mount = Mount(1, 0, (254, 17), "/", "/srv/data", "ext4", "/dev/vdb1", "rw", 4026531840, 1)
        self.inventory = self.inventory._replace(mounts=(mount,))

    def scan(self, roots: Roots, *, own_claims: Collection[str] = ()) -> Inventory:
        inv = super().scan(roots, own_claims=own_claims)
        return inv if not self.marker.exists() else inv._replace(mounts=())

    def inspect(
        self,
        roots: Roots,
        devices: Sequence[str] = (),
        *,
        leased: Mapping[PciAddress, str] = {},
        own_claims: Collection[str] = (),
    ) -> report_pb2.Report:
        self.set_state(
            DISK_FN, report_pb2.FUNCTION_STATE_READY if self.marker.exists() else report_pb2.FUNCTION_STATE_BUSY
        )
        return super().inspect(roots, devices, leased=leased, own_claims=own_claims)


def release_config(hooks: Path, *, mutations: bool = True, release: bool = True, timeout: float = 5.0) -> Config:
    cfg = Config()
    return replace(
        cfg,
        transports=replace(cfg.transports, virtio_serial=VirtioSerialConfig(enabled=False)),
        mutations=replace(cfg.mutations, enabled=mutations),
        release=ReleaseConfig(enabled=release, directory=hooks, hook_timeout_seconds=timeout),
    )


@pytest.fixture
def serve(tmp_path: Path, hooks: Path) -> Iterator[tuple[MarkerEngine, AgentServiceStub]]:
    engine = MarkerEngine(marker=tmp_path / "released")
    with running_server(tmp_path, engine, config=release_config(hooks, timeout=2.0)) as (_, stub):
        yield engine, stub


def test_request_release_runs_the_hook_and_waits_for_ready(
    serve: tuple[MarkerEngine, AgentServiceStub], hooks: Path, tmp_path: Path
) -> None:
    engine, stub = serve
    hook(hooks, "10-release", f'#!/bin/sh\ntouch {engine.marker}\necho released "$UNPLUGD_MOUNT_POINTS"\n')
    resp = stub.RequestRelease(pb.RequestReleaseRequest(devices=["vdb"], deadline_seconds=20), timeout=40)
    (f,) = resp.functions
    assert (f.address, f.outcome) == (str(DISK_FN), pb.RELEASE_OUTCOME_RELEASED)
    assert f.state == report_pb2.FUNCTION_STATE_READY
    assert [(h.name, h.status, h.exit_code, h.stdout) for h in f.hooks] == [
        ("10-release", pb.HOOK_STATUS_EXITED, 0, "released /srv/data\n")
    ]


@pytest.mark.parametrize(
    ("body", "mode", "status"),
    [
        ("#!/bin/sh\necho cannot >&2\nexit 1\n", 0o755, pb.HOOK_STATUS_EXITED),
        ("#!/bin/sh\nexec sleep 300\n", 0o755, pb.HOOK_STATUS_TIMED_OUT),
        ("#!/bin/sh\ntouch {marker}\n", 0o775, pb.HOOK_STATUS_REFUSED),
    ],
    ids=["fails", "hangs", "group-writable"],
)
def test_a_failing_hanging_or_unsafe_hook_leaves_it_busy(
    serve: tuple[MarkerEngine, AgentServiceStub], hooks: Path, body: str, mode: int, status: int
) -> None:
    engine, stub = serve
    hook(hooks, "10-release", body.format(marker=engine.marker), mode)
    resp = stub.RequestRelease(pb.RequestReleaseRequest(devices=["vdb"], deadline_seconds=4), timeout=40)
    (f,) = resp.functions
    assert (f.outcome, f.state) == (pb.RELEASE_OUTCOME_STILL_BUSY, report_pb2.FUNCTION_STATE_BUSY)
    assert [h.status for h in f.hooks] == [status]
    assert not engine.marker.exists()


def test_a_client_that_leaves_ends_the_wait(tmp_path: Path, hooks: Path) -> None:
    """The wait for READY ends when the caller is gone (its deadline passed, cancelled), not at the
    call's own deadline: nobody reads the answer, and each such call held a worker thread for up to
    [release] max_wait_seconds."""
    hook(hooks, "10-release", "#!/bin/sh\nexit 1\n")  # runs, and the function stays BUSY
    engine = MarkerEngine(marker=tmp_path / "released")
    with running_server(tmp_path, engine, config=release_config(hooks)) as (server, stub):
        with pytest.raises(grpc.RpcError) as exc:
            stub.RequestRelease(pb.RequestReleaseRequest(devices=["vdb"], deadline_seconds=300), timeout=3)
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the wait's subscription is the hub's only one: the watcher stops with it
        for _ in range(200):
            if not server.hub.running:
                break
            time.sleep(0.1)
        assert not server.hub.running


def test_no_hook_answers_at_once(serve: tuple[MarkerEngine, AgentServiceStub]) -> None:
    _, stub = serve
    t0 = time.monotonic()
    resp = stub.RequestRelease(pb.RequestReleaseRequest(devices=["vdb"], deadline_seconds=60), timeout=40)
    assert [(f.outcome, len(f.hooks)) for f in resp.functions] == [(pb.RELEASE_OUTCOME_NO_HOOK, 0)]
    assert time.monotonic() - t0 < 30  # did not wait for the 60 s deadline


@pytest.mark.parametrize(
    ("mutations", "release", "says"),
    [
        (False, True, "[mutations] enabled = true and [release] enabled = true"),
        (True, False, "set [release] enabled = true"),
    ],
)
def test_refused_unless_mutations_and_release_are_enabled(
    tmp_path: Path, hooks: Path, mutations: bool, release: bool, says: str
) -> None:
    marker = tmp_path / "ran"
    hook(hooks, "10-release", f"#!/bin/sh\ntouch {marker}\n")
    cfg = release_config(hooks, mutations=mutations, release=release)
    with (
        running_server(tmp_path, MarkerEngine(marker=marker), config=cfg) as (_, stub),
        pytest.raises(grpc.RpcError) as err,
    ):
        stub.RequestRelease(pb.RequestReleaseRequest(devices=["vdb"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert says in (err.value.details() or "")
    assert not marker.exists()


def test_agent_info_offers_release_only_when_enabled(tmp_path: Path, hooks: Path) -> None:
    for mutations, release, offered in ((True, True, True), (True, False, False), (False, True, False)):
        cfg = release_config(hooks, mutations=mutations, release=release)
        with running_server(tmp_path, MarkerEngine(), config=cfg) as (_, stub):
            caps = stub.GetAgentInfo(pb.GetAgentInfoRequest(), timeout=10).capabilities
        assert ("release" in caps) is offered


# ------------------------------------------------------------------------------------------ the examples


def test_the_unbond_example_frees_an_addressless_port_and_leaves_an_addressed_one(netns: NetNS) -> None:  # noqa: F811
    """packaging/release.d/60-unbond-and-down in a network namespace: a port without addresses leaves
    its master and goes down; an interface that still has an address is left up (exit 1). The master
    is a bridge: this machine's kernel has no bonding module, and the hook treats any master alike."""
    netns.ip("link", "add", "br0", "type", "bridge")
    netns.ip("link", "add", "d0", "type", "veth", "peer", "name", "p0")  # veth: this kernel has no dummy
    netns.ip("link", "set", "d0", "master", "br0")
    netns.ip("link", "set", "d0", "up")
    netns.ip("link", "add", "d1", "type", "veth", "peer", "name", "p1")
    netns.ip("address", "add", "192.0.2.1/24", "dev", "d1")
    netns.ip("link", "set", "d1", "up")
    example = str(REPO / "packaging" / "release.d" / "60-unbond-and-down")
    done = netns.run("env", "-i", f"PATH={HOOK_PATH}", "UNPLUGD_INTERFACES=d0", example)
    assert (done.returncode, done.stdout) == (0, "d0: out of its master\nd0: down\n"), done.stderr
    kept = netns.run("env", "-i", f"PATH={HOOK_PATH}", "UNPLUGD_INTERFACES=d1", example)
    assert (kept.returncode, kept.stderr) == (1, "d1 still has addresses: left up\n")
    links = {x["ifname"]: x for x in json.loads(netns.run("ip", "-j", "link", "show").stdout)}
    assert "master" not in links["d0"] and "UP" not in links["d0"]["flags"]
    assert "UP" in links["d1"]["flags"]
