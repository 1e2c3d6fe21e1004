"""Setting network interfaces administratively down and up again (leases' option).

LinkControl is a Protocol so lease tests can count calls; NetlinkLinks does
it through pyroute2 in the agent's own network namespace.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from unplugd.agent.errors import AgentError

__all__ = ["LinkControl", "LinkError", "NetlinkLinks"]

log = logging.getLogger(__name__)

IFF_UP = 0x1


class LinkError(AgentError):
    pass


class LinkControl(Protocol):
    def is_up(self, name: str) -> bool: ...

    def set_up(self, name: str, up: bool) -> None: ...


class NetlinkLinks:
    """pyroute2's IPRoute, opened on first use and shared under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ipr: Any = None

    def _index(self, name: str) -> int:
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        found = self._ipr.link_lookup(ifname=name)
        if not found:
            raise LinkError(f"interface {name} vanished")
        return int(found[0])

    def is_up(self, name: str) -> bool:
        with self._lock:
            try:
                index = self._index(name)
                (link,) = self._ipr.link("get", index=index)
            except LinkError:
                raise
            except Exception as exc:
                raise LinkError(f"cannot read {name}: {exc}") from exc
            return bool(int(link["flags"]) & IFF_UP)

    def set_up(self, name: str, up: bool) -> None:
        with self._lock:
            try:
                index = self._index(name)
                self._ipr.link("set", index=index, state="up" if up else "down")
            except LinkError:
                raise
            except Exception as exc:
                raise LinkError(f"cannot set {name} {'up' if up else 'down'}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None
