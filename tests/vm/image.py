"""Build (or reuse) the guest image and the agent's .deb, through the scripts in packaging/."""

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

__all__ = ["GuestImage", "build_deb", "build_image", "cache_dir"]

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


@functools.cache
def build_deb(outdir: Path | None = None) -> Path:
    """Build the agent's .deb from the current work tree (once per process and outdir); return its path."""
    if outdir is None:
        outdir = Path(tempfile.mkdtemp(prefix="unplugd-deb-"))
        atexit.register(shutil.rmtree, outdir, True)
    out = outdir
    proc = subprocess.run(["sh", str(DEB_BUILDER), str(out)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"deb build failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return Path(proc.stdout.strip().splitlines()[-1])
