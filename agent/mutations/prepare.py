"""What PrepareUnplug does with a request: a new lease, or the renewal of one.

The names are resolved against one fresh scan (as a report would see them),
never turned into paths. A renewal changes nothing unless the whole request
is valid: the names, if any, are checked before the lease is touched.
"""

from __future__ import annotations

from collections.abc import Sequence

from unplugd.agent.daemon.scans import EngineApi
from unplugd.agent.errors import InvalidArgument
from unplugd.agent.model import Inventory, PciFunction
from unplugd.agent.mutations.leases import LeaseGrant, LeaseManager, targets_for
from unplugd.agent.roots import Roots

__all__ = ["prepare_unplug", "select_named"]


def select_named(
    engine: EngineApi, roots: Roots, leases: LeaseManager, names: Sequence[str]
) -> tuple[Inventory, list[PciFunction]]:
    """One scan (our own claims known as ours) and the functions `names` designate in it."""
    inventory = engine.scan(roots, own_claims=leases.own_claims())
    return inventory, engine.select(inventory, names)


def prepare_unplug(
    engine: EngineApi,
    roots: Roots,
    leases: LeaseManager,
    names: Sequence[str],
    *,
    lease_id: str,
    seconds: int,
    take_interfaces_down: bool,
) -> LeaseGrant:
    """Renew `lease_id` when given (the names, if any, must be the lease's), else lease `names`."""
    if lease_id:
        wanted = None
        if names:
            wanted = {f.address for f in select_named(engine, roots, leases, names)[1]}
        return leases.renew(lease_id, seconds, functions=wanted, take_interfaces_down=take_interfaces_down)
    if not names:
        raise InvalidArgument("name at least one device to prepare")
    inventory, functions = select_named(engine, roots, leases, names)
    targets = targets_for(inventory, functions, take_interfaces_down=take_interfaces_down)
    return leases.prepare(targets, seconds, take_interfaces_down=take_interfaces_down)
