"""`python -m build` from a clean checkout: an sdist with the whole source tree and a wheel with
exactly the mapped packages, both passing `twine check`, with the SPDX license and the two commands.

Builds in build's isolated environment (setuptools>=77 from the package index), as a user or CI
would; about ten seconds.
"""

from __future__ import annotations

import configparser
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from tests.conftest import REPO
from tests.pkgfiles import shipped_sources, tracked_files

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
NAME, VERSION = PYPROJECT["project"]["name"], PYPROJECT["project"]["version"]


@dataclass(frozen=True)
class Dist:
    checkout: Path
    sdist: Path
    wheel: Path
    log: str


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    checkout = tmp_path_factory.mktemp("checkout")
    files = tracked_files()
    # a copy, not the work tree: no .venv, .dev, caches or build/ leftovers can leak in
    tar = subprocess.run(
        ["tar", "-C", str(REPO), "-cf", "-", "--null", "-T", "-"],
        input="\0".join(files).encode(),
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-C", str(checkout), "-xf", "-"], input=tar, check=True)
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(checkout)],
        capture_output=True,
        text=True,
        check=False,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dist(checkout, sdist, wheel, log)


def test_build_is_clean_and_twine_accepts_both(dist: Dist) -> None:
    # setuptools < 77 rejects the SPDX string; >= 77 warns about a license table or classifier
    assert "SetuptoolsDeprecationWarning" not in dist.log, dist.log
    assert "License classifiers are deprecated" not in dist.log
    done = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(dist.sdist), str(dist.wheel)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2


def wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_wheel_holds_exactly_the_mapped_packages(dist: Dist) -> None:
    info = f"{NAME}-{VERSION}.dist-info/"
    names = [n for n in wheel_names(dist.wheel) if not n.startswith(info)]
    packages = {str(PurePosixPath(n).parent).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert packages == set(SETUPTOOLS["packages"])

    # every tracked file of a mapped directory (tests/pkgfiles.py), under its import name, and nothing else
    assert set(names) == set(shipped_sources().values())
    # the contract both sides share, at the root of the package
    for module in ("unplugd/pci.py", "unplugd/framing.py", "unplugd/splice.py", "unplugd/py.typed"):
        assert module in names
    for data in ("unplugd/v1/report.proto", "unplugd/v1/agent_service.proto", "unplugd/v1/report_pb2.pyi"):
        assert data in names
    assert not any(n.startswith(("tests/", "agent/", "host/", "proto/")) or "__pycache__" in n for n in names)


def test_wheel_metadata_license_and_commands(dist: Dist) -> None:
    info = f"{NAME}-{VERSION}.dist-info"
    with zipfile.ZipFile(dist.wheel) as z:
        metadata = z.read(f"{info}/METADATA").decode()
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        license_text = z.read(f"{info}/licenses/LICENSE").decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert "License-File: LICENSE" in metadata.splitlines()
    assert license_text == (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    parser = configparser.ConfigParser()
    parser.read_string(entry_points)
    scripts = dict(parser["console_scripts"])
    assert scripts == {"unplugd": "unplugd.agent.entry:main", "unplugctl": "unplugd.host.cli:main"}
    assert scripts == PYPROJECT["project"]["scripts"]


def test_sdist_is_the_whole_source_tree(dist: Dist) -> None:
    prefix = f"{NAME}-{VERSION}/"
    with tarfile.open(dist.sdist) as t:
        members = {m.name.removeprefix(prefix) for m in t.getmembers() if m.isfile()}
    # dotfiles (.gitignore, .ci/) are the repository's, not the source's
    missing = {f for f in tracked_files() if not f.startswith(".")} - members
    assert not missing, sorted(missing)
    assert "PKG-INFO" in members
    assert not any("__pycache__" in m or m.endswith(".pyc") for m in members)


def test_wheel_runs_both_commands(dist: Dist, tmp_path: Path) -> None:
    """Unpacked as pip would install it, the wheel's own modules import and answer --help."""
    with zipfile.ZipFile(dist.wheel) as z:
        z.extractall(tmp_path)
    # Debian's python3 has the dependencies (system-deps) and no .pth pointing at the work tree.
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    for module, command in (("unplugd.agent.entry", "inspect"), ("unplugd.host.cli", "wait-ready")):
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import unplugd; print(unplugd.__file__); "
            f"from {module} import main; sys.exit(main(['--help']))"
        )
        done = subprocess.run([python, "-I", "-c", code, str(tmp_path)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        where, _, help_text = done.stdout.partition("\n")
        assert Path(where).is_relative_to(tmp_path)
        assert command in help_text and "exit codes" in help_text
