"""packaging/deb/build.sh: three .debs, each with only its side's code, installable together, lintian-clean.

The maintainer scripts run here against stand-ins for deb-systemd-helper, deb-systemd-invoke and
systemctl that record their calls, so install / upgrade / remove / purge are checked for what they
ask of systemd; the real cycle in a booted guest is the VM harness's.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.pkgfiles import AGENT, HOST, shipped_sources

BUILD = REPO / "packaging" / "deb" / "build.sh"
DIST = "usr/lib/python3/dist-packages/"
SITE = DIST + "unplugd/"
PACKAGES = ("python3-unplugd", "unplugd", "unplugctl")

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed (not Debian?)")


@dataclass(frozen=True)
class Deb:
    path: Path

    def field(self, name: str) -> str:
        return subprocess.run(
            ["dpkg-deb", "-f", str(self.path), name], capture_output=True, text=True, check=True
        ).stdout.strip()

    def control(self, member: str) -> str | None:
        """A file of the control archive (conffiles, postinst, ...), None if absent."""
        data = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(self.path)], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            try:
                f = tar.extractfile(f"./{member}")
            except KeyError:
                return None
            return f.read().decode() if f is not None else None

    def files(self) -> dict[str, tarfile.TarInfo]:
        """Regular files and links of the data archive, by path without the leading './'."""
        data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(self.path)], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return {m.name.removeprefix("./"): m for m in tar.getmembers() if not m.isdir()}

    def read(self, name: str) -> bytes:
        data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(self.path)], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            f = tar.extractfile(f"./{name}")
            assert f is not None
            return f.read()


def build(out: Path, version: str | None = None) -> list[Path]:
    env = dict(os.environ)
    env.pop("UNPLUGD_DEB_VERSION", None)
    if version is not None:
        env["UNPLUGD_DEB_VERSION"] = version
    proc = subprocess.run(["sh", str(BUILD), str(out)], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    return [Path(line) for line in proc.stdout.splitlines()]


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Deb]:
    paths = build(tmp_path_factory.mktemp("debs"))
    # one path a line, every one a file in OUTDIR: the VM harness reads that output
    assert len(paths) == 3 and all(p.is_file() for p in paths)
    found = {Deb(p).field("Package"): Deb(p) for p in paths}
    assert sorted(found) == sorted(PACKAGES)
    return found


def python_files(files: dict[str, tarfile.TarInfo]) -> set[str]:
    return {n.removeprefix(SITE) for n in files if n.startswith(SITE) and n.endswith(".py")}


def repo_python(src: str, prefix: str) -> set[str]:
    root = REPO / src
    return {prefix + str(p.relative_to(root)) for p in root.rglob("*.py") if "__pycache__" not in p.parts}


def test_each_package_carries_its_side_and_together_all_of_it(debs: dict[str, Deb]) -> None:
    shared = python_files(debs["python3-unplugd"].files())
    agent = python_files(debs["unplugd"].files())
    host = python_files(debs["unplugctl"].files())
    assert shared == repo_python("proto/unplugd", "")
    assert {"__init__.py", "pci.py", "framing.py", "splice.py", "v1/__init__.py"} <= shared
    assert agent == repo_python("agent", "agent/")
    assert host == repo_python("host", "host/")
    # no agent code on a host, no hypervisor code in a guest
    assert not any(f.startswith("host/") for f in agent) and not any(f.startswith("agent/") for f in host)
    assert "py.typed" in {n.removeprefix(SITE) for n in debs["python3-unplugd"].files()}


def test_guests_carry_no_host_code_and_hosts_no_agent(debs: dict[str, Deb]) -> None:
    """What `dpkg-deb -c` lists: a guest installs unplugd + python3-unplugd, a host unplugctl + python3-unplugd."""
    contract = set(debs["python3-unplugd"].files())
    guest = contract | set(debs["unplugd"].files())
    host = contract | set(debs["unplugctl"].files())
    assert [n for n in guest if n.startswith(DIST + AGENT)] and [n for n in host if n.startswith(DIST + HOST)]
    assert not [n for n in guest if n.startswith(DIST + HOST) or "unplugctl" in n]
    assert not [n for n in host if n.startswith(DIST + AGENT) or n.startswith(("etc/", "lib/"))]
    assert not [n for n in contract if n.startswith((DIST + AGENT, DIST + HOST, "usr/bin/"))]


def test_every_source_file_is_in_a_package(debs: dict[str, Deb]) -> None:
    """Whatever its kind: a module, subpackage or data file added to agent/, host/ or proto/unplugd."""
    installed = {n for deb in debs.values() for n in deb.files()}
    missing = sorted(rel for rel, target in shipped_sources().items() if DIST + target not in installed)
    assert not missing, f"no .deb installs {missing}: packaging/deb/build.sh (copy_py) leaves them out"


def test_no_file_is_in_two_packages(debs: dict[str, Deb]) -> None:
    # dpkg refuses to install a file another package owns
    seen: dict[str, str] = {}
    for pkg, deb in debs.items():
        for name in deb.files():
            assert name not in seen, f"{name} in {seen.get(name)} and {pkg}"
            seen[name] = pkg


def test_the_agent_package_ships_unit_rule_generator_and_config(debs: dict[str, Deb]) -> None:
    deb = debs["unplugd"]
    files = deb.files()
    shipped = {
        "lib/systemd/system/unplugd.service": REPO / "packaging/systemd/unplugd.service",
        "lib/udev/rules.d/60-unplugd.rules": REPO / "packaging/udev/60-unplugd.rules",
        "lib/systemd/system-generators/unplugd-generator": REPO / "packaging/systemd/unplugd_generator.py",
        "etc/unplugd/config.toml": REPO / "packaging/config.toml",
    }
    for name, src in shipped.items():
        assert deb.read(name) == src.read_bytes(), name
    assert files["lib/systemd/system-generators/unplugd-generator"].mode & 0o111  # systemd runs it
    assert files["usr/bin/unplugd"].mode & 0o111
    assert b"unplugd.agent.entry" in deb.read("usr/bin/unplugd")
    assert (deb.control("conffiles") or "").split() == ["/etc/unplugd/config.toml"]
    assert not [n for n in debs["unplugctl"].files() if n.startswith(("lib/", "etc/"))]
    assert b"unplugd.host.cli" in debs["unplugctl"].read("usr/bin/unplugctl")
    assert "pip install qemu.qmp" in debs["unplugctl"].read("usr/share/doc/unplugctl/README.Debian").decode()


def test_depends(debs: dict[str, Deb]) -> None:
    version = debs["unplugd"].field("Version")
    assert {d.field("Version") for d in debs.values()} == {version}

    def depends(pkg: str) -> set[str]:
        return {d.strip() for d in debs[pkg].field("Depends").split(",")}

    same = f"python3-unplugd (= {version})"
    assert {"python3-grpcio", "python3-protobuf"} <= depends("python3-unplugd")
    assert {same, "python3-psutil", "python3-pyudev", "python3-pyroute2"} <= depends("unplugd")
    assert {same, "python3-libvirt"} <= depends("unplugctl")
    assert not [d for d in depends("unplugctl") if "qemu" in d]  # qemu.qmp is not in Debian 12
    assert not [d for d in depends("unplugd") if "libvirt" in d]


def test_version_can_be_set_for_an_upgrade(tmp_path: Path) -> None:
    paths = build(tmp_path, "99.0.0+test1")
    assert sorted(p.name for p in paths) == sorted(f"{p}_99.0.0+test1_all.deb" for p in PACKAGES)
    assert Deb(paths[1]).field("Depends").count("python3-unplugd (= 99.0.0+test1)") == 1


# ------------------------------------------------------------------ maintainer scripts

STUB = """#!/bin/sh
echo "$(basename "$0") $*" >>"$CALLS"
# was-enabled: the state a previous install left ($ENABLED), as deb-systemd-helper keeps it
if [ "$1" = --quiet ] && [ "$2" = was-enabled ]; then [ "${ENABLED:-yes}" = yes ]; exit; fi
exit 0
"""


def run_script(deb: Deb, tmp_path: Path, script: str, *args: str, enabled: bool = True) -> list[str]:
    """Run a maintainer script with systemd's helpers recorded; return their calls, in order."""
    text = deb.control(script)
    assert text is not None, script
    running = tmp_path / "run-systemd-system"  # stands for /run/systemd/system: systemd is PID 1
    running.mkdir(exist_ok=True)
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for tool in ("deb-systemd-helper", "deb-systemd-invoke", "systemctl", "py3compile", "py3clean", "rmdir"):
        (bindir / tool).write_text(STUB)
        (bindir / tool).chmod(0o755)
    body = text.replace("/run/systemd/system", str(running))
    body = body.replace("/usr/bin/deb-systemd-helper", str(bindir / "deb-systemd-helper"))
    path = tmp_path / script
    path.write_text(body)
    calls = tmp_path / "calls"
    calls.write_text("")
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "CALLS": str(calls), "ENABLED": "yes" if enabled else "no"}
    proc = subprocess.run(["sh", "-e", str(path), *args], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    return calls.read_text().splitlines()


def test_install_enables_and_starts(debs: dict[str, Deb], tmp_path: Path) -> None:
    calls = run_script(debs["unplugd"], tmp_path, "postinst", "configure", "")
    assert "py3compile -p unplugd" in calls
    start = calls.index("deb-systemd-invoke start unplugd.service")
    assert calls.index("deb-systemd-helper enable unplugd.service") < start
    # the reload runs the generator before the start: a config enabling TCP gets its drop-in
    assert calls.index("systemctl --system daemon-reload") < start
    assert not [c for c in calls if "restart" in c or "stop" in c]


def test_upgrade_restarts_and_keeps_a_disabled_unit_disabled(debs: dict[str, Deb], tmp_path: Path) -> None:
    calls = run_script(debs["unplugd"], tmp_path, "postinst", "configure", "0.1.0", enabled=False)
    assert "deb-systemd-invoke restart unplugd.service" in calls
    assert "deb-systemd-helper enable unplugd.service" not in calls
    assert "deb-systemd-helper update-state unplugd.service" in calls
    # an upgrade does not stop the old agent first: prerm upgrade leaves it running until the restart
    assert not [c for c in run_script(debs["unplugd"], tmp_path, "prerm", "upgrade", "0.2.0") if "systemd" in c]


def test_remove_stops_and_purge_forgets(debs: dict[str, Deb], tmp_path: Path) -> None:
    assert "deb-systemd-invoke stop unplugd.service" in run_script(debs["unplugd"], tmp_path, "prerm", "remove")
    removed = run_script(debs["unplugd"], tmp_path, "postrm", "remove")
    assert "deb-systemd-helper mask unplugd.service" in removed
    assert not [c for c in removed if "purge" in c or "rmdir" in c]
    purged = run_script(debs["unplugd"], tmp_path, "postrm", "purge")
    assert "deb-systemd-helper purge unplugd.service" in purged
    assert "rmdir --ignore-fail-on-non-empty /etc/unplugd" in purged


def test_library_packages_only_compile_and_clean(debs: dict[str, Deb], tmp_path: Path) -> None:
    for pkg in ("python3-unplugd", "unplugctl"):
        assert run_script(debs[pkg], tmp_path, "postinst", "configure", "") == [f"py3compile -p {pkg}"]
        assert run_script(debs[pkg], tmp_path, "prerm", "remove") == [f"py3clean -p {pkg}"]
        assert debs[pkg].control("postrm") is None


# ------------------------------------------------------------------ lintian


def test_lintian_reports_no_errors(debs: dict[str, Deb]) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian not installed: packaging/dev/system-deps.sh (make dev) installs it")
    proc = subprocess.run(
        ["lintian", "--fail-on", "error", "--tag-display-limit", "0", *(str(d.path) for d in debs.values())],
        capture_output=True,
        text=True,
        check=False,
    )
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E:")]
    assert errors == [] and proc.returncode == 0, proc.stdout + proc.stderr
