"""Unplug leases: functions held ready for unplug until released or expired.

A lease claims every whole disk below its functions with an exclusive open
(claims.py), so the kernel refuses mount and swapon of the disk and of its
partitions while it lasts, and optionally sets the functions' interfaces
down. All or nothing: if one claim fails, everything taken so far is undone
and ClaimConflict lists every reason. A lease ends on release, on expiry (a
timer per lease, no polling) or when the process ends: the kernel drops the
claims with the file descriptors, even on SIGKILL.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from unplugd.agent.errors import ClaimConflict, InvalidArgument, LeaseNotFound
from unplugd.agent.model import BlockDevice, Inventory, PciFunction
from unplugd.agent.roots import Roots
from unplugd.agent.rpc.claims import Claim, ClaimFailed, claim_block_device, release_claims
from unplugd.agent.rpc.links import LinkControl, LinkError
from unplugd.pci import PciAddress

__all__ = ["LeaseGrant", "LeaseManager", "LeaseTarget", "targets_for"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseTarget:
    """One function and what a lease on it holds, all taken from an inventory."""

    function: PciAddress
    disks: tuple[BlockDevice, ...] = ()
    interfaces: tuple[str, ...] = ()
    # Kernel-side users of the disks known at scan time, to explain a refusal.
    users: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class LeaseGrant:
    lease_id: str
    expires_at: float  # seconds since the epoch
    functions: tuple[PciAddress, ...]
    claimed: tuple[str, ...]
    interfaces_down: tuple[str, ...]


def targets_for(inventory: Inventory, functions: Sequence[PciFunction]) -> list[LeaseTarget]:
    """What leasing `functions` means in this inventory: their whole disks and interfaces."""
    targets = []
    for fn in functions:
        disks = []
        users: dict[str, tuple[str, ...]] = {}
        for name in fn.block_devices:
            disk = inventory.block_devices.get(name)
            if disk is None:
                raise ClaimConflict(f"cannot prepare {fn.address}", [f"{name}: vanished during the scan"])
            disks.append(disk)
            users[name] = _users_of(inventory, disk)
        targets.append(LeaseTarget(fn.address, tuple(disks), tuple(fn.net_interfaces), users))
    return targets


def _users_of(inventory: Inventory, disk: BlockDevice) -> tuple[str, ...]:
    family = {b.devno: b.name for b in inventory.block_devices.values() if disk.name in (b.name, b.parent)}
    found = [f"{family[m.devno]} mounted on {m.mount_point}" for m in inventory.mounts if m.devno in family]
    found += [f"{family[s.devno]} used as swap" for s in inventory.swaps if s.devno in family]
    found += [f"{b.name} held by {', '.join(b.holders)}" for b in inventory.block_devices.values()
              if b.devno in family and b.holders]
    return tuple(dict.fromkeys(found))


@dataclass
class _Lease:
    lease_id: str
    functions: tuple[PciAddress, ...]
    claims: list[Claim]
    interfaces_down: tuple[str, ...]
    expires_at: float
    timer: threading.Timer | None = None

    def grant(self) -> LeaseGrant:
        return LeaseGrant(self.lease_id, self.expires_at, self.functions,
                          tuple(c.name for c in self.claims), self.interfaces_down)


class LeaseManager:
    def __init__(
        self,
        roots: Roots,
        *,
        default_seconds: int = 60,
        max_seconds: int = 900,
        links: LinkControl | None = None,
        on_change: Callable[[], None] = lambda: None,
        claim: Callable[[Roots, BlockDevice], Claim] = claim_block_device,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._roots = roots
        self._default = default_seconds
        self._max = max_seconds
        self._links = links
        self._on_change = on_change
        self._claim = claim
        self._clock = clock
        self._lock = threading.RLock()
        self._leases: dict[str, _Lease] = {}
        self._closed = False

    # -- queries used by every report -----------------------------------------------

    def leased(self) -> dict[PciAddress, str]:
        with self._lock:
            return {fn: lease.lease_id for lease in self._leases.values() for fn in lease.functions}

    def active(self) -> list[str]:
        """Ids of the leases in force."""
        with self._lock:
            return list(self._leases)

    def own_claims(self) -> frozenset[str]:
        with self._lock:
            return frozenset(c.name for lease in self._leases.values() for c in lease.claims)

    def get(self, lease_id: str) -> LeaseGrant:
        with self._lock:
            return self._find(lease_id).grant()

    # -- changes --------------------------------------------------------------------

    def prepare(self, targets: Sequence[LeaseTarget], seconds: int = 0, *,
                take_interfaces_down: bool = False) -> LeaseGrant:
        if not targets:
            raise InvalidArgument("nothing to prepare")
        duration = self._duration(seconds)
        with self._lock:
            if self._closed:
                raise ClaimConflict("the agent is shutting down", [])
            held = self.leased()
            taken = [f"{t.function} is already held by lease {held[t.function]}" for t in targets
                     if t.function in held]
            if taken:
                raise ClaimConflict("cannot prepare", taken)
            claims, reasons = self._claim_all(targets)
            downs: list[str] = []
            if not reasons and take_interfaces_down:
                downs, reasons = self._links_down(targets)
            if reasons:
                release_claims(claims)
                self._links_restore(downs)
                raise ClaimConflict("cannot prepare " + ", ".join(str(t.function) for t in targets), reasons)
            lease = _Lease(secrets.token_hex(16), tuple(t.function for t in targets), claims, tuple(downs),
                           self._clock() + duration)
            self._leases[lease.lease_id] = lease
            self._arm(lease, duration)
            log.info("lease prepared", extra={"lease": lease.lease_id, "functions": ",".join(map(str, lease.functions)),
                                              "claimed": ",".join(c.name for c in claims), "seconds": duration})
        self._on_change()
        return lease.grant()

    def renew(self, lease_id: str, seconds: int = 0) -> LeaseGrant:
        duration = self._duration(seconds)
        with self._lock:
            lease = self._find(lease_id)
            lease.expires_at = self._clock() + duration
            self._arm(lease, duration)
            log.info("lease renewed", extra={"lease": lease_id, "seconds": duration})
            return lease.grant()

    def release(self, lease_id: str) -> tuple[str, ...]:
        """End a lease; returns the interfaces set up again."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                raise LeaseNotFound(lease_id)
            restored = self._end(lease)
            log.info("lease released", extra={"lease": lease_id})
        self._on_change()
        return restored

    def release_all(self) -> None:
        """On shutdown: end every lease and refuse new ones."""
        with self._lock:
            self._closed = True
            leases, self._leases = list(self._leases.values()), {}
            for lease in leases:
                self._end(lease)
                log.info("lease released at shutdown", extra={"lease": lease.lease_id})
        if leases:
            self._on_change()

    # -- internals ------------------------------------------------------------------

    def _duration(self, seconds: int) -> int:
        if seconds < 0:
            raise InvalidArgument("lease_seconds must not be negative")
        # Longer requests get the maximum; the response says when it ends.
        return min(seconds or self._default, self._max)

    def _find(self, lease_id: str) -> _Lease:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(lease_id)
        return lease

    def _claim_all(self, targets: Iterable[LeaseTarget]) -> tuple[list[Claim], list[str]]:
        claims: list[Claim] = []
        reasons: list[str] = []
        for target in targets:
            for disk in target.disks:
                try:
                    claims.append(self._claim(self._roots, disk))
                except ClaimFailed as exc:
                    users = target.users.get(disk.name, ())
                    reasons.append(str(exc) + (f" ({'; '.join(users)})" if users else ""))
        return claims, reasons

    def _links_down(self, targets: Iterable[LeaseTarget]) -> tuple[list[str], list[str]]:
        if self._links is None:
            return [], ["setting interfaces down is not available in this agent"]
        downs: list[str] = []
        for name in (i for t in targets for i in t.interfaces):
            try:
                if self._links.is_up(name):
                    self._links.set_up(name, False)
                    downs.append(name)
            except LinkError as exc:
                return downs, [str(exc)]
        return downs, []

    def _links_restore(self, names: Iterable[str]) -> tuple[str, ...]:
        restored = []
        for name in names:
            try:
                assert self._links is not None
                self._links.set_up(name, True)
                restored.append(name)
            except LinkError as exc:
                log.warning("could not restore interface", extra={"interface": name, "error": str(exc)})
        return tuple(restored)

    def _end(self, lease: _Lease) -> tuple[str, ...]:
        if lease.timer is not None:
            lease.timer.cancel()
        release_claims(lease.claims)
        return self._links_restore(lease.interfaces_down)

    def _arm(self, lease: _Lease, duration: float) -> None:
        if lease.timer is not None:
            lease.timer.cancel()
        timer = threading.Timer(duration, self._expire, args=(lease.lease_id, lease.expires_at))
        timer.daemon = True
        timer.name = f"lease-{lease.lease_id[:8]}"
        lease.timer = timer
        timer.start()

    def _expire(self, lease_id: str, expires_at: float) -> None:
        with self._lock:
            lease = self._leases.get(lease_id)
            # A renewal re-armed the lease after this timer fired: not ours to end.
            if lease is None or lease.expires_at != expires_at:
                return
            del self._leases[lease_id]
            self._end(lease)
            log.info("lease expired", extra={"lease": lease_id})
        self._on_change()
