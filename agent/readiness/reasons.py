"""Reason codes and verdicts: what the policy says about each PCI function.

The codes mirror proto ReasonCode (report.py converts by name; a test checks
that every code has a proto value). The taxonomy follows Windows' PnP
query-remove vetoes and udisks' checks (DESIGN.md).
"""

# No `from __future__ import annotations`: a NamedTuple compiles each field's annotation given as a
# string (typing.ForwardRef), ~25 us a field, and every `unplugd` start creates these classes.

from enum import Enum
from typing import NamedTuple

from unplugd.pci import PciAddress, PciPath

__all__ = ["Code", "FunctionVerdict", "ProcessRef", "Reason", "State"]


class State(Enum):
    READY = "READY"
    BUSY = "BUSY"
    UNKNOWN = "UNKNOWN"


class Code(Enum):
    # block
    MOUNTED = "MOUNTED"
    SWAP = "SWAP"
    HOLDER = "HOLDER"
    OPEN_BY_PROCESS = "OPEN_BY_PROCESS"
    EXCLUSIVE_CLAIM = "EXCLUSIVE_CLAIM"
    ROOT_FILESYSTEM = "ROOT_FILESYSTEM"
    EMPTY_CONTROLLER = "EMPTY_CONTROLLER"
    # network
    LINK_UP = "LINK_UP"
    HAS_ADDRESS = "HAS_ADDRESS"
    DEFAULT_ROUTE = "DEFAULT_ROUTE"
    UPPER_DEVICE = "UPPER_DEVICE"
    ACTIVE_CONNECTIONS = "ACTIVE_CONNECTIONS"
    NETWORK_NAMESPACE = "NETWORK_NAMESPACE"
    # any class
    NO_HOTPLUG_DRIVER = "NO_HOTPLUG_DRIVER"
    DRIVER_BOUND_UNKNOWN_CLASS = "DRIVER_BOUND_UNKNOWN_CLASS"
    UNREADABLE = "UNREADABLE"
    LEASED = "LEASED"
    BRIDGE_WITH_CHILDREN = "BRIDGE_WITH_CHILDREN"


class ProcessRef(NamedTuple):
    pid: int
    command: str
    fds: tuple[str, ...] = ()  # "/dev/vdb1 (fd 3)"


class Reason(NamedTuple):
    code: Code
    detail: str
    blocking: bool = True
    object: str = ""
    chain: tuple[str, ...] = ()
    mount_point: str = ""
    processes: tuple[ProcessRef, ...] = ()
    addresses: tuple[str, ...] = ()
    # UNREADABLE reasons make the function UNKNOWN rather than BUSY.
    undecided: bool = False


class FunctionVerdict(NamedTuple):
    address: PciAddress
    path: PciPath
    state: State
    reasons: tuple[Reason, ...] = ()
    # The block devices the verdict covers: the function's disks, their
    # partitions and every holder stacked on them (the report lists them).
    block_devices: tuple[str, ...] = ()
