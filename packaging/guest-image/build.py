#!/usr/bin/env python3
"""Build (or reuse) the Debian guest image that the VM tests and the demo boot.

    packaging/guest-image/build.py [--cache DIR] [--mirror URL] [--force]

Prints the image directory on stdout; progress goes to stderr. The image is keyed by a hash of its
inputs (every file of this recipe, the package list, the Debian suite), so a second run with the same
inputs returns the cached image at once. Layout of the image directory:

    disk.raw     ext4 root filesystem (label unplugd-root), used read-only as a backing file
    vmlinuz      kernel for QEMU's direct boot (-kernel)
    initrd.img   its initramfs (-initrd)
    cmdline      the kernel command line that goes with them
    manifest.json  inputs hash, suite, installed package versions, build time

The build runs in a temporary directory next to the cache entry and is renamed into place only when
complete, under a lock, so an interrupted or concurrent build never leaves a half-made image. Needs
root (debootstrap, chroot). Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

RECIPE = Path(__file__).resolve().parent
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DISK_SIZE = "3G"
ROOT_LABEL = "unplugd-root"
CMDLINE = f"root=LABEL={ROOT_LABEL} rw console=ttyS0,115200 panic=-1 mitigations=off"
HASH_LEN = 16
# Bump when a change to this script changes what ends up in the image; other edits to it
# (logging, locking) leave cached images valid, so the script itself is not hashed.
BUILD_LOGIC_VERSION = 1


def log(msg: str) -> None:
    print(f"[guest-image] {msg}", file=sys.stderr, flush=True)


def cache_root(explicit: str | None = None) -> Path:
    base = explicit or os.environ.get("UNPLUGD_CACHE") or str(Path.home() / ".cache" / "unplugd")
    return Path(base) / "images"


def parse_packages(text: str) -> list[str]:
    """Package names from packages.txt: one per line, '#' starts a comment."""
    names = []
    for line in text.splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name)
    return names


def recipe_files(recipe: Path = RECIPE) -> list[Path]:
    """The files whose content goes into the image: packages.txt, customize.sh, files/**."""
    found = [recipe / "packages.txt", recipe / "customize.sh"]
    found += (p for p in (recipe / "files").rglob("*") if p.is_file() or p.is_symlink())
    return sorted(found)


def inputs_hash(recipe: Path = RECIPE, suite: str = SUITE) -> str:
    """Hash of everything that decides the image's content: recipe files (names, modes, bytes), the suite,
    and the build parameters of this script."""
    h = hashlib.sha256()
    params = (suite, DISK_SIZE, ROOT_LABEL, CMDLINE, BUILD_LOGIC_VERSION)
    h.update(("\0".join(map(str, params)) + "\n").encode())
    for path in recipe_files(recipe):
        rel = path.relative_to(recipe).as_posix()
        if path.is_symlink():
            h.update(f"{rel}\0link\0{os.readlink(path)}\n".encode())
            continue
        mode = path.stat().st_mode & 0o777
        h.update(f"{rel}\0{mode:o}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:HASH_LEN]


IMAGE_FILES = ("disk.raw", "vmlinuz", "initrd.img", "cmdline", "manifest.json")


def is_complete(image_dir: Path) -> bool:
    return all((image_dir / name).is_file() for name in IMAGE_FILES)


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another build of this image is running; waiting for {lock_path}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below path (deepest first), from /proc/self/mountinfo."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Remove a (possibly interrupted) build directory, detaching anything still mounted in its chroot."""
    if not path.exists():
        return
    for point in mounts_below(path):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(path, ignore_errors=True)


def run_logged(cmd: list[str], logfile: Path, what: str) -> None:
    """Run cmd with its output in logfile, telling stderr every 20 s how far it got."""
    log(f"{what} (log: {logfile})")
    start = time.monotonic()
    with open(logfile, "ab") as out:
        # its own process group, so that an interrupted build stops debootstrap's children too
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(20):
                log(f"  ... {what}: {time.monotonic() - start:.0f}s, {last_line(logfile)}")

        threading.Thread(target=heartbeat, daemon=True).start()
        try:
            rc = proc.wait()
        finally:
            done.set()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"{what} failed with exit code {rc}:\n" + "\n".join(tail))
    log(f"  {what}: done in {time.monotonic() - start:.0f}s")


def last_line(path: Path) -> str:
    try:
        lines = path.read_bytes()[-400:].decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:100] if lines else ""


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    points = [
        (root / "proc", ["-t", "proc", "proc"]),
        (root / "sys", ["-t", "sysfs", "sysfs"]),
        (root / "dev", ["--bind", "/dev"]),
    ]
    mounted: list[Path] = []
    try:
        for point, how in points:
            subprocess.run(["mount", *how, str(point)], check=True)
            mounted.append(point)
        yield
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], check=False)


def installed_versions(root: Path) -> dict[str, str]:
    out = subprocess.run(
        ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package}\t${Version}\n"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def build_into(work: Path, mirror: str, digest: str) -> None:
    """Make a complete image in work/ (an empty directory)."""
    root = work / "rootfs"
    logfile = work / "build.log"
    packages = parse_packages((RECIPE / "packages.txt").read_text())
    run_logged(
        ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(root), mirror],
        logfile,
        f"debootstrap {SUITE} with {len(packages)} packages",
    )
    shutil.copytree(RECIPE / "files", root, symlinks=True, dirs_exist_ok=True)
    shutil.copy2(RECIPE / "customize.sh", root / "tmp" / "customize.sh")
    with chroot_mounts(root):
        run_logged(["chroot", str(root), "/bin/sh", "/tmp/customize.sh"], logfile, "customize")
    (root / "tmp" / "customize.sh").unlink()
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise RuntimeError("no kernel in the image's /boot")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    shutil.copy2(kernels[-1], work / "vmlinuz")
    shutil.copy2(root / "boot" / f"initrd.img-{version}", work / "initrd.img")
    versions = installed_versions(root)
    disk = work / "disk.raw"
    with open(disk, "wb") as fh:
        fh.truncate(_size_bytes(DISK_SIZE))
    run_logged(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", str(root), str(disk)], logfile, "mkfs.ext4 -d")
    remove_tree(root)
    (work / "cmdline").write_text(CMDLINE + "\n")
    manifest = {
        "hash": digest,
        "suite": SUITE,
        "kernel": version,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "packages": packages,
        "versions": versions,
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _size_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def build(cache: str | None = None, mirror: str = DEFAULT_MIRROR, force: bool = False) -> Path:
    """Return the directory of a complete image for the current recipe, building it if needed."""
    images = cache_root(cache)
    digest = inputs_hash()
    final = images / digest
    if is_complete(final) and not force:
        log(f"cached image {final}")
        return final
    if os.geteuid() != 0:
        raise RuntimeError("building the guest image needs root (debootstrap, chroot)")
    for tool in ("debootstrap", "mkfs.ext4", "chroot", "dpkg-query"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: run packaging/dev/system-deps.sh")
    with locked(images / f".{digest}.lock"):
        if is_complete(final) and not force:
            log(f"cached image {final} (built meanwhile)")
            return final
        for stale in images.glob(f".tmp-{digest}-*"):
            log(f"removing interrupted build {stale}")
            remove_tree(stale)
        work = images / f".tmp-{digest}-{os.getpid()}"
        work.mkdir(parents=True)
        start = time.monotonic()
        try:
            build_into(work, mirror, digest)
            if final.exists():
                remove_tree(final)
            os.rename(work, final)
        finally:
            remove_tree(work)
        log(f"built {final} in {time.monotonic() - start:.0f}s")
    return final


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cache", help="cache directory (default $UNPLUGD_CACHE or ~/.cache/unplugd)")
    parser.add_argument("--mirror", default=os.environ.get("UNPLUGD_DEBIAN_MIRROR", DEFAULT_MIRROR))
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached image exists")
    parser.add_argument("--print-hash", action="store_true", help="print the inputs hash and exit")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop debootstrap and remove the half-made build.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if args.print_hash:
        print(inputs_hash())
        return 0
    try:
        print(build(args.cache, args.mirror, args.force))
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
