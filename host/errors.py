"""The host side's exception root: `except HostError` catches every error it raises on purpose.

    HostError
     +-- BackendError            the hypervisor could not be asked (connection, protocol)
     |    +-- QmpCommandError    a QMP command answered with an error (backends/qmp.py)
     |    +-- DomainNotFound     no such libvirt domain / QMP socket
     |    +-- TopologyError      its answer (query-pci, domain XML) is not what it should be
     |    +-- UnplugRefused      the hypervisor said no to device_del / detach
     |    |    +-- UnplugInProgress     an unplug of the device is already pending
     |    |    +-- GuestBusy            "guest is busy (power indicator blinking)"
     |    |    +-- HotplugUnsupported   bus or device without hotplug support
     |    |    +-- MultifunctionRefused libvirt: device shares a multifunction slot
     |    |    +-- DeviceGone           the device no longer exists
     |    +-- AddRejected        the hypervisor said no to a hot-add (device_add, a backend, attach)
     +-- AgentClientError        the guest agent could not be asked (client.py)
     |    +-- AgentUnreachable   address + cause (connect, relay, deadline)
     |    +-- AgentCallFailed    the agent answered with an error status
     +-- RelayError              a relay could not reach the agent (relays.py; becomes the
     |                           cause in AgentUnreachable, never raised to the caller)
     +-- DeviceNotFound          a DEVICE selector matches nothing in the topology
     +-- AmbiguousDevice         ... or more than one slot
     +-- UsageError              unplugctl's arguments do not make sense (cli.py)
     +-- SpecError               a device spec for `plug` does not make sense (devicespec.py)
     +-- NoRoom                  no free hotpluggable slot where `plug` asked (placement.py)

The classes named with a module live there, beside what raises them (the
agent client's beside grpc, QMP's beside qemu.qmp); the rest live here, and
this module imports nothing, so the planner, which does no I/O, raises from it.
The orchestrator turns the backend and agent families into outcomes; the CLI
maps what is left to exit codes: DeviceNotFound, AmbiguousDevice, UsageError and
SpecError are usage errors (2), any other HostError a failure (1).
tests/unit/test_host_errors.py checks this drawing against the classes.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AddRejected",
    "AmbiguousDevice",
    "BackendError",
    "DeviceGone",
    "DeviceNotFound",
    "DomainNotFound",
    "GuestBusy",
    "HostError",
    "HotplugUnsupported",
    "MultifunctionRefused",
    "TopologyError",
    "UnplugInProgress",
    "UnplugRefused",
]


class HostError(Exception):
    """Root of every error the host side raises on purpose."""


class BackendError(HostError):
    pass


class DomainNotFound(BackendError):
    pass


class TopologyError(BackendError):
    pass


class UnplugRefused(BackendError):
    """The hypervisor refused the unplug request; `device` is what was asked for."""

    def __init__(self, device: str, message: str) -> None:
        super().__init__(f"unplug of {device} refused: {message}")
        self.device = device
        self.hypervisor_message = message


class UnplugInProgress(UnplugRefused):
    pass


class GuestBusy(UnplugRefused):
    pass


class HotplugUnsupported(UnplugRefused):
    pass


class MultifunctionRefused(UnplugRefused):
    pass


class DeviceGone(UnplugRefused):
    pass


class DeviceNotFound(HostError):
    def __init__(self, selector: str) -> None:
        super().__init__(
            f"no device matches {selector!r} (try an id or alias, a target such as vdb, a PCI path or guest address)"
        )
        self.selector = selector


class AmbiguousDevice(HostError):
    def __init__(self, selector: str, candidates: Sequence[str]) -> None:
        super().__init__(f"{selector!r} matches more than one slot: {', '.join(candidates)}")
        self.selector = selector
        self.candidates = list(candidates)


class AddRejected(BackendError):
    """The hypervisor refused to add a device or its backend; `what` names it."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(f"{what}: {message}")
        self.what = what
        self.hypervisor_message = message
