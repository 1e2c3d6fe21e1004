"""The RPMs that packaging/rpm/build.sh builds from this tree with rpmbuild (Fedora/RHEL guests and hosts).

What the packages hold and do, read back from the built files: the agent only in `unplugd`, the
host tool only in `unplugctl`, the shared contract in `python3-unplugd`; each side runs from its
two packages alone; the config survives an upgrade; the scriptlets enable on install, restart on
upgrade and stop on erase; the source RPM carries its version; rpmlint finds no error.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.pkgfiles import AGENT, HOST, shipped_sources

pytestmark = pytest.mark.skipif(
    shutil.which("rpmbuild") is None, reason="rpmbuild not installed (Debian package rpm: packaging/dev/system-deps.sh)"
)

SPEC = REPO / "packaging" / "rpm" / "unplugd.spec"
RPMLINTRC = REPO / "packaging" / "rpm" / "unplugd.rpmlintrc"
PACKAGES = ("unplugd", "unplugctl", "python3-unplugd")


@dataclass(frozen=True)
class Built:
    rpms: dict[str, Path]  # package name -> binary .rpm
    srpm: Path
    printed: list[str]


def query(rpm: Path, *args: str) -> str:
    return subprocess.run(["rpm", "-qp", *args, str(rpm)], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("rpms")
    proc = subprocess.run(
        [str(REPO / "packaging" / "rpm" / "build.sh"), str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = proc.stdout.split()
    rpms: dict[str, Path] = {}
    srpm = None
    for line in printed:
        path = Path(line)
        if path.name.endswith(".src.rpm"):
            srpm = path
        else:
            rpms[query(path, "--qf", "%{NAME}").strip()] = path
    assert srpm is not None
    return Built(rpms, srpm, printed)


@dataclass(frozen=True)
class Entry:
    flags: str  # rpm's file flags: c %config, n noreplace, d %doc, ...
    mode: str  # ls-style: drwxr-xr-x


def files(rpm: Path) -> dict[str, Entry]:
    """Every path of the package (directories too) -> its flags and mode."""
    out = query(rpm, "--qf", "[%{FILENAMES}\t%{FILEFLAGS:fflags}\t%{FILEMODES:perms}\n]")
    return {path: Entry(flags, mode) for path, flags, mode in (line.split("\t") for line in out.splitlines())}


def site_of(paths: dict[str, Entry]) -> str:
    return next(p for p in paths if p.endswith("/site-packages/unplugd"))


def sources(directory: Path) -> set[str]:
    """The package's source files, relative to its directory, as the spec selects them."""
    suffixes = {".py", ".pyi", ".proto"}
    return {
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and (p.suffix in suffixes or p.name == "py.typed")
    }


def installed(paths: dict[str, Entry], site: str, sub: str) -> set[str]:
    """The files of the package below site/sub but bytecode, relative to it."""
    prefix = f"{site}/{sub}/" if sub else f"{site}/"
    return {
        p[len(prefix) :]
        for p, entry in paths.items()
        if p.startswith(prefix) and "/__pycache__/" not in p and not entry.mode.startswith("d")
    }


def test_build_prints_every_rpm_it_built(built: Built) -> None:
    assert sorted(built.rpms) == sorted(PACKAGES)
    assert len(built.printed) == len(PACKAGES) + 1
    assert all(Path(p).is_file() and p.endswith(".rpm") for p in built.printed)


def test_version_is_pyproject_and_the_source_rpm_rebuilds_with_it(built: Built, tmp_path: Path) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    evr = {query(rpm, "--qf", "%{VERSION}-%{RELEASE}") for rpm in [*built.rpms.values(), built.srpm]}
    assert len(evr) == 1
    (got,) = evr
    assert got.startswith(f"{version}-0.")
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True)
    if rev.returncode == 0:
        assert f".git{rev.stdout.strip()}" in got
    # The spec inside the source RPM names the same version, so it rebuilds without build.sh.
    subprocess.run(
        f"rpm2cpio {shlex.quote(str(built.srpm))} | cpio -i --quiet unplugd.spec", shell=True, cwd=tmp_path, check=True
    )
    spec_evr = subprocess.run(
        ["rpmspec", "-q", "--srpm", "--qf", "%{VERSION}-%{RELEASE}", str(tmp_path / "unplugd.spec")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert spec_evr == got


def test_agent_host_and_contract_each_in_their_own_package(built: Built) -> None:
    agent, host, contract = (files(built.rpms[name]) for name in PACKAGES)
    site = site_of(contract)
    assert site_of({**agent, **host, **contract}) == site
    # every source file of each side, in its package and nowhere else
    assert installed(agent, site, "agent") == sources(REPO / "agent")
    assert installed(host, site, "host") == sources(REPO / "host")
    assert installed(contract, site, "") == sources(REPO / "proto" / "unplugd")
    for name, paths in zip(PACKAGES, (agent, host, contract), strict=True):
        if name != "unplugd":
            assert not [p for p in paths if p.startswith(f"{site}/agent")], f"agent code in {name}"
        if name != "unplugctl":
            assert not [p for p in paths if p.startswith(f"{site}/host")], f"host code in {name}"
    # no path is owned by two packages (rpm would refuse to install them together)
    owners: dict[str, str] = {}
    for name, paths in zip(PACKAGES, (agent, host, contract), strict=True):
        for p in paths:
            assert p not in owners, f"{p} in {owners.get(p)} and {name}"
            owners[p] = name
    # byte-compiled at build time: rpm owns the .pyc, so erase leaves none behind
    assert f"{site}/agent/__pycache__" in agent and f"{site}/host/__pycache__" in host
    assert "/usr/bin/unplugd" in agent and "/usr/lib/systemd/system/unplugd.service" in agent
    assert "/usr/bin/unplugctl" in host


def test_guests_carry_no_host_code_and_hosts_no_agent(built: Built) -> None:
    """What `rpm -qlp` lists: a guest installs unplugd + python3-unplugd, a host unplugctl + python3-unplugd."""
    agent, host, contract = (set(files(built.rpms[name])) for name in PACKAGES)
    dist = site_of(files(built.rpms["python3-unplugd"])).removesuffix("unplugd")
    guest, hypervisor = contract | agent, contract | host
    assert [p for p in guest if p.startswith(dist + AGENT)] and [p for p in hypervisor if p.startswith(dist + HOST)]
    assert not [p for p in guest if p.startswith(dist + HOST) or "unplugctl" in p]
    assert not [p for p in hypervisor if p.startswith((dist + AGENT, "/etc/", "/usr/lib/systemd/", "/usr/lib/udev/"))]
    assert not [p for p in contract if p.startswith((dist + AGENT, dist + HOST, "/usr/bin/"))]


def test_every_source_file_is_in_a_package(built: Built) -> None:
    """Whatever its kind: a module, subpackage or data file added to agent/, host/ or proto/unplugd."""
    installed = {p for rpm in built.rpms.values() for p in files(rpm)}
    dist = site_of(files(built.rpms["python3-unplugd"])).removesuffix("unplugd")
    missing = sorted(rel for rel, target in shipped_sources().items() if dist + target not in installed)
    assert not missing, f"no RPM installs {missing}: packaging/rpm/unplugd.spec (copy_py, %files) leaves them out"


def test_config_is_noreplace_and_only_the_agent_has_one(built: Built) -> None:
    agent = files(built.rpms["unplugd"])
    assert set(agent["/etc/unplugd/config.toml"].flags) >= {"c", "n"}  # %config(noreplace)
    assert query(built.rpms["unplugd"], "-c").split() == ["/etc/unplugd/config.toml"]
    for name in ("unplugctl", "python3-unplugd"):
        assert query(built.rpms[name], "-c").strip() == ""


def extract(rpms: list[Path], root: Path) -> Path:
    root.mkdir()
    for rpm in rpms:
        subprocess.run(f"rpm2cpio {shlex.quote(str(rpm))} | cpio -idm --quiet", shell=True, cwd=root, check=True)
    return root


def run_launcher(root: Path, name: str, site: str) -> subprocess.CompletedProcess[str]:
    """Run /usr/bin/NAME from the extracted tree the way the kernel would: its #! line, then it."""
    launcher = root / "usr" / "bin" / name
    shebang = launcher.read_text().splitlines()[0]
    assert shebang.startswith("#!/usr/bin/python3")
    env = {**os.environ, "PYTHONPATH": str(root / site.lstrip("/")).removesuffix("/unplugd")}
    return subprocess.run(
        [*shebang[2:].split(), str(launcher), "--help"], capture_output=True, text=True, env=env, timeout=60
    )


def test_each_side_runs_from_its_two_packages_alone(built: Built, tmp_path: Path) -> None:
    site = site_of(files(built.rpms["python3-unplugd"]))
    guest = extract([built.rpms["unplugd"], built.rpms["python3-unplugd"]], tmp_path / "guest")
    host = extract([built.rpms["unplugctl"], built.rpms["python3-unplugd"]], tmp_path / "host")
    assert not (host / site.lstrip("/") / "agent").exists()
    for root, name, command in ((guest, "unplugd", "inspect"), (host, "unplugctl", "wait-ready")):
        proc = run_launcher(root, name, site)
        assert proc.returncode == 0, proc.stderr
        assert command in proc.stdout


def scriptlet(rpm: Path, tag: str, arg: int, tmp_path: Path) -> list[str]:
    """Run the package's scriptlet TAG as rpm would ($1 = ARG) with a systemctl that only logs."""
    body = query(rpm, "--qf", f"%{{{tag}}}")
    assert body and body != "(none)", f"no {tag} scriptlet"
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    log = tmp_path / "systemctl.log"
    log.write_text("")
    (fake / "systemctl").write_text(f'#!/bin/sh\necho "$*" >>{log}\n')
    (fake / "systemctl").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin"}
    subprocess.run(["/bin/sh", "-c", body, "sh", str(arg)], check=True, env=env, timeout=30)
    return log.read_text().splitlines()


def test_scriptlets_enable_on_install_restart_on_upgrade_stop_on_erase(built: Built, tmp_path: Path) -> None:
    rpm = built.rpms["unplugd"]
    # $1 counts the package's instances after the transaction: 1 first install, 2 upgrade, 0 erase.
    assert scriptlet(rpm, "POSTIN", 1, tmp_path) == ["--no-reload preset unplugd.service"]
    assert scriptlet(rpm, "POSTIN", 2, tmp_path) == []  # an upgrade keeps the admin's enable/disable
    assert scriptlet(rpm, "PREUN", 0, tmp_path) == ["--no-reload disable --now unplugd.service"]
    assert scriptlet(rpm, "PREUN", 1, tmp_path) == []  # the old version's erase during an upgrade
    assert scriptlet(rpm, "POSTUN", 1, tmp_path) == ["daemon-reload", "try-restart unplugd.service"]
    assert "try-restart unplugd.service" not in scriptlet(rpm, "POSTUN", 0, tmp_path)
    # the preset that the first install applies enables the service
    preset = [p for p in files(rpm) if p.startswith("/usr/lib/systemd/system-preset/")]
    assert preset == ["/usr/lib/systemd/system-preset/50-unplugd.preset"]
    assert "enable unplugd.service" in (REPO / "packaging" / "rpm" / "unplugd.preset").read_text().splitlines()
    for name in ("unplugctl", "python3-unplugd"):
        assert query(built.rpms[name], "--scripts").strip() == ""


@pytest.mark.skipif(shutil.which("rpmlint") is None, reason="rpmlint not installed (packaging/dev/system-deps.sh)")
def test_rpmlint_finds_no_error(built: Built) -> None:
    proc = subprocess.run(
        ["rpmlint", "-r", str(RPMLINTRC), str(SPEC), *built.printed], capture_output=True, text=True, timeout=120
    )
    errors = [line for line in proc.stdout.splitlines() if ": E: " in line]
    assert errors == []
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " 0 errors," in proc.stdout
