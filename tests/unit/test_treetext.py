"""The text archive of trees: round trips, escapes, and refusing to write outside the target."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from unplugd.agent.treetext import HEADER, Entry, TreeTextError, pack, pack_entries, parse, unpack


def make_tree(root: Path) -> None:
    (root / "sys/block/vda/holders").mkdir(parents=True)
    (root / "sys/block/vda/dev").write_text("254:0\n")
    (root / "proc/1").mkdir(parents=True)
    (root / "proc/1/comm").write_bytes(b"init")  # no final newline
    (root / "proc/1/cmdline").write_bytes(b"/sbin/init\0splash\0")
    (root / "proc/1/environ").write_bytes(b"\xff\xfe bad utf-8 \\ backslash\r\n\ttab\x7f\n")
    (root / "proc/empty").write_bytes(b"")
    (root / "proc/newline").write_bytes(b"\n")
    (root / "proc/1/fd").mkdir()
    os.symlink("/dev/vda", root / "proc/1/fd/3")
    os.symlink("/tmp/a file (deleted)", root / "proc/1/fd/4")
    os.symlink("../../devices/pci0000:00/0000:00:02.0", root / "sys/block/link")
    (root / "dev/disk/by-label").mkdir(parents=True)
    os.symlink("../../vda", root / "dev/disk/by-label/my disk")
    (root / "proc/ünïcode").write_text("ok ✓\n")


def test_round_trip_is_exact_and_idempotent(tmp_path: Path) -> None:
    make_tree(tmp_path / "a")
    text = pack(tmp_path / "a")
    assert text.startswith(HEADER + "\n")
    unpack(text, tmp_path / "b")
    assert pack(tmp_path / "b") == text
    for rel in ("proc/1/comm", "proc/1/cmdline", "proc/1/environ", "proc/empty", "proc/newline", "proc/ünïcode"):
        assert (tmp_path / "b" / rel).read_bytes() == (tmp_path / "a" / rel).read_bytes(), rel
    assert os.readlink(tmp_path / "b/proc/1/fd/4") == "/tmp/a file (deleted)"
    assert os.readlink(tmp_path / "b/dev/disk/by-label/my disk") == "../../vda"
    assert (tmp_path / "b/sys/block/vda/holders").is_dir()


def test_text_is_reviewable(tmp_path: Path) -> None:
    make_tree(tmp_path)
    lines = pack(tmp_path).splitlines()
    assert "file proc/1/comm noeol" in lines
    assert "|init" in lines
    assert "|/sbin/init\\0splash\\0" in lines
    assert "|\\xff\\xfe bad utf-8 \\\\ backslash\\x0d" in lines
    assert "|\ttab\\x7f" in lines
    assert "link proc/1/fd/4 -> /tmp/a\\x20file\\x20(deleted)" in lines
    assert "link dev/disk/by-label/my\\x20disk -> ../../vda" in lines
    assert "dir sys/block/vda/holders" in lines
    assert "dir sys/block" not in lines  # implied by its content
    assert "file proc/empty" in lines and "file proc/newline" in lines


def test_content_looking_like_records_stays_content() -> None:
    text = pack_entries([Entry("a", "file", content=b"file b\nlink c -> d\n|x\n# not a comment\n")])
    (entry,) = parse(text)
    assert entry.content == b"file b\nlink c -> d\n|x\n# not a comment\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file ../x\n", "escapes"),
        ("file a/../../x\n", "escapes"),
        ("file /etc/passwd\n", "relative"),
        ("dir ./a\n", "escapes"),
        ("file a//b\n", "escapes"),
        ("link x -> \n", "expected 'link"),
        ("link x\n", "expected 'link"),
        ("file a b c\n", "expected 'file"),
        ("file a\n|\\q\n", "bad escape"),
        ("file a\n|\\x4\n", "bad escape"),
        ("file a\n|trailing\\\n", "bad escape"),
        ("file a\\x2\n", "bad escape"),
        ("|orphan\n", "outside a file"),
        ("socket s\n", "unknown record"),
        ("file a noeol\n", "noeol"),
        ("file a\nfile a\n", "duplicate"),
        ("file a\\x00b\n", "NUL"),
    ],
)
def test_malformed_archives_are_refused(text: str, message: str) -> None:
    with pytest.raises(TreeTextError, match=message):
        parse(text)


def test_error_names_the_line() -> None:
    with pytest.raises(TreeTextError, match="line 3"):
        parse("# treetext 1\nfile ok\n|\\z\n")


def test_unpack_refuses_writing_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    text = f"link evil -> {outside}\nfile evil/planted\n|x\n"
    with pytest.raises(TreeTextError, match="not a directory"):
        unpack(text, tmp_path / "dest")
    assert list(outside.iterdir()) == []


def test_unpack_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("mine")
    with pytest.raises(TreeTextError, match="already exists"):
        unpack("file a\n|theirs\n", tmp_path)
    assert (tmp_path / "a").read_text() == "mine"


def test_pack_refuses_special_files(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s"))
        with pytest.raises(TreeTextError, match="only files, directories and symlinks"):
            pack(tmp_path)
    finally:
        sock.close()


def test_empty_archive_is_an_empty_tree(tmp_path: Path) -> None:
    assert unpack(HEADER + "\n", tmp_path / "e") == []
    assert pack(tmp_path / "e") == HEADER + "\n"
