"""The readiness engine on real kernel objects: loop disks with partitions, private mount
namespaces, swap, processes holding nodes, stacked loops; and `unplugd inspect` on this VM.

Loop devices are not PCI functions, so the block rules are exercised on the real
inventory (real collectors, live /sys, /proc, /dev) plus one synthetic PciFunction
whose block_devices names the real loop disk; no seam in the engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.loopdev import (
    LoopDisk,
    loop_disk,
    mounted_in_private_namespace,
    require_tools,
    run,
    swapped_on,
)
from tests.probe import probe
from unplugd.agent import engine
from unplugd.agent.capture import capture
from unplugd.agent.model import Inventory, PciFunction
from unplugd.agent.readiness.policy import evaluate
from unplugd.agent.readiness.reasons import Code, FunctionVerdict, State
from unplugd.agent.roots import Roots
from unplugd.agent.selection import select
from unplugd.pci import PciAddress, PciPath

SYNTHETIC = PciAddress.parse("0000:7f:1f.7")
SHM = "/dev/shm"  # a tmpfs on every systemd machine: no block device holds it
TABLE = "label: dos\n,16M,L\n,16M,S\n"


def synthetic_function(disk: str) -> PciFunction:
    return PciFunction(
        address=SYNTHETIC,
        path=PciPath.parse("0000:7f/1f.7"),
        vendor_id=0x1AF4,
        device_id=0x1042,
        class_code=0x010000,
        driver="virtio-pci",
        is_bridge=False,
        hotplug_slot="synthetic",
        block_devices=(disk,),
        subdrivers=("virtio_blk",),
    )


def inventory_with(disk: str, roots: Roots | None = None) -> Inventory:
    inv = engine.scan(roots or Roots.live_system())
    return inv._replace(functions=(*inv.functions, synthetic_function(disk)))


def verdict_for(disk: LoopDisk, roots: Roots | None = None) -> FunctionVerdict:
    inv = inventory_with(disk.disk, roots)
    # the real names select the synthetic function, as `--device loopXp1` would
    assert [f.address for f in select(inv, [disk.parts[0]])] == [SYNTHETIC]
    (v,) = [v for v in evaluate(inv) if v.address == SYNTHETIC]
    return v


def codes(v: FunctionVerdict) -> set[Code]:
    return {r.code for r in v.reasons}


def assert_not_busy(v: FunctionVerdict) -> None:
    # Other processes' unreadable fd tables may leave it UNKNOWN here; never BUSY, never a block reason.
    assert v.state is not State.BUSY, v.reasons
    assert codes(v) <= {Code.UNREADABLE}, v.reasons


@pytest.fixture
def disk() -> Iterator[LoopDisk]:
    require_tools()
    # The image lies on a tmpfs: a loop disk is stacked on the disk whose filesystem holds its image
    # (test_a_loop_selects_the_function_its_image_lies_on), and here only the synthetic function may own it.
    with tempfile.TemporaryDirectory(dir=SHM) as shm, loop_disk(Path(shm), TABLE) as d:
        run("mkfs.ext4", "-q", "-F", str(d.part_node(0)))
        run("mkswap", str(d.part_node(1)))
        yield d


def test_idle_loop_disk_is_not_busy(disk: LoopDisk) -> None:
    v = verdict_for(disk)
    assert_not_busy(v)
    assert v.block_devices[:3] == (disk.disk, *disk.parts)


def test_mount_in_private_namespace_then_umount(disk: LoopDisk, tmp_path: Path) -> None:
    with mounted_in_private_namespace(disk.part_node(0), tmp_path / "mnt") as holder:
        v = verdict_for(disk)
        assert v.state is State.BUSY
        (mounted,) = [r for r in v.reasons if r.code is Code.MOUNTED]
        assert mounted.object == disk.parts[0] and mounted.mount_point == str(tmp_path / "mnt")
        assert f"mount namespace of pid {holder.pid}" in mounted.detail
        assert "(ext4)" in mounted.detail
        run("nsenter", "-t", str(holder.pid), "-m", "umount", str(tmp_path / "mnt"))
        assert_not_busy(verdict_for(disk))


def test_swapon_then_swapoff(disk: LoopDisk) -> None:
    with swapped_on(disk.part_node(1)):
        v = verdict_for(disk)
        assert v.state is State.BUSY
        (swap,) = [r for r in v.reasons if r.code is Code.SWAP]
        assert swap.object == disk.parts[1]
    assert_not_busy(verdict_for(disk))


def test_process_holding_the_node(disk: LoopDisk) -> None:
    with open(disk.part_node(0), "rb") as node:
        proc = subprocess.Popen(["sleep", "300"], stdin=node)
    try:
        v = verdict_for(disk)
        (held,) = [r for r in v.reasons if r.code is Code.OPEN_BY_PROCESS]
        assert held.processes[0].pid == proc.pid and held.processes[0].command == "sleep"
        assert held.processes[0].fds == (f"/dev/{disk.parts[0]} (fd 0)",)
        assert v.state is State.BUSY
    finally:
        proc.kill()
        proc.wait()
    assert_not_busy(verdict_for(disk))


def test_a_node_opened_through_a_dev_bound_elsewhere_is_still_held(disk: LoopDisk, tmp_path: Path) -> None:
    """Any user may `unshare -Urm` and bind /dev, or one node, anywhere it can write: /proc/PID/fd
    then names the node by that path ("/tmp/d/loop0p1"), in no dev/ directory. Before the scan took
    a devtmpfs mounted outside /dev as a reason to stat() every path fd, such a holder was not seen
    and the disk READY."""
    bound_dev, bound_node = tmp_path / "d", tmp_path / "node"
    bound_dev.mkdir()
    bound_node.touch()
    script = 'mount --rbind /dev "$1" && mount --bind "$2" "$3" && exec 3<"$1/$4" 4<"$3" && exec sleep 300'
    argv = ["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "hold"]
    argv += [str(bound_dev), str(disk.part_node(1)), str(bound_node), disk.parts[0]]
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        fd4 = Path(f"/proc/{proc.pid}/fd/4")
        for _ in range(1000):  # up to 10 s for unshare, two mounts and the exec of sleep
            with contextlib.suppress(OSError):
                if fd4.exists() and Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep":
                    break
            assert proc.poll() is None, "the holder failed to mount or open"
            time.sleep(0.01)
        assert os.readlink(f"/proc/{proc.pid}/fd/3") == f"{bound_dev}/{disk.parts[0]}"
        v = verdict_for(disk)
        held = {(p.pid, fd) for r in v.reasons if r.code is Code.OPEN_BY_PROCESS for p in r.processes for fd in p.fds}
        assert held == {(proc.pid, f"{bound_dev}/{disk.parts[0]} (fd 3)"), (proc.pid, f"{bound_node} (fd 4)")}
        assert v.state is State.BUSY
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert_not_busy(verdict_for(disk))


def test_loop_stacked_on_a_partition_is_a_holder(disk: LoopDisk) -> None:
    upper = run("losetup", "--find", "--show", str(disk.part_node(0))).strip()
    try:
        v = verdict_for(disk)
        (holder,) = [r for r in v.reasons if r.code is Code.HOLDER]
        assert holder.chain == (disk.disk, disk.parts[0], os.path.basename(upper))
        assert v.state is State.BUSY
    finally:
        subprocess.run(["losetup", "--detach", upper], check=False)


def test_capture_keeps_what_makes_it_busy(disk: LoopDisk, tmp_path: Path) -> None:
    """Captured while mounted in a private namespace and held open: the tree says the same."""
    with open(disk.part_node(1), "rb") as node:
        proc = subprocess.Popen(["sleep", "300"], stdin=node)
    try:
        with mounted_in_private_namespace(disk.part_node(0), tmp_path / "mnt"):
            live = verdict_for(disk)
            capture(tmp_path / "tree")
        captured = verdict_for(disk, Roots.under(tmp_path / "tree"))
    finally:
        proc.kill()
        proc.wait()
    assert live.state is State.BUSY and {Code.MOUNTED, Code.OPEN_BY_PROCESS} <= codes(live)
    assert captured.state is live.state
    assert [(r.code, r.object) for r in captured.reasons] == [(r.code, r.object) for r in live.reasons]


def test_loop_device_is_not_a_pci_function(disk: LoopDisk) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "unplugd.agent.cli", "inspect", "--json", "--device", disk.disk],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "no PCI function" in out.stderr


def test_a_loop_selects_the_function_its_image_lies_on(tmp_path: Path) -> None:
    """`unplugd check loopX` names the functions the report stacks loopX on: the disk holding its image."""
    require_tools()
    with loop_disk(tmp_path, TABLE) as d:
        inv = engine.scan(Roots.live_system())
        below = [v.address for v in evaluate(inv) if d.disk in v.block_devices]
        if not below:
            pytest.skip(f"{tmp_path} lies on no PCI function's disk here")
        assert all(d.parts[0] in v.block_devices for v in evaluate(inv) if v.address in below)
        assert [f.address for f in select(inv, [d.disk])] == below
        assert [f.address for f in select(inv, [f"/dev/{d.parts[0]}"])] == below


# --------------------------------------------------------------------------- this VM


def _live_function(device: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "unplugd.agent.cli", "inspect", "--json", "--device", device],
        capture_output=True,
        text=True,
        check=True,
    )
    (f,) = json.loads(out.stdout)["functions"]
    return f  # type: ignore[no-any-return]


def _codes(f: dict[str, object]) -> set[str]:
    return {r["code"].removeprefix("REASON_CODE_") for r in f["reasons"]}  # type: ignore[attr-defined]


def test_this_vm_root_disk_is_busy() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not Path("/sys/class/block/vda").exists():
        pytest.skip("no vda here")
    f = _live_function("vda")
    assert f["state"] == "FUNCTION_STATE_BUSY"
    assert {"ROOT_FILESYSTEM", "MOUNTED"} <= _codes(f)


def test_this_vm_eth0_is_busy() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not Path("/sys/class/net/eth0/device").exists():
        pytest.skip("no PCI eth0 here")
    with contextlib.suppress(subprocess.CalledProcessError):
        if "default" not in run("ip", "route", "show", "default"):
            pytest.skip("eth0 has no default route on this machine")
    f = _live_function("eth0")
    assert f["state"] == "FUNCTION_STATE_BUSY"
    assert {"LINK_UP", "HAS_ADDRESS", "DEFAULT_ROUTE"} <= _codes(f)


def test_lease_refused_while_a_process_holds_the_disk(disk: LoopDisk) -> None:
    """An fd held open does not stop O_EXCL, so only the report can refuse the lease; it does, naming the pid."""
    from unplugd.agent.errors import ClaimConflict
    from unplugd.agent.model import BlockDevice
    from unplugd.agent.mutations.claims import claim_block_device, release_claims
    from unplugd.agent.mutations.leases import targets_for

    with open(disk.part_node(0), "rb") as node:
        proc = subprocess.Popen(["sleep", "300"], stdin=node)
    try:
        inv = inventory_with(disk.disk)
        fn = [f for f in inv.functions if f.address == SYNTHETIC]
        with pytest.raises(ClaimConflict) as err:
            targets_for(inv, fn)
        assert f"pid {proc.pid} (sleep) holds /dev/{disk.parts[0]}" in str(err.value)
        # The kernel alone would have granted the claim.
        whole: BlockDevice = inv.block_devices[disk.disk]
        release_claims([claim_block_device(Roots.live_system(), whole)])
    finally:
        proc.kill()
        proc.wait()
    inv = inventory_with(disk.disk)
    assert [t.function for t in targets_for(inv, [f for f in inv.functions if f.address == SYNTHETIC])] == [SYNTHETIC]


LIVE_IMPORTS = r"""
import contextlib, io, sys
from unplugd.agent.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main(["inspect", "--json", "--no-probe"])
print(repr([int(code), "ctypes" in sys.modules, len(out.getvalue())]))
"""


def test_inspect_json_on_this_vm_leaves_ctypes_unloaded() -> None:
    # ctypes serves openat2 beneath a captured tree only; on the live system it is start-up cost.
    code, ctypes_loaded, printed = probe(LIVE_IMPORTS)
    assert code == 0 and printed > 0
    assert ctypes_loaded is False
