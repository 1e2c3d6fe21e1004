"""PCI addresses and PCI paths: the names guest and host agree on (part of the contract).

A PciAddress (`0000:01:00.0`) names a function as one side's kernel or hypervisor numbers it; a
PciPath (`0000:00/02.0/00.0`) names it by the chain of slot.function hops from the root bus, which
both sides see the same way, unlike bus numbers behind bridges. No I/O here.
"""

# No `from __future__ import annotations`: a NamedTuple compiles each field's annotation given as a
# string (typing.ForwardRef), ~25 us a field, and every `unplugd` start creates these classes.

import re
from functools import cached_property
from typing import NamedTuple

__all__ = ["PciAddress", "PciPath"]

_BDF = re.compile(r"^([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
_PATH = re.compile(r"^([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2})((?:/[0-9a-fA-F]{2}\.[0-7])+)$")
_HOP = re.compile(r"^([0-9a-fA-F]{2})\.([0-7])$")


class PciAddress(NamedTuple):
    """A guest bus/device/function address, e.g. 0000:00:06.1."""

    domain: int
    bus: int
    slot: int
    function: int

    @classmethod
    def parse(cls, text: str) -> "PciAddress":
        m = _BDF.match(text.strip())
        if not m:
            raise ValueError(f"not a PCI address (DDDD:BB:SS.F): {text!r}")
        d, b, s, f = m.groups()
        if int(s, 16) > 0x1F:
            raise ValueError(f"PCI slot out of range in {text!r}")
        return cls(int(d, 16), int(b, 16), int(s, 16), int(f))

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"

    @property
    def slot_key(self) -> str:
        """domain:bus:slot, shared by the functions of one slot."""
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}"


class _PathFields(NamedTuple):
    domain: int
    root_bus: int
    hops: tuple[tuple[int, int], ...]


class PciPath(_PathFields):
    """Path from the root bus: domain, root bus number, then (slot, function) hops.

    `0000:00/03.0/05.0` is function 0 of slot 5 on the bus behind the bridge at
    slot 3 function 0 of root bus 0. Guest and host agree on it; bus numbers
    behind bridges they do not.

    A NamedTuple's subclass (no __slots__): the fields are the tuple's, the instance dict holds the
    cached texts.
    """

    @classmethod
    def parse(cls, text: str) -> "PciPath":
        m = _PATH.match(text.strip())
        if not m:
            raise ValueError(f"not a PCI path (DDDD:BB/SS.F[/SS.F...]): {text!r}")
        hops: list[tuple[int, int]] = []
        for hop in m.group(3).strip("/").split("/"):
            hm = _HOP.match(hop)
            assert hm is not None  # the outer pattern guarantees the form
            slot = int(hm.group(1), 16)
            if slot > 0x1F:
                raise ValueError(f"PCI slot out of range in {text!r}")
            hops.append((slot, int(hm.group(2))))
        return cls(int(m.group(1), 16), int(m.group(2), 16), tuple(hops))

    def __str__(self) -> str:
        return self._text

    @cached_property
    def _text(self) -> str:
        """Cached: a status of 256 functions prints and keys by each path several times."""
        return f"{self.domain:04x}:{self.root_bus:02x}" + "".join(f"/{s:02x}.{f:x}" for s, f in self.hops)

    @cached_property
    def slot_path(self) -> str:
        """The path without the last function: `0000:00/03.0/05` (cached: planners ask a lot)."""
        head = f"{self.domain:04x}:{self.root_bus:02x}" + "".join(f"/{s:02x}.{f:x}" for s, f in self.hops[:-1])
        return f"{head}/{self.hops[-1][0]:02x}"

    @property
    def function(self) -> int:
        return self.hops[-1][1]

    @property
    def parent(self) -> "PciPath | None":
        """The bridge this function sits behind, None on a root bus."""
        if len(self.hops) < 2:
            return None
        return PciPath(self.domain, self.root_bus, self.hops[:-1])
