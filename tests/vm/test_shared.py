"""The run-shared artefacts (tests/vm/shared.py): made once across processes, retried after a failure."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from tests.vm import shared


def _make_slowly(target: Path) -> None:
    with open(target.parent / "makes.log", "a") as log:
        log.write("made\n")
    time.sleep(0.3)  # long enough that the other process asks while this one holds the lock
    (target / "artefact").write_text("ok")


def _ask(uid: str, out: multiprocessing.Queue[str]) -> None:
    import os

    os.environ[shared.RUN_ENV] = uid
    out.put((shared.made_once("thing", _make_slowly) / "artefact").read_text())


def test_two_processes_asking_at_once_make_it_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # gettempdir() answers it
    uid = "run1"
    ctx = multiprocessing.get_context("fork")  # the children inherit the patched temporary directory
    out: multiprocessing.Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=_ask, args=(uid, out)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert sorted(out.get(timeout=5) for _ in procs) == ["ok", "ok"]
    assert (shared.run_dir_for(uid) / "makes.log").read_text() == "made\n"


def test_a_failed_make_is_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # gettempdir() answers it
    monkeypatch.setenv(shared.RUN_ENV, "run2")

    def fail(target: Path) -> None:
        (target / "half").write_text("x")
        raise RuntimeError("boot failed")

    with pytest.raises(RuntimeError):
        shared.made_once("thing", fail)

    def succeed(target: Path) -> None:
        (target / "whole").write_text("y")

    made = shared.made_once("thing", succeed)
    assert sorted(p.name for p in made.iterdir()) == [".done", "whole"]  # the half-made one is gone


def test_outside_a_run_there_is_no_shared_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(shared.RUN_ENV, raising=False)
    assert shared.run_dir() is None
    with pytest.raises(RuntimeError, match="outside an xdist run"):
        shared.made_once("thing", lambda target: None)


def test_a_run_id_cannot_climb_out_of_the_temporary_directory() -> None:
    with pytest.raises(ValueError):
        shared.run_dir_for("../../etc")
