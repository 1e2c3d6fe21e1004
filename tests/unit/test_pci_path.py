from __future__ import annotations

import pytest

from unplugd.agent.model import format_devno, parse_devno
from unplugd.pci import PciAddress, PciPath


@pytest.mark.parametrize(
    ("text", "hops", "slot_path"),
    [
        ("0000:00/06.1", ((6, 1),), "0000:00/06"),
        ("0000:00/03.0/05.0", ((3, 0), (5, 0)), "0000:00/03.0/05"),
        ("0001:80/1c.4/00.0/1f.7", ((0x1C, 4), (0, 0), (0x1F, 7)), "0001:80/1c.4/00.0/1f"),
    ],
)
def test_pci_path_roundtrip(text: str, hops: tuple[tuple[int, int], ...], slot_path: str) -> None:
    p = PciPath.parse(text)
    assert p.hops == hops
    assert str(p) == text
    assert p.slot_path == slot_path


def test_pci_path_parent() -> None:
    assert PciPath.parse("0000:00/03.0/05.0").parent == PciPath.parse("0000:00/03.0")
    assert PciPath.parse("0000:00/03.0").parent is None


@pytest.mark.parametrize(
    "bad", ["", "0000:00", "0000:00/", "0000:00/3.0", "0000:00/20.0", "0000:00/03.8", "../../etc/shadow"]
)
def test_pci_path_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        PciPath.parse(bad)


def test_pci_address() -> None:
    a = PciAddress.parse("0000:00:06.1")
    assert (a.domain, a.bus, a.slot, a.function) == (0, 0, 6, 1)
    assert str(a) == "0000:00:06.1"
    assert a.slot_key == "0000:00:06"
    for bad in ("0000:00:06", "00:06.1", "0000:00:20.0", "vda"):
        with pytest.raises(ValueError):
            PciAddress.parse(bad)


def test_devno() -> None:
    assert parse_devno("252:16\n") == (252, 16)
    assert format_devno((8, 1)) == "8:1"
    for bad in ("252", "a:b", "1:-1", ""):
        with pytest.raises(ValueError):
            parse_devno(bad)
