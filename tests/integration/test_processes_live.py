"""scan_processes against real processes holding a real loop device open."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import require_root
from unplugd.agent.collectors.processes import scan_processes
from unplugd.agent.model import DeviceNode
from unplugd.agent.roots import Roots


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[DeviceNode]:
    require_root()
    if shutil.which("losetup") is None:
        pytest.skip("losetup missing")
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"no loop device: {made.stderr.strip()}")
    path = made.stdout.strip()
    try:
        st = os.stat(path)
        yield DeviceNode(path, (os.major(st.st_rdev), os.minor(st.st_rdev)), "block")
    finally:
        subprocess.run(["losetup", "-d", path], capture_output=True, check=False)


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started by a test; killed and reaped even when it fails."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


def hold_open(
    path: str, procs: list[subprocess.Popen[bytes]], *, prefix: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """A `sleep` that holds `path` open on fd 3, ready once the fd is there; `prefix` runs it (unshare -m)."""
    return _holder([*prefix, "bash", "-c", 'exec 3<"$1"; exec sleep 300', "hold", path], procs)


def _holder(argv: Sequence[str], procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """A command that ends as `sleep` holding fd 3, ready once it has exec'd sleep."""
    proc = subprocess.Popen(argv)
    procs.append(proc)
    fd3 = Path(f"/proc/{proc.pid}/fd/3")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            # Ready once bash has exec'd sleep with fd 3 open.
            if os.readlink(fd3) and Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep":
                return proc
        except OSError:
            pass
        time.sleep(0.005)
    pytest.fail("the holder never opened its file")


def test_process_holding_a_loop_device_is_found_then_gone(
    loop_device: DeviceNode, holders: list[subprocess.Popen[bytes]]
) -> None:
    roots = Roots.live_system()
    assert scan_processes(roots, [loop_device]).value.open_refs == []

    proc = hold_open(loop_device.path, holders)
    refs = [r for r in scan_processes(roots, [loop_device]).value.open_refs if r.pid == proc.pid]
    assert [(r.pid, r.command, r.fd, r.devno, r.kind, r.target) for r in refs] == [
        (proc.pid, "sleep", 3, loop_device.devno, "block", loop_device.path)
    ]

    proc.kill()
    proc.wait(timeout=10)
    assert [r for r in scan_processes(roots, [loop_device]).value.open_refs if r.pid == proc.pid] == []


def _node_of(device: DeviceNode, path: Path) -> Path:
    """A block node of `device`'s number at `path`, as a container's own dev/ would hold one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(*device.devno))
    return path


def test_alias_node_under_another_dev_dir_matches_by_number(
    loop_device: DeviceNode, holders: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # What a container's rootfs looks like from here: its own dev/ with a node of the same number.
    alias = _node_of(loop_device, tmp_path / "rootfs" / "dev" / "data-disk")
    proc = hold_open(str(alias), holders)
    refs = [r for r in scan_processes(Roots.live_system(), [loop_device]).value.open_refs if r.pid == proc.pid]
    assert [(r.fd, r.devno, r.target) for r in refs] == [(3, loop_device.devno, str(alias))]


def test_char_node_number_matches_and_kind_matters(holders: list[subprocess.Popen[bytes]]) -> None:
    st = os.stat("/dev/null")
    devno = (os.major(st.st_rdev), os.minor(st.st_rdev))
    proc = hold_open("/dev/null", holders)
    roots = Roots.live_system()
    as_char = [
        r for r in scan_processes(roots, [DeviceNode("/dev/null", devno, "char")]).value.open_refs if r.pid == proc.pid
    ]
    # bash leaves its own stdin on /dev/null too when started without one; fd 3 is ours either way.
    assert (3, "sleep", "char") in [(r.fd, r.command, r.kind) for r in as_char]
    as_block = scan_processes(roots, [DeviceNode("/dev/null", devno, "block")]).value.open_refs
    assert [r for r in as_block if r.pid == proc.pid] == []


# A link text names the node in whatever tree the opener saw: the scan must stat() every fd whose
# text names a dev/ node, whoever holds it. These fail if it trusts the text anywhere, even for a
# process in the agent's own mount namespace (a per-process namespace test is not enough).


def _held(loop_device: DeviceNode, proc: subprocess.Popen[bytes]) -> list[tuple[int | None, str, str]]:
    refs = scan_processes(Roots.live_system(), [loop_device]).value.open_refs
    return [(r.fd, r.kind, r.target) for r in refs if r.pid == proc.pid]


def test_own_namespace_detached_mount_text_names_dev_null(
    loop_device: DeviceNode, holders: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # A container's rootfs (tmpfs) with the disk's node named dev/null, lazily unmounted while a
    # process of our own mount namespace holds the node: the link then reads "/dev/null", the
    # path inside the detached tree.
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "unplugd-test", str(rootfs)], check=True)
    try:
        proc = hold_open(str(_node_of(loop_device, rootfs / "dev" / "null")), holders)
    finally:
        subprocess.run(["umount", "-l", str(rootfs)], check=True)
    assert os.readlink(f"/proc/{proc.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    assert os.readlink(f"/proc/{proc.pid}/fd/3") == "/dev/null"
    assert _held(loop_device, proc) == [(3, "block", "/dev/null")]


def test_other_namespace_node_bound_over_dev_null(
    loop_device: DeviceNode, holders: list[subprocess.Popen[bytes]]
) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare missing")
    # Its own mount namespace (unshare makes its mounts private): the disk bound over /dev/null there only.
    proc = _holder(
        [
            "unshare",
            "-m",
            "bash",
            "-c",
            'mount --bind "$1" /dev/null && exec 3</dev/null && exec sleep 300',
            "hold",
            loop_device.path,
        ],
        holders,
    )
    assert os.readlink(f"/proc/{proc.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert os.readlink(f"/proc/{proc.pid}/fd/3") == "/dev/null"
    assert _held(loop_device, proc) == [(3, "block", "/dev/null")]


def test_deleted_node_still_held(
    loop_device: DeviceNode, holders: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    node = _node_of(loop_device, tmp_path / "rootfs" / "dev" / "gone")
    proc = hold_open(str(node), holders)
    node.unlink()
    assert _held(loop_device, proc) == [(3, "block", f"{node} (deleted)")]
