"""Kernel event sources the watcher sleeps on: nothing here polls on a timer.

- udev/uevents (pyudev Monitor: block, net, pci add/remove/change); the
  kernel source when no udev daemon runs.
- rtnetlink groups for links, IPv4/IPv6 addresses and routes. The content
  is not parsed: any message means "look again".
- mount tables: /proc/PID/mountinfo of one process per mount namespace; the
  kernel flags POLLPRI|POLLERR on it when that namespace's mounts change.
  At most `max_files` are held ([watch] max_namespace_fds): any user can
  create mount namespaces by the thousand (`unshare -Urm`), and each held
  file costs an fd and pins its namespace. The first ones found, in pid
  order (the system's own, started at boot), keep theirs while they live;
  the rest have no event and are read by every full scan, which the watcher
  takes at least every [watch] fd_rescan_seconds: a mount there shows within
  that time plus one scan.
- the proc connector (exec/exit events), when permitted, to notice mount
  namespaces that appear or die between rescans. A new namespace is almost
  always followed by an exec (unshare(1), container runtimes, systemd
  services), so each exec costs one readlink of that pid's ns/mnt, and a
  namespace not seen before is opened and wakes the watcher. Open mountinfo
  files pin their namespace (and its mounts!), so after exits the whole set
  is looked at again, at most every `ns_refresh_min` seconds, and namespaces
  without processes are let go.
- a wake pipe for poke() and stop().

EventSources.wait(timeout) returns True when something happened that needs
a new snapshot.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unplugd.agent.config import WatchConfig
from unplugd.agent.roots import Roots

__all__ = ["EventSources", "MountNamespaces", "parse_ns_inode", "parse_proc_events"]

log = logging.getLogger(__name__)

# rtnetlink multicast groups (linux/rtnetlink.h, the legacy RTMGRP_* bits)
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
RT_GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE

# proc connector (linux/connector.h, linux/cn_proc.h)
NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000
_NLMSG = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_PROC_EVENT = struct.Struct("=IIQII")  # what, cpu, timestamp_ns, then pid, tgid of exec/exit

_MOUNT_EVENTS = select.POLLPRI | select.POLLERR
# Stands for lost events: treated like an exit, so the namespace set is refreshed.
_FAKE_EXIT = (
    _NLMSG.pack(_NLMSG.size + _CN_MSG.size + _PROC_EVENT.size, NLMSG_DONE, 0, 0, 0)
    + _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, _PROC_EVENT.size, 0)
    + _PROC_EVENT.pack(PROC_EVENT_EXIT, 0, 0, 1, 1)
)
_IN = select.POLLIN
DEFAULT_MAX_FILES = WatchConfig.max_namespace_fds  # the reason is there


def parse_ns_inode(link: str) -> int | None:
    """'mnt:[4026531841]' -> 4026531841; None for anything else."""
    _kind, sep, rest = link.partition(":[")
    if not sep or not rest.endswith("]") or not rest[:-1].isdigit():
        return None
    return int(rest[:-1])


class MountNamespaces:
    """One open mountinfo per mount namespace, found through /proc/PID/ns/mnt, at most max_files.

    unwatched: namespaces seen by the last refresh that hold no file (over
    the cap, or their mountinfo could not be opened); they are left to the
    periodic full scans.
    """

    def __init__(self, proc: Path, max_files: int = DEFAULT_MAX_FILES) -> None:
        self._proc = proc
        self._max = max(max_files, 1)
        self.files: dict[int, int] = {}  # namespace inode -> fd of /proc/PID/mountinfo
        self.unwatched = 0
        self._warned = False

    @property
    def full(self) -> bool:
        return len(self.files) >= self._max

    def refresh(self) -> tuple[list[int], list[int]]:
        """Open newly seen namespaces, close gone ones; returns (opened fds, closed fds)."""
        seen: dict[int, str] = {}
        try:
            # Pid order: the oldest namespaces (the system's own) get the files first.
            pids = sorted((p for p in os.listdir(self._proc) if p.isdigit()), key=int)
        except OSError as exc:
            log.warning("cannot list processes", extra={"error": str(exc)})
            return [], []
        for pid in pids:
            try:
                ino = parse_ns_inode(os.readlink(self._proc / pid / "ns" / "mnt"))
            except OSError:
                continue  # exited, or a kernel thread without one
            if ino is not None and ino not in seen:
                seen[ino] = pid
        opened, closed = [], []
        for ino in set(self.files) - set(seen):
            fd = self.files.pop(ino)
            os.close(fd)
            closed.append(fd)
        for ino, pid in seen.items():
            if ino in self.files or self.full:
                continue
            new = self._open(pid, ino)
            if new is not None:
                self.files[ino] = new
                opened.append(new)
        self.unwatched = len(seen) - sum(1 for ino in seen if ino in self.files)
        self._say_cap()
        return opened, closed

    def _say_cap(self) -> None:
        """Warn once when namespaces go without a file, and once when all have one again."""
        over = self.unwatched > 0 and self.full
        if over and not self._warned:
            log.warning(
                "more mount namespaces than [watch] max_namespace_fds: the rest are read by the periodic rescan only",
                extra={"watched": len(self.files), "unwatched": self.unwatched},
            )
        elif not over and self._warned:
            log.info("every mount namespace watched again", extra={"watched": len(self.files)})
        self._warned = over

    def add_pid(self, pid: int) -> int | None:
        """The fd opened if `pid` lives in a namespace not seen before, else None."""
        try:
            ino = parse_ns_inode(os.readlink(self._proc / str(pid) / "ns" / "mnt"))
        except OSError:
            return None
        if ino is None or ino in self.files:
            return None
        if self.full:
            self.unwatched += 1  # an upper bound until the next refresh counts again
            return None
        fd = self._open(str(pid), ino)
        if fd is not None:
            self.files[ino] = fd
        return fd

    def _open(self, pid: str, ino: int) -> int | None:
        try:
            fd = os.open(self._proc / pid / "mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # the process went away meanwhile; its namespace may too
        # The pid may have exited and been reused between readlink and open.
        try:
            again = parse_ns_inode(os.readlink(self._proc / pid / "ns" / "mnt"))
        except OSError:
            again = None
        if again != ino:
            os.close(fd)
            return None
        return fd

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


class EventSources:
    def __init__(
        self,
        roots: Roots,
        *,
        udev: bool = True,
        netlink: bool = True,
        mounts: bool = True,
        proc_connector: bool = True,
        ns_refresh_min: float = 0.5,
        max_namespace_fds: int = DEFAULT_MAX_FILES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._poll = select.poll()
        self._handlers: dict[int, Callable[[int], bool]] = {}
        self._owned: list[Any] = []
        self._clock = clock
        self._ns_refresh_min = ns_refresh_min
        self._ns_due: float | None = None
        self._last_ns_refresh = 0.0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._register(self._wake_r, _IN, self._drain_pipe)
        self.kinds: list[str] = ["wake"]
        self._mounts: MountNamespaces | None = None
        if udev:
            self._try("udev", self._open_udev)
        if netlink:
            self._try("netlink", self._open_netlink)
        if mounts:
            self._mounts = MountNamespaces(roots.proc, max_namespace_fds)
            self._refresh_namespaces()
            self.kinds.append("mountinfo")
            if proc_connector:
                self._try("proc-connector", self._open_proc_connector)

    @classmethod
    def live(cls) -> EventSources:
        return cls(Roots.live_system())

    @classmethod
    def none(cls) -> EventSources:
        """Only the wake pipe (captured trees, tests)."""
        return cls(Roots.live_system(), udev=False, netlink=False, mounts=False)

    # -- the loop's side ------------------------------------------------------------

    def wait(self, timeout: float) -> bool:
        """Sleep until an event that calls for a new snapshot, or timeout; True if one came.

        A namespace refresh that falls due meanwhile is done on the way; one due
        later stays pending for the next call (never stretching this one).
        """
        end = self._clock() + timeout
        while True:
            now = self._clock()
            left = end - now
            if self._ns_due is not None:
                left = min(left, self._ns_due - now)
            try:
                ready = self._poll.poll(max(left, 0) * 1000)
            except InterruptedError:
                continue
            hit = False
            for fd, mask in ready:
                handler = self._handlers.get(fd)
                if handler is not None and handler(mask):
                    hit = True
            if self._ns_due is not None and self._clock() >= self._ns_due:
                self._ns_due = None
                hit = self._refresh_namespaces() or hit
            if hit:
                return True
            if self._clock() >= end:
                return False

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already pending
        except OSError as exc:
            if exc.errno != errno.EBADF:  # closed: nobody listens any more
                raise

    def close(self) -> None:
        for obj in self._owned:
            try:
                obj.close()
            except Exception as exc:  # closing is best effort
                log.debug("closing event source failed", extra={"error": str(exc)})
        self._owned.clear()
        if self._mounts is not None:
            self._mounts.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._handlers.clear()

    # -- sources --------------------------------------------------------------------

    def _register(self, fd: int, mask: int, handler: Callable[[int], bool]) -> None:
        self._poll.register(fd, mask)
        self._handlers[fd] = handler

    def _try(self, kind: str, opener: Callable[[], None]) -> None:
        try:
            opener()
            self.kinds.append(kind)
        except Exception as exc:
            log.warning(
                "event source unavailable; changes it would signal show at the next rescan",
                extra={"source": kind, "error": str(exc)},
            )

    def _drain_pipe(self, mask: int) -> bool:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        return True

    def _open_udev(self) -> None:
        import pyudev

        context = pyudev.Context()
        # Without a udev daemon, listen to the kernel's uevents directly.
        source = "udev" if os.path.exists("/run/udev/control") else "kernel"
        monitor = pyudev.Monitor.from_netlink(context, source=source)
        for subsystem in ("block", "net", "pci"):
            monitor.filter_by(subsystem)
        monitor.start()
        self._owned.append(_Closer(monitor))

        def drain(mask: int) -> bool:
            got = False
            while monitor.poll(timeout=0) is not None:
                got = True
            return got

        self._register(monitor.fileno(), _IN, drain)

    def _open_netlink(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        sock.bind((0, RT_GROUPS))
        sock.setblocking(False)
        self._owned.append(sock)
        self._register(sock.fileno(), _IN, lambda mask: _drain_socket(sock))

    def _open_proc_connector(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR)
        try:
            sock.bind((0, CN_IDX_PROC))
            # nlmsghdr + cn_msg + op: subscribe to process events
            sock.send(_proc_cn_op(PROC_CN_MCAST_LISTEN))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._owned.append(_ProcConnector(sock))

        def on_events(mask: int) -> bool:
            woke = False
            for what, pid in parse_proc_events(_receive_all(sock)):
                if what == PROC_EVENT_EXEC and self._mounts is not None:
                    fd = self._mounts.add_pid(pid)
                    if fd is not None:
                        self._watch_mountinfo(fd)
                        woke = True  # it may hold mounts made before we looked
                elif what == PROC_EVENT_EXIT and self._ns_due is None:
                    self._ns_due = max(self._clock(), self._last_ns_refresh + self._ns_refresh_min)
            return woke

        self._register(sock.fileno(), _IN, on_events)

    def _refresh_namespaces(self) -> bool:
        assert self._mounts is not None
        self._last_ns_refresh = self._clock()
        opened, closed = self._mounts.refresh()
        for fd in closed:
            self._handlers.pop(fd, None)
            with contextlib.suppress(KeyError):
                self._poll.unregister(fd)
        for fd in opened:
            self._watch_mountinfo(fd)
        # A new namespace may already hold mounts made before we looked.
        return bool(opened or closed)

    def _watch_mountinfo(self, fd: int) -> None:
        # The first poll reports the table's current generation: swallow it.
        _poll_once(fd)
        self._register(fd, _MOUNT_EVENTS, lambda mask: bool(mask & _MOUNT_EVENTS))

    def refresh_namespaces(self) -> bool:
        """Look at the set of mount namespaces now (the rescan tick calls it)."""
        return self._mounts is not None and self._refresh_namespaces()

    @property
    def namespaces(self) -> int:
        """Mount namespaces watched through an open mountinfo."""
        return len(self._mounts.files) if self._mounts is not None else 0

    @property
    def unwatched_namespaces(self) -> int:
        """Mount namespaces left to the periodic rescan (over the cap)."""
        return self._mounts.unwatched if self._mounts is not None else 0


def _poll_once(fd: int) -> None:
    p = select.poll()
    p.register(fd, _MOUNT_EVENTS)
    p.poll(0)


def parse_proc_events(datagrams: list[bytes]) -> list[tuple[int, int]]:
    """(what, pid) of the process events of exec and of whole processes exiting.

    Each datagram holds netlink messages carrying a cn_msg with a proc_event;
    anything short or foreign is skipped.
    """
    out = []
    for data in datagrams:
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length = _NLMSG.unpack_from(data, offset)[0]
            if length < _NLMSG.size or offset + length > len(data):
                break
            body = offset + _NLMSG.size
            if length >= _NLMSG.size + _CN_MSG.size + _PROC_EVENT.size:
                idx, val = _CN_MSG.unpack_from(data, body)[:2]
                if (idx, val) == (CN_IDX_PROC, CN_VAL_PROC):
                    what, _, _, pid, tgid = _PROC_EVENT.unpack_from(data, body + _CN_MSG.size)
                    if what == PROC_EVENT_EXEC or (what == PROC_EVENT_EXIT and pid == tgid):
                        out.append((what, tgid))
            offset += (length + 3) & ~3
    return out


def _receive_all(sock: socket.socket) -> list[bytes]:
    got: list[bytes] = []
    while True:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return got
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # fell behind: look at every namespace again
                got.append(_FAKE_EXIT)
                continue
            log.warning("proc connector receive failed", extra={"error": str(exc)})
            return got
        if not data:
            return got
        got.append(data)


def _drain_socket(sock: socket.socket) -> bool:
    got = False
    while True:
        try:
            if not sock.recv(65536):
                return got
            got = True
        except (BlockingIOError, InterruptedError):
            return got
        except OSError as exc:
            # ENOBUFS: we fell behind and the kernel dropped messages; a scan covers it.
            if exc.errno == errno.ENOBUFS:
                got = True
                continue
            log.warning("netlink receive failed", extra={"error": str(exc)})
            return got


def _proc_cn_op(op: int) -> bytes:
    """nlmsghdr + cn_msg + the op: (un)subscribe to process events."""
    body = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, 4, 0) + struct.pack("=I", op)
    return _NLMSG.pack(_NLMSG.size + len(body), NLMSG_DONE, 0, 0, 0) + body


class _ProcConnector:
    """Says goodbye before closing: the kernel counts listeners to decide whether to send events."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.send(_proc_cn_op(PROC_CN_MCAST_IGNORE))
        self._sock.close()


class _Closer:
    """pyudev's Monitor has no close(); dropping its socket is enough."""

    def __init__(self, monitor: Any) -> None:
        self._monitor = monitor

    def close(self) -> None:
        stop = getattr(self._monitor, "stop", None)
        if stop is not None:
            stop()
