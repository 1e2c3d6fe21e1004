"""Our packages on a stock guest, installed the way a user installs them.

The test image is stock Debian 12 plus the packages' dependencies (the guest has no network) and the
tools the tests drive (lvm2, mdadm, ...): nothing of ours, no module preloads, no unit drop-ins. To
test what users run, installed_root() boots that image once per run and config, copies the .debs
in, runs `dpkg -i`, writes the config an administrator would, and powers the guest off. Every VM
then boots an overlay of that disk: each test starts from the reboot that follows an install, which
is where a package's boot-time mistakes show (the agent starting before its virtio-serial port).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import shlex
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.vm.guest import GuestVM, VMError, progress, run_tool
from tests.vm.image import GuestImage
from tests.vm.qga import ExecResult
from tests.vm.shared import made_once, run_dir

__all__ = ["copy_into", "dpkg_install", "installed_root", "write_config"]

GUEST_DIR = "/var/tmp/unplugd-packages"
CONFIG = "/etc/unplugd/config.toml"
# dpkg under TCG: unpacking, byte-compiling and starting the service take tens of seconds.
DPKG_TIMEOUT = 300.0


def copy_into(vm: GuestVM, source: Path, dest: str) -> None:
    """Copy a host file into the guest (through qemu-ga's stdin of `cat`)."""
    vm.exec(
        ["sh", "-c", f"mkdir -p {shlex.quote(str(Path(dest).parent))} && cat >{shlex.quote(dest)}"],
        input=source.read_bytes(),
        check=True,
    )


def dpkg_install(vm: GuestVM, debs: Sequence[Path]) -> ExecResult:
    """`dpkg -i` the packages in one transaction, as a user does; raises VMError if dpkg fails."""
    paths = []
    for deb in debs:
        dest = f"{GUEST_DIR}/{deb.name}"
        copy_into(vm, deb, dest)
        paths.append(dest)
    result = vm.exec(["dpkg", "-i", *paths], timeout=DPKG_TIMEOUT)
    if result.rc != 0:
        raise VMError(f"dpkg -i {' '.join(d.name for d in debs)} failed ({result.rc}):\n{result.stdout}{result.stderr}")
    vm.exec(["rm", "-rf", GUEST_DIR])
    return result


def write_config(vm: GuestVM, text: str) -> None:
    """What an administrator does after installing: edit /etc/unplugd/config.toml."""
    vm.exec(["sh", "-c", f"cat >{CONFIG}"], input=text, check=True)


@functools.cache
def installed_root(debs: tuple[Path, ...], config: str | None, image: GuestImage) -> Path:
    """A qcow2 disk (over the stock image) of a guest that installed debs, wrote config and powered off.

    Once per run (every xdist worker shares it, tests/vm/shared.py) or, outside xdist, once per
    process, debs and config: later VMs boot overlays of it. Removed when the run or process ends.
    """
    if run_dir() is None:
        workdir = Path(tempfile.mkdtemp(prefix="unplugd-installed-"))
        atexit.register(shutil.rmtree, workdir, True)
        _install(workdir, debs, config, image)
    else:
        key = hashlib.sha256(repr((tuple(map(str, debs)), config, str(image.dir))).encode()).hexdigest()[:16]
        workdir = made_once(f"installed-{key}", lambda d: _install(d, debs, config, image))
    return workdir / "root.qcow2"


def _install(workdir: Path, debs: tuple[Path, ...], config: str | None, image: GuestImage) -> None:
    disk = workdir / "root.qcow2"
    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.disk), "-F", "raw", str(disk)])
    names = ", ".join(d.name.split("_", 1)[0] for d in debs)
    progress(f"installing {names} into a stock guest with dpkg -i (once per run), then powering it off")
    with GuestVM("q35", image=image, packages=None, name="unplugd-install", root_disk=disk) as vm:
        vm.wait_booted(timeout=600)
        dpkg_install(vm, debs)
        if config is not None:
            write_config(vm, config)
        # The power button (ACPI), as a clean shutdown from inside: a qemu-ga exec of poweroff may
        # lose its answer when the guest goes down first.
        if not vm.shutdown(timeout=180):
            raise VMError("the guest did not power off after the install; its disk may be incomplete")
