"""A swap file is placed on its filesystem through init's mount table, not the agent's sandboxed one.

unplugd.service runs the agent in its own mount namespace where ProtectHome= and PrivateTmp= mount
empty directories over /home, /root, /run/user and /tmp. A swap file under /home must still pin
the disk /home lives on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.build_scenarios import Tree
from tests.unit.test_scenarios import inspect_json, verdicts

INIT_NS = 4026531841  # init's namespace; the agent's is build_scenarios.OWN_NS
DISK = "0000:00:05.0"


def sandboxed_tree(swap_path: str) -> Tree:
    t = Tree()
    fn = t.pci(DISK)
    t.disk(t.virtio(fn, 10, "virtio_blk"), "vdb", (252, 0), parts=1)
    t.mount((252, 1), "/home", "/dev/vdb1")
    t.namespace(INIT_NS, 1, "systemd")  # pid 1 sees / and /home as they are
    # then the sandbox covers /home in the agent's namespace only (ProtectHome=yes)
    t.mount((0, 40), "/home", "tmpfs", fstype="tmpfs", root="/systemd/inaccessible/dir")
    t.swap(swap_path, kind="file")
    return t


def test_swap_file_under_a_sandboxed_home_pins_its_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = tmp_path / "sandboxed.tree"
    tree.write_text(sandboxed_tree("/home/swapfile").text(), encoding="utf-8")
    state, reasons = verdicts(inspect_json(capsys, tree))[DISK]
    assert state == "BUSY"
    assert {"SWAP", "MOUNTED"} <= reasons
