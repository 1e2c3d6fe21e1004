"""Build (or reuse) the guest image and the project's .debs, through the scripts in packaging/."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.vm.shared import made_once, run_dir

__all__ = ["GUEST_PACKAGES", "GuestImage", "build_debs", "build_image", "cache_dir", "guest_debs"]

REPO = Path(__file__).resolve().parents[2]
IMAGE_BUILDER = REPO / "packaging" / "guest-image" / "build.py"
DEB_BUILDER = REPO / "packaging" / "deb" / "build.sh"


def cache_dir() -> Path:
    return Path(os.environ.get("UNPLUGD_CACHE") or Path.home() / ".cache" / "unplugd")


@dataclass(frozen=True)
class GuestImage:
    """A built image directory (see packaging/guest-image/build.py for its layout)."""

    dir: Path

    @property
    def disk(self) -> Path:
        return self.dir / "disk.raw"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def cmdline(self) -> str:
        return (self.dir / "cmdline").read_text().strip()


def build_image(force: bool = False) -> GuestImage:
    """Return the cached image for the current recipe, building it first if needed (progress on stderr).

    A cold build takes a few minutes and needs root and the Debian mirror; a cached one returns at once.
    """
    cmd = [sys.executable, str(IMAGE_BUILDER), "--cache", str(cache_dir())]
    if force:
        cmd.append("--force")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"guest image build failed (exit {proc.returncode}); see the messages above")
    return GuestImage(Path(proc.stdout.strip().splitlines()[-1]))


# The packages a guest gets: the shared root package and the agent (never the host tool).
GUEST_PACKAGES = ("python3-unplugd", "unplugd")


@functools.cache
def build_debs(outdir: Path | None = None, version: str | None = None) -> tuple[Path, ...]:
    """Build every .deb from the current work tree (once per run under xdist, else once per process).

    version overrides the package version (UNPLUGD_DEB_VERSION), e.g. a higher one to test an upgrade.
    """
    if outdir is not None:
        return _build_debs_into(outdir, version)
    if run_dir() is not None:

        def build(into: Path) -> None:
            _build_debs_into(into, version)

        return tuple(sorted(made_once(f"debs-{version or 'tree'}", build).glob("*.deb")))
    outdir = Path(tempfile.mkdtemp(prefix="unplugd-deb-"))
    atexit.register(shutil.rmtree, outdir, True)
    return _build_debs_into(outdir, version)


def _build_debs_into(outdir: Path, version: str | None) -> tuple[Path, ...]:
    env = dict(os.environ)
    if version is not None:
        env["UNPLUGD_DEB_VERSION"] = version
    proc = subprocess.run(["sh", str(DEB_BUILDER), str(outdir)], capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"deb build failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return tuple(Path(line) for line in proc.stdout.split() if line.endswith(".deb"))


def guest_debs(version: str | None = None) -> tuple[Path, ...]:
    """The packages a guest installs (GUEST_PACKAGES), in dependency order."""
    by_name = {path.name.split("_", 1)[0]: path for path in build_debs(version=version)}
    missing = [name for name in GUEST_PACKAGES if name not in by_name]
    if missing:
        raise RuntimeError(f"packaging/deb/build.sh built no {', '.join(missing)} (got {sorted(by_name)})")
    return tuple(by_name[name] for name in GUEST_PACKAGES)
