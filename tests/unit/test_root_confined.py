"""`inspect --root` reads only the tree: a capture is untrusted input.

No symlink in it leads out (resolved beneath the tree's base), no FIFO or device
node in it is read, every read is bounded, and a directory that is not a
capture is a usage error rather than an empty report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.build_scenarios import AGENT_PID, SCENARIOS
from unplugd.agent import cli, sysio, treetext
from unplugd.agent.roots import Roots
from unplugd.agent.sysio import beneath

SECRET = "SECRET-OUTSIDE-THE-TREE"
# A child that waits on a FIFO would hang the run: give it this long, then call it a failure.
HANG_SECONDS = 30


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """multifunction8 unpacked at tmp_path/tree, with a secret next to (outside) it."""
    root = tmp_path / "tree"
    treetext.unpack((SCENARIOS / "multifunction8.tree").read_text(), root)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text(SECRET + "\n")
    return root


def _replace(path: Path, make: object) -> None:
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    make(path)  # type: ignore[operator]


def _inspect(capsys: pytest.CaptureFixture[str], root: Path) -> tuple[dict[str, object], str]:
    assert cli.main(["inspect", "--json", "--root", str(root)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    return json.loads(out), out


def _inspect_child(root: Path) -> subprocess.CompletedProcess[str]:
    """inspect in a child process: a read that blocks fails the test instead of hanging it."""
    return subprocess.run(
        [sys.executable, "-m", "unplugd.agent.cli", "inspect", "--json", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
    )


def _problems(report: dict[str, object]) -> dict[str, str]:
    return {p["object"]: p["detail"] for p in report["problems"]}  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- symlinks


def test_links_out_of_the_tree_are_not_followed(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tree.parent / "outside" / "secret"
    kernel = tree / "proc/sys/kernel"
    _replace(kernel / "hostname", lambda p: os.symlink(str(secret), p))  # absolute
    _replace(kernel / "osrelease", lambda p: os.symlink("../../../../outside/secret", p))  # .. past the top
    _replace(tree / "proc/swaps", lambda p: os.symlink("/etc/shadow", p))
    report, out = _inspect(capsys, tree)
    assert SECRET not in out and "root:" not in out
    assert report["hostname"] == "" and report["kernel"] == ""
    assert "/proc/swaps" in "".join(_problems(report))  # unreadable: fail closed, not "no swap"


def test_an_absolute_link_resolves_inside_the_tree(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As if the tree were "/": a capture's absolute links keep their meaning."""
    kernel = tree / "proc/sys/kernel"
    (kernel / "real-hostname").write_text("inside\n")
    _replace(kernel / "hostname", lambda p: os.symlink("/proc/sys/kernel/real-hostname", p))
    _replace(kernel / "osrelease", lambda p: os.symlink("../../../../../../../proc/sys/kernel/real-hostname", p))
    report, _ = _inspect(capsys, tree)
    assert report["hostname"] == "inside" and report["kernel"] == "inside"


def test_a_directory_link_to_the_live_sys_lists_the_tree_not_this_machine(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sys/class/block -> /sys/class/block would show this machine's disks in the guest's report."""
    _replace(tree / "sys/class/block", lambda p: os.symlink("/sys/class/block", p))
    _replace(tree / "sys/block", lambda p: os.symlink("/sys/block", p))
    report, _ = _inspect(capsys, tree)
    mine = set(os.listdir("/sys/class/block")) - {"vda", "vdb", "vdb1", "vdc", "vdd", "vdd1", "vdd2", "vde"}
    names = {b["name"] for f in report["functions"] for b in f["blockDevices"]}  # type: ignore[attr-defined]
    assert not names & mine
    assert any("block" in o for o in _problems(report)), "the loop (a link to itself) is reported"


def test_reads_outside_the_base_are_refused_beneath_a_tree(tree: Path) -> None:
    with beneath(Roots.under(tree)), pytest.raises(OSError):
        sysio.os_listdir("/etc")
    assert sysio.os_listdir("/etc")  # the live system, outside `beneath`


def test_a_kept_directory_lists_whole_each_time_and_links_in_it_stay_beneath(tmp_path: Path) -> None:
    """A directory once listed is kept open for what is read in it, and its children are opened
    by name in it: listing it again gives every entry again, and a child that is a link, absolute
    or climbing, still resolves beneath the base (the base's entries, not this machine's /)."""
    base = tmp_path / "t"
    (base / "a" / "sub").mkdir(parents=True)
    for name in ("x", "y", "z"):
        (base / "a" / name).write_text(name)
    os.symlink("/", base / "a" / "abs")
    os.symlink("../../../../..", base / "a" / "up")
    with beneath(Roots.under(base)):
        first = sorted(sysio.os_listdir(base / "a"))
        assert sysio.read_text(base / "a" / "y") == "y"
        assert sorted(sysio.os_listdir(base / "a")) == first == ["abs", "sub", "up", "x", "y", "z"]
        assert sorted(e.name for e in sysio.os_scandir(base / "a")) == first
        assert sysio.os_listdir(base / "a" / "abs") == ["a"]
        assert sysio.os_listdir(base / "a" / "up") == ["a"]
        assert sysio.os_listdir(base / "a" / "sub") == []


# --------------------------------------------------------------------------- FIFOs, devices, sizes


def test_a_fifo_in_the_tree_is_not_waited_on(tree: Path) -> None:
    _replace(tree / "proc/swaps", os.mkfifo)
    _replace(tree / f"proc/{AGENT_PID}/mountinfo", os.mkfifo)
    os.mkfifo(tree / "proc/400/fd/9")  # a captured fd stored as a file, here a FIFO
    out = _inspect_child(tree)
    assert out.returncode == cli.EXIT_OK, out.stderr
    problems = _problems(json.loads(out.stdout))
    assert any("swaps" in o and "not a regular file" in d for o, d in problems.items())


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_a_device_node_in_the_tree_is_never_read(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zero = os.makedev(1, 5)  # /dev/zero: an endless read if it were opened as a file
    _replace(tree / "proc/swaps", lambda p: os.mknod(p, 0o600 | 0o020000, zero))
    report, _ = _inspect(capsys, tree)
    problems = _problems(report)
    assert any("swaps" in o and "not a regular file" in d for o, d in problems.items())


def test_every_read_is_bounded(tree: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sysio, "MAX_READ_BYTES", 64 << 10)
    with open(tree / "proc/swaps", "ab") as f:
        f.truncate(1 << 20)  # sparse: a MiB of NULs after the header
    report, _ = _inspect(capsys, tree)
    assert any("swaps" in o and "larger than 65536 bytes" in d for o, d in _problems(report).items())


def test_a_text_archive_is_bounded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(treetext, "MAX_ARCHIVE_BYTES", 1024)
    assert cli.main(["inspect", "--root", str(SCENARIOS / "multifunction8.tree")]) == cli.EXIT_FAILURE
    assert "larger than 1024 bytes" in capsys.readouterr().err


# --------------------------------------------------------------------------- what is a capture


@pytest.mark.parametrize("content", ["empty", "files", "sys link"])
def test_a_directory_that_is_not_a_capture_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    if content == "files":
        (tmp_path / "notes.txt").write_text("hello\n")
        (tmp_path / "etc").mkdir()
    elif content == "sys link":
        os.symlink("/sys", tmp_path / "sys")  # the live /sys under another name is no capture
    with pytest.raises(SystemExit) as exit_:
        cli.main(["inspect", "--root", str(tmp_path)])
    assert exit_.value.code == cli.EXIT_USAGE
    assert "not a captured tree" in capsys.readouterr().err


def test_a_capture_cut_short_still_inspects(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    shutil.rmtree(tree / "sys")
    report, _ = _inspect(capsys, tree)
    assert report["problems"]


def test_capture_of_a_tree_copies_nothing_from_outside_it(tree: Path, tmp_path: Path) -> None:
    from unplugd.agent.capture import capture

    secret = tree.parent / "outside" / "secret"
    _replace(tree / "proc/sys/kernel/hostname", lambda p: os.symlink(str(secret), p))
    _replace(tree / "proc/swaps", lambda p: os.symlink("../../outside/secret", p))
    _replace(tree / "sys/class/block", lambda p: os.symlink("/sys/class/block", p))
    capture(tmp_path / "copy", Roots.under(tree))
    copied = treetext.pack(tmp_path / "copy")
    assert SECRET not in copied
    assert "loop" not in copied.split("file proc/")[0]  # this machine's loop devices are not the tree's


def test_a_root_spelled_with_dots_reads_the_same(
    tree: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Collectors normalise some paths ("a/../tree/sys/..." -> "tree/sys/..."): still inside the tree."""
    (tree.parent / "a").mkdir()
    monkeypatch.chdir(tree.parent)
    report, _ = _inspect(capsys, Path("a/../tree"))
    assert report["problems"] == []
    assert len(report["functions"]) == 10  # type: ignore[arg-type]
