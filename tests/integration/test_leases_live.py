"""Leases on real loop devices: the kernel refuses mount and swapon while a claim is held.

Loop devices are not PCI functions, so a synthetic function stands for the
device that owns them; the claims go through the lease code the service uses.
mount(2) and swapon(2) are called directly to see their errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, require_root
from tests.integration.netns import NetNS, netns  # noqa: F401 (fixture)
from unplugd.agent.errors import ClaimConflict
from unplugd.agent.model import BlockDevice, parse_devno
from unplugd.agent.mutations.claims import ClaimFailed, claim_block_device, release_claims
from unplugd.agent.mutations.leases import LeaseManager, LeaseTarget
from unplugd.agent.roots import Roots
from unplugd.leaselabel import lease_label
from unplugd.pci import PciAddress

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
FN_A = PciAddress.parse("0000:00:0a.0")
FN_B = PciAddress.parse("0000:00:0b.0")


def _call(rc: int) -> int:
    """0, or the errno of a failed libc call."""
    return 0 if rc == 0 else ctypes.get_errno()


def sys_mount(source: str, target: Path, fstype: str = "ext4") -> int:
    return _call(_libc.mount(source.encode(), str(target).encode(), fstype.encode(), 0, None))


def sys_umount(target: Path) -> int:
    return _call(_libc.umount2(str(target).encode(), 0))


def sys_swapon(path: str) -> int:
    return _call(_libc.swapon(path.encode(), 0))


def sys_swapoff(path: str) -> int:
    return _call(_libc.swapoff(path.encode()))


def _block(name: str) -> BlockDevice:
    devno = parse_devno(Path(f"/sys/class/block/{name}/dev").read_text())
    parent = Path(f"/sys/class/block/{name}/partition").exists()
    return BlockDevice(name, "part" if parent else "disk", devno, 0)


class Loops:
    """Loop disks made by one test; every mount, swap and loop undone at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loops: list[str] = []
        self.mounts: list[Path] = []
        self.swaps: list[str] = []

    def disk(self, *, partitions: bool) -> BlockDevice:
        image = self.tmp / f"disk{len(self.loops)}.img"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        if partitions:
            subprocess.run(
                ["sfdisk", "-q", str(image)],
                input="label: dos\n,32M,L\n,,S\n",
                text=True,
                check=True,
                capture_output=True,
            )
        made = subprocess.run(
            ["losetup", "-f", "-P", "--show", str(image)], capture_output=True, text=True, check=False
        )
        if made.returncode != 0:
            pytest.skip(f"no loop device: {made.stderr.strip()}")
        path = made.stdout.strip()
        self.loops.append(path)
        name = os.path.basename(path)
        if partitions:
            # This kernel parses no partition tables: add them from the table (BLKPG).
            if not os.path.exists(f"/sys/class/block/{name}p1"):
                subprocess.run(["partx", "--add", path], check=True, capture_output=True)
            for part in (f"{path}p1", f"{path}p2"):
                _wait_for(lambda p=part: os.path.exists(p))
            subprocess.run(["mkfs.ext4", "-q", "-F", f"{path}p1"], check=True, capture_output=True)
            subprocess.run(["mkswap", f"{path}p2"], check=True, capture_output=True)
        else:
            subprocess.run(["mkfs.ext4", "-q", "-F", path], check=True, capture_output=True)
        return _block(name)

    def mountpoint(self) -> Path:
        mp = self.tmp / f"mnt{len(self.mounts)}"
        mp.mkdir(exist_ok=True)
        return mp

    def mount(self, source: str) -> tuple[int, Path]:
        mp = self.mountpoint()
        rc = sys_mount(source, mp)
        if rc == 0:
            self.mounts.append(mp)
        return rc, mp

    def umount(self, mp: Path) -> None:
        assert sys_umount(mp) == 0
        self.mounts.remove(mp)

    def swapon(self, path: str) -> int:
        rc = sys_swapon(path)
        if rc == 0:
            self.swaps.append(path)
        return rc

    def swapoff(self, path: str) -> None:
        assert sys_swapoff(path) == 0
        self.swaps.remove(path)

    def cleanup(self) -> None:
        for mp in reversed(self.mounts):
            sys_umount(mp)
        for sw in self.swaps:
            sys_swapoff(sw)
        for loop in self.loops:
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)


def _wait_for(cond: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    require_root()
    for tool in ("losetup", "sfdisk", "partx", "mkfs.ext4", "mkswap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing")
    made = Loops(tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


def _manager(**kw: object) -> LeaseManager:
    return LeaseManager(Roots.live_system(), default_seconds=30, max_seconds=60, **kw)  # type: ignore[arg-type]


def _excl_free(disk: BlockDevice) -> bool:
    """Could someone else claim the disk right now?"""
    try:
        release_claims([claim_block_device(Roots.live_system(), disk)])
        return True
    except ClaimFailed as exc:
        assert exc.busy, exc
        return False


def test_claim_blocks_mount_and_swapon_of_partitions_until_release(loops: Loops) -> None:
    disk = loops.disk(partitions=True)
    p1, p2 = f"/dev/{disk.name}p1", f"/dev/{disk.name}p2"
    leases = _manager()
    grant = leases.prepare([LeaseTarget(FN_A, (disk,))])
    assert grant.claimed == (disk.name,)
    assert leases.own_claims() == {disk.name} and leases.leased() == {FN_A: lease_label(grant.lease_id)}

    rc, _ = loops.mount(p1)
    assert rc == errno.EBUSY
    assert loops.swapon(p2) == errno.EBUSY
    assert not _excl_free(disk)

    leases.release(grant.lease_id)
    rc, mp = loops.mount(p1)
    assert rc == 0
    assert loops.swapon(p2) == 0
    loops.umount(mp)
    loops.swapoff(p2)


def test_claim_blocks_mount_of_the_whole_disk(loops: Loops) -> None:
    disk = loops.disk(partitions=False)
    leases = _manager()
    grant = leases.prepare([LeaseTarget(FN_A, (disk,))])
    rc, _ = loops.mount(f"/dev/{disk.name}")
    assert rc == errno.EBUSY
    leases.release(grant.lease_id)
    rc, mp = loops.mount(f"/dev/{disk.name}")
    assert rc == 0
    loops.umount(mp)


def test_lease_expires_by_timer(loops: Loops) -> None:
    disk = loops.disk(partitions=True)
    changes: list[int] = []
    leases = _manager(on_change=lambda: changes.append(1))
    grant = leases.prepare([LeaseTarget(FN_A, (disk,))], seconds=1)
    assert loops.mount(f"/dev/{disk.name}p1")[0] == errno.EBUSY
    renewed = leases.renew(grant.lease_id, 2)  # renewing moves the deadline
    assert renewed.expires_at > grant.expires_at
    time.sleep(1.3)
    assert leases.leased()  # the first deadline passed; the renewed one holds
    _wait_for(lambda: not leases.leased(), timeout=3)
    assert len(changes) == 2  # prepared, expired
    rc, mp = loops.mount(f"/dev/{disk.name}p1")
    assert rc == 0
    loops.umount(mp)


def test_partial_failure_leaves_nothing_claimed(loops: Loops) -> None:
    free = loops.disk(partitions=True)
    used = loops.disk(partitions=True)
    rc, _mp = loops.mount(f"/dev/{used.name}p1")
    assert rc == 0
    leases = _manager()
    with pytest.raises(ClaimConflict) as err:
        leases.prepare([LeaseTarget(FN_A, (free,)), LeaseTarget(FN_B, (used,))])
    assert len(err.value.reasons) == 1
    assert err.value.reasons[0].startswith(f"{used.name}:") and "mounted" in err.value.reasons[0]
    assert leases.leased() == {} and leases.own_claims() == frozenset()
    assert _excl_free(free)
    rc, _mp2 = loops.mount(f"/dev/{free.name}p1")
    assert rc == 0


def test_claim_finds_the_node_by_devno_only(loops: Loops, tmp_path: Path) -> None:
    disk = loops.disk(partitions=False)
    # /dev without any node: the claim makes a private node from the number.
    empty = tmp_path / "emptydev"
    empty.mkdir()
    roots = Roots.live_system()._replace(dev=empty)
    claim = claim_block_device(roots, disk)
    assert loops.mount(f"/dev/{disk.name}")[0] == errno.EBUSY
    release_claims([claim])
    assert list(empty.iterdir()) == []
    # A node under the right name but with another number is never claimed.
    decoy = tmp_path / "decoydev"
    decoy.mkdir()
    os.symlink("/dev/null", decoy / disk.name)
    claim = claim_block_device(Roots.live_system()._replace(dev=decoy), disk)
    assert os.major(os.fstat(claim.fd).st_rdev) == disk.devno[0]
    release_claims([claim])
    # A number no driver serves (not a loop minor: opening one creates it).
    with pytest.raises(ClaimFailed, match="vanished"):
        gone = disk._replace(name="gone", devno=(_unused_major(), 0))
        claim_block_device(Roots.live_system()._replace(dev=empty), gone)


def _unused_major() -> int:
    text = Path("/proc/devices").read_text()
    used = {int(line.split()[0]) for line in text.split("Block devices:")[1].splitlines() if line.strip()}
    return next(m for m in range(240, 255) if m not in used)  # the local/experimental range


_HOLDER = """
import sys, time
from unplugd.agent.model import BlockDevice, parse_devno
from unplugd.pci import PciAddress
from unplugd.agent.roots import Roots
from unplugd.agent.mutations.leases import LeaseManager, LeaseTarget
name = sys.argv[1]
disk = BlockDevice(name, "disk", parse_devno(open(f"/sys/class/block/{name}/dev").read()), 0)
leases = LeaseManager(Roots.live_system(), default_seconds=600, max_seconds=600)
leases.prepare([LeaseTarget(PciAddress.parse("0000:00:0a.0"), (disk,))])
print("claimed", flush=True)
time.sleep(600)
"""


def test_claims_end_when_the_agent_is_killed(loops: Loops) -> None:
    disk = loops.disk(partitions=True)
    agent = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, disk.name],
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(REPO / ".dev"), "PATH": "/usr/bin:/bin"},
    )
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "claimed"
        assert loops.mount(f"/dev/{disk.name}p1")[0] == errno.EBUSY
        assert loops.swapon(f"/dev/{disk.name}p2") == errno.EBUSY
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        rc, _mp = loops.mount(f"/dev/{disk.name}p1")
        assert rc == 0
        assert loops.swapon(f"/dev/{disk.name}p2") == 0
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait(timeout=10)
        if agent.stdout is not None:
            agent.stdout.close()


def test_release_all_at_shutdown(loops: Loops) -> None:
    disk = loops.disk(partitions=True)
    leases = _manager()
    leases.prepare([LeaseTarget(FN_A, (disk,))])
    leases.release_all()
    assert _excl_free(disk)
    with pytest.raises(ClaimConflict, match="shutting down"):
        leases.prepare([LeaseTarget(FN_A, (disk,))])


_LINKS = """
import json
from unplugd.agent.errors import ClaimConflict
from unplugd.pci import PciAddress
from unplugd.agent.roots import Roots
from unplugd.agent.mutations.leases import LeaseManager, LeaseTarget
from unplugd.agent.mutations.links import NetlinkLinks
links = NetlinkLinks()
leases = LeaseManager(Roots.live_system(), links=links)
fn = PciAddress.parse("0000:00:0a.0")
out = {}
grant = leases.prepare([LeaseTarget(fn, interfaces=("uw0", "uw1"))], take_interfaces_down=True)
out["down"] = list(grant.interfaces_down)
out["during"] = [links.is_up("uw0"), links.is_up("uw1")]
out["restored"] = list(leases.release(grant.lease_id))
out["after"] = [links.is_up("uw0"), links.is_up("uw1")]
try:
    leases.prepare([LeaseTarget(fn, interfaces=("uw0", "gone0"))], take_interfaces_down=True)
except ClaimConflict as exc:
    out["conflict"] = exc.reasons
out["after_conflict"] = [links.is_up("uw0"), leases.leased() == {}]
links.close()
print(json.dumps(out))
"""


def test_interfaces_down_and_restored_in_a_netns(netns: NetNS) -> None:  # noqa: F811
    netns.ip("link", "add", "uw0", "type", "veth", "peer", "name", "uw1")
    netns.ip("link", "set", "uw0", "up")  # uw1 stays down: a lease must not bring it up later
    proc = netns.run(sys.executable, "-c", _LINKS)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["down"] == ["uw0"]
    assert out["during"] == [False, False]
    assert out["restored"] == ["uw0"]
    assert out["after"] == [True, False]
    assert len(out["conflict"]) == 1 and "gone0" in out["conflict"][0]
    assert out["after_conflict"] == [True, True]
