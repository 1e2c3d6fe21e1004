"""A libvirtd of the test's own, which the test may kill and restart.

The shared libvirtd (tests/integration/libvirtd.py) is not ours to restart.
This one runs in its own mount namespace: /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt, /var/log/libvirt and /etc/libvirt are bind mounts of
directories under a temporary root, so it shares no state, socket or pid
file with the system's; its sockets are in ROOT/sock, outside the namespace,
so the test reaches it through `qemu+unix:///system?socket=...`. A restart
starts it again on the same directories: it finds its running QEMU
processes there, as a restarted libvirtd does. Everything it started is
destroyed on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.integration.libvirtd import LAYOUTS, ensure_libvirtd

__all__ = ["PrivateLibvirtd", "private_libvirtd"]

_BINDS = {
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
    "etc": "/etc/libvirt",
}
START_TIMEOUT_S = 30.0  # libvirtd probes QEMU's capabilities on a first start: a few seconds under TCG


class PrivateLibvirtd:
    def __init__(self, root: Path, *, tcp_port: int | None = None) -> None:
        self.root = root
        self.uri = f"qemu+unix:///system?socket={root}/sock/libvirt-sock"
        # A remote transport to the same daemon: libvirt's TCP listener on loopback, no auth
        # (tests only; nothing but this machine can reach 127.0.0.1).
        self.tcp_port = tcp_port
        self.tcp_uri = f"qemu+tcp://127.0.0.1:{tcp_port}/system" if tcp_port else None
        self.proc: subprocess.Popen[bytes] | None = None

    def _prepare(self) -> None:
        for d in (*_BINDS, "sock"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc"
        shutil.copytree("/etc/libvirt", etc, dirs_exist_ok=True)
        # No autostarted networks (they would want dnsmasq and the firewall); QEMU's output to
        # files, since no virtlogd listens in this namespace.
        shutil.rmtree(etc / "qemu" / "networks" / "autostart", ignore_errors=True)
        with open(etc / "qemu.conf", "a") as f:
            f.write('\nstdio_handler = "file"\n')
        conf = f'unix_sock_dir = "{self.root}/sock"\nunix_sock_rw_perms = "0700"\nunix_sock_ro_perms = "0700"\n'
        if self.tcp_port:
            conf += (
                f'listen_tcp = 1\nlisten_tls = 0\nauth_tcp = "none"\ntcp_port = "{self.tcp_port}"\n'
                'listen_addr = "127.0.0.1"\n'
            )
        (etc / "libvirtd.conf").write_text(conf)
        listen = " --listen" if self.tcp_port else ""
        binds = "\n".join(f"mount --bind {self.root / src} {dst}" for src, dst in _BINDS.items())
        script = self.root / "start.sh"
        script.write_text(
            f"#!/bin/sh\nset -e\nmount --make-rprivate /\n{binds}\n"
            "mkdir -p /var/lib/libvirt/qemu /var/cache/libvirt/qemu /var/log/libvirt/qemu\n"
            f"exec libvirtd{listen} --config /etc/libvirt/libvirtd.conf "
            f"--pid-file {self.root}/libvirtd.pid\n"
        )
        script.chmod(0o755)

    def start(self) -> None:
        import libvirt

        # libvirt prints every failed connect of the wait below to stderr unless a handler takes it.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        log = open(self.root / "libvirtd.log", "ab")  # noqa: SIM115 (the daemon keeps it)
        self.proc = subprocess.Popen(
            ["unshare", "-m", str(self.root / "start.sh")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                libvirt.open(self.uri).close()
                return
            except libvirt.libvirtError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log_text = (self.root / "libvirtd.log").read_text()
                    raise RuntimeError(f"private libvirtd did not start: {log_text}") from exc
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM to the daemon (its QEMU processes live on, as with a real restart)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextlib.contextmanager
    def domain(self, layout: str) -> Iterator[str]:
        """A transient domain of LAYOUTS[layout] in this daemon; destroyed on exit."""
        import libvirt

        name = f"unplugd-restart-{layout}-{uuid.uuid4().hex[:8]}"
        workdir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        conn = libvirt.open(self.uri)
        try:
            conn.createXML(LAYOUTS[layout](name, workdir), 0)
        finally:
            conn.close()
        try:
            yield name
        finally:
            if self.proc is None:
                self.start()
            conn = libvirt.open(self.uri)
            try:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.lookupByName(name).destroy()
            finally:
                conn.close()
            shutil.rmtree(workdir, ignore_errors=True)


def _free_port() -> int:
    """A loopback TCP port nobody listens on now (the kernel's choice; libvirtd binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_libvirtd(*, tcp: bool = False) -> Iterator[PrivateLibvirtd]:
    """`tcp`: also listen on a free loopback port (`daemon.tcp_uri`, qemu+tcp://127.0.0.1:PORT/system)."""
    ensure_libvirtd()  # root, libvirtd and QEMU installed, qemu.conf set up for this machine
    if shutil.which("unshare") is None:
        import pytest

        pytest.skip("needs unshare (util-linux)")
    root = Path(tempfile.mkdtemp(prefix="unplugd-libvirtd-"))
    daemon = PrivateLibvirtd(root, tcp_port=_free_port() if tcp else None)
    daemon._prepare()
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        if os.path.isdir(root):
            shutil.rmtree(root, ignore_errors=True)
