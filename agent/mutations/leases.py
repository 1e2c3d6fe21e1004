"""Unplug leases: functions held ready for unplug until released or expired.

A lease claims every whole disk below its functions with an exclusive open
(claims.py), so the kernel refuses mount and swapon of the disk and of its
partitions while it lasts, and optionally sets the functions' interfaces
down. All or nothing: if one claim fails, everything taken so far is undone
and ClaimConflict lists every reason. A lease ends on release, on expiry (a
timer per lease, no polling) or when the process ends: the kernel drops the
claims with the file descriptors, even on SIGKILL.

A lease is refused on a function the report shows in use (a mount, a holder,
an open fd...: policy.in_use over the same evaluation the report makes), not
only where the kernel refuses the claim: an fd held open does not stop O_EXCL.

Lease ids are credentials: whoever has one may renew or release the lease.
They are compared in constant time and never written where other clients can
read them (reports, errors, logs): those name a lease by its label
(unplugd.leaselabel). hashlib, hmac and secrets are imported by the calls that
need them: each loads OpenSSL's libcrypto (~3.3 MiB resident), which an agent
that never leases has no use for (daemon/footprint.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from unplugd.agent.errors import ClaimConflict, InvalidArgument, LeaseNotFound
from unplugd.agent.graph import DeviceGraph
from unplugd.agent.model import BlockDevice, Inventory, PciFunction
from unplugd.agent.mutations.claims import Claim, ClaimFailed, claim_block_device, release_claims
from unplugd.agent.mutations.links import LinkControl, LinkError
from unplugd.agent.readiness.policy import evaluate, in_use
from unplugd.agent.readiness.reasons import Code
from unplugd.agent.roots import Roots
from unplugd.leaselabel import lease_label
from unplugd.pci import PciAddress

__all__ = ["LeaseGrant", "LeaseManager", "LeaseTarget", "targets_for"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseTarget:
    """One function and what a lease on it holds, all taken from an inventory."""

    function: PciAddress
    disks: tuple[BlockDevice, ...] = ()
    interfaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class LeaseGrant:
    lease_id: str
    expires_at: float  # seconds since the epoch
    functions: tuple[PciAddress, ...]
    claimed: tuple[str, ...]
    interfaces_down: tuple[str, ...]


def targets_for(
    inventory: Inventory, functions: Sequence[PciFunction], *, take_interfaces_down: bool = False
) -> list[LeaseTarget]:
    """What leasing `functions` means in this inventory: their whole disks and interfaces.

    ClaimConflict, naming every reason, when the report shows one of them in
    use: the lease would hold a device something still uses. An interface
    that is only up does not count when the lease is to set it down.
    """
    verdicts = {v.address: v for v in evaluate(inventory)}
    graph = DeviceGraph(inventory)
    targets = []
    refusals: list[str] = []
    taken: set[str] = set()
    for fn in functions:
        disks = []
        for name in graph.disks_of(fn):
            if name in taken:
                continue  # an NVMe multipath head of two leased functions: claimed once
            taken.add(name)
            disk = inventory.block_devices.get(name)
            if disk is None:
                raise ClaimConflict(f"cannot prepare {fn.address}", [f"{name}: vanished during the scan"])
            disks.append(disk)
        blocking = [
            r.detail
            for r in in_use(verdicts[fn.address])
            if not (take_interfaces_down and r.code is Code.LINK_UP and r.object in fn.net_interfaces)
        ]
        refusals += [f"{fn.address} is in use: {why}" for why in blocking]
        targets.append(LeaseTarget(fn.address, tuple(disks), tuple(fn.net_interfaces)))
    if refusals:
        raise ClaimConflict("cannot prepare " + ", ".join(str(f.address) for f in functions), refusals)
    return targets


@dataclass
class _Lease:
    lease_id: str
    functions: tuple[PciAddress, ...]
    claims: list[Claim]
    interfaces_down: tuple[str, ...]
    expires_at: float
    took_interfaces_down: bool = False
    timer: threading.Timer | None = None

    @property
    def label(self) -> str:
        return lease_label(self.lease_id)

    def grant(self) -> LeaseGrant:
        return LeaseGrant(
            self.lease_id, self.expires_at, self.functions, tuple(c.name for c in self.claims), self.interfaces_down
        )


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
        # By label: a lookup's timing depends on a hash of what was sent, not on the id.
        self._leases: dict[str, _Lease] = {}
        self._closed = False

    # -- queries used by every report -----------------------------------------------

    def leased(self) -> dict[PciAddress, str]:
        """Leased functions and the label of their lease (what the report shows)."""
        with self._lock:
            return {fn: lease.label for lease in self._leases.values() for fn in lease.functions}

    def active(self) -> list[str]:
        """Labels of the leases in force."""
        with self._lock:
            return list(self._leases)

    def own_claims(self) -> frozenset[str]:
        with self._lock:
            return frozenset(c.name for lease in self._leases.values() for c in lease.claims)

    def get(self, lease_id: str) -> LeaseGrant:
        with self._lock:
            return self._find(lease_id).grant()

    # -- changes --------------------------------------------------------------------

    def prepare(
        self, targets: Sequence[LeaseTarget], seconds: int = 0, *, take_interfaces_down: bool = False
    ) -> LeaseGrant:
        if not targets:
            raise InvalidArgument("nothing to prepare")
        duration = self._duration(seconds)
        with self._lock:
            if self._closed:
                raise ClaimConflict("the agent is shutting down", [])
            held = self.leased()
            taken = [
                f"{t.function} is already held by lease {held[t.function]} (a label, not its id)"
                for t in targets
                if t.function in held
            ]
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
            import secrets  # here, not at the top: libcrypto through hmac (module docstring)

            lease_id = secrets.token_hex(16)
            while lease_label(lease_id) in self._leases:  # two live leases never share a label
                lease_id = secrets.token_hex(16)
            lease = _Lease(
                lease_id,
                tuple(t.function for t in targets),
                claims,
                tuple(downs),
                self._clock() + duration,
                take_interfaces_down,
            )
            self._leases[lease.label] = lease
            self._arm(lease, duration)
            log.info(
                "lease prepared",
                extra={
                    "lease": lease.label,
                    "functions": ",".join(map(str, lease.functions)),
                    "claimed": ",".join(c.name for c in claims),
                    "seconds": duration,
                },
            )
        self._on_change()
        return lease.grant()

    def renew(
        self,
        lease_id: str,
        seconds: int = 0,
        *,
        functions: Collection[PciAddress] | None = None,
        take_interfaces_down: bool = False,
    ) -> LeaseGrant:
        """Extend a lease as it is; nothing changes unless the whole request is valid.

        functions: what the request named, if anything: it must be exactly the
        lease's. take_interfaces_down: only if the lease was prepared with it.
        """
        duration = self._duration(seconds)
        with self._lock:
            lease = self._find(lease_id)
            if functions is not None and set(functions) != set(lease.functions):
                raise InvalidArgument(
                    "lease_id renews a lease as it is; its devices cannot change (release it and prepare a new one)"
                )
            if take_interfaces_down and not lease.took_interfaces_down:
                raise InvalidArgument(
                    "a renewal cannot take interfaces down (release the lease and prepare "
                    "a new one with take_interfaces_down)"
                )
            lease.expires_at = self._clock() + duration
            self._arm(lease, duration)
            log.info("lease renewed", extra={"lease": lease.label, "seconds": duration})
            return lease.grant()

    def release(self, lease_id: str) -> tuple[str, ...]:
        """End a lease; returns the interfaces set up again."""
        with self._lock:
            lease = self._find(lease_id)
            del self._leases[lease.label]
            restored = self._end(lease)
            log.info("lease released", extra={"lease": lease.label})
        self._on_change()
        return restored

    def release_all(self) -> None:
        """On shutdown: end every lease and refuse new ones."""
        with self._lock:
            self._closed = True
            leases, self._leases = list(self._leases.values()), {}
            for lease in leases:
                self._end(lease)
                log.info("lease released at shutdown", extra={"lease": lease.label})
        if leases:
            self._on_change()

    # -- internals ------------------------------------------------------------------

    def _duration(self, seconds: int) -> int:
        if seconds < 0:
            raise InvalidArgument("lease_seconds must not be negative")
        # Longer requests get the maximum; the response says when it ends.
        return min(seconds or self._default, self._max)

    def _find(self, lease_id: str) -> _Lease:
        """The lease whose id this is: the whole id compared, in constant time."""
        import hmac  # here, not at the top: libcrypto (module docstring)

        lease = self._leases.get(lease_label(lease_id))
        if lease is None or not hmac.compare_digest(
            lease.lease_id.encode(), lease_id.encode("utf-8", "surrogateescape")
        ):
            raise LeaseNotFound()
        return lease

    def _claim_all(self, targets: Iterable[LeaseTarget]) -> tuple[list[Claim], list[str]]:
        claims: list[Claim] = []
        reasons: list[str] = []
        for target in targets:
            for disk in target.disks:
                try:
                    claims.append(self._claim(self._roots, disk))
                except ClaimFailed as exc:
                    reasons.append(str(exc))
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
        timer = threading.Timer(duration, self._expire, args=(lease.label, lease.expires_at))
        timer.daemon = True
        timer.name = f"lease-{lease.label}"
        lease.timer = timer
        timer.start()

    def _expire(self, label: str, expires_at: float) -> None:
        with self._lock:
            lease = self._leases.get(label)
            # A renewal re-armed the lease after this timer fired: not ours to end.
            if lease is None or lease.expires_at != expires_at:
                return
            del self._leases[label]
            self._end(lease)
            log.info("lease expired", extra={"lease": label})
        self._on_change()
