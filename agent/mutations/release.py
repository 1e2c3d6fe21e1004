"""Release hooks: what RequestRelease does, the query-remove Linux guests never had.

The guest's administrator puts executables in [release] directory
(/etc/unplugd/release.d). For each function asked for that is not READY, every
hook runs once, in lexical order (like run-parts), with what the function holds
in its environment and as JSON on stdin (`hook_environment`, `hook_input`).
Then the caller waits, on the watch's report stream, until every function is
READY or the deadline passes (`wait_ready`). Per function: RELEASED (READY at
the end), STILL_BUSY (the reasons left and the hooks' output), NO_HOOK (not
READY and nothing to run).

Security. A hook runs as root, so it must be as trustworthy as root's own
files: the directory and each hook are owned by root and writable by nobody
else (`unsafe`), and a hook must be a regular file, not a symbolic link.
Each is checked immediately before it runs, on the very inode that runs: the
directory is opened with O_NOFOLLOW, the hook with openat(O_NOFOLLOW) beneath
that descriptor and fstat()ed, and that descriptor is what is executed
(/proc/self/fd/N, the way fexecve(3) does it; a script's interpreter reopens
the same descriptor). Nobody but root can rename, replace or write what was
checked in between, since nobody else may write the directory or the file.

Output is bounded (max_output_bytes of stdout and of stderr kept, the rest
read and dropped, so a chatty hook never blocks on a full pipe) and carried
as guest text (`wire_text`). A hook runs in a process group of its own, killed
whole when its timeout (or the call's deadline) passes, or when the hook has
exited and something it left behind still holds its output open then.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import selectors
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from unplugd.agent.config import ReleaseConfig
from unplugd.agent.daemon.scans import EngineApi
from unplugd.agent.errors import InvalidArgument, ReleaseInProgress
from unplugd.agent.graph import DeviceGraph
from unplugd.agent.model import Inventory, PciFunction
from unplugd.agent.mutations.leases import LeaseManager
from unplugd.agent.readiness.policy import evaluate
from unplugd.agent.readiness.reasons import FunctionVerdict, State
from unplugd.agent.roots import Roots
from unplugd.text import wire_text

__all__ = [
    "FunctionHolding",
    "HookRun",
    "HookStatus",
    "Outcome",
    "Releaser",
    "holding",
    "hook_environment",
    "hook_input",
    "hook_names",
    "outcome",
    "run_hooks",
    "unsafe",
]

log = logging.getLogger(__name__)

# What a hook finds in PATH: the system's tools, nothing from the agent's environment.
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Names a hook may have (run-parts --lsbsysinit's, plus dots) and the ones skipped as a package
# manager's or an editor's leftovers, or as disabled on purpose.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SKIPPED_SUFFIXES = ("~", ".dpkg-old", ".dpkg-dist", ".dpkg-new", ".dpkg-tmp", ".rpmnew", ".rpmsave", ".disabled")
# Read hooks' output in pieces this big; a pipe holds 64 KiB.
_CHUNK = 65536


class HookStatus(Enum):
    EXITED = "EXITED"
    KILLED = "KILLED"
    TIMED_OUT = "TIMED_OUT"
    REFUSED = "REFUSED"
    FAILED_TO_START = "FAILED_TO_START"
    SKIPPED = "SKIPPED"


class Outcome(Enum):
    RELEASED = "RELEASED"
    STILL_BUSY = "STILL_BUSY"
    NO_HOOK = "NO_HOOK"


@dataclass(frozen=True)
class HookRun:
    name: str
    status: HookStatus
    exit_code: int = 0
    signal: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is HookStatus.EXITED and self.exit_code == 0


@dataclass(frozen=True)
class MountHeld:
    device: str  # kernel name: vdb1, dm-0
    mount_point: str
    fstype: str
    namespace_pid: int  # a pid in the mount namespace it is mounted in (1: init's)


@dataclass(frozen=True)
class InterfaceHeld:
    name: str
    admin_up: bool
    master: str | None
    uppers: tuple[str, ...]
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class ReasonHeld:
    code: str
    detail: str
    object: str
    blocking: bool


@dataclass(frozen=True)
class FunctionHolding:
    """What one function holds, as a hook is told: taken from one scan and its verdict."""

    address: str
    pci_path: str
    state: str
    block_devices: tuple[str, ...] = ()  # the function's disks and everything stacked on them
    mounts: tuple[MountHeld, ...] = ()
    interfaces: tuple[InterfaceHeld, ...] = ()
    reasons: tuple[ReasonHeld, ...] = ()


# ------------------------------------------------------------------------------------------ pure parts


def holding(inventory: Inventory, function: PciFunction, verdict: FunctionVerdict) -> FunctionHolding:
    """What `function` holds in `inventory`: its block stack and their mounts (each mount point once
    per namespace), its interfaces, and the verdict's reasons."""
    graph = DeviceGraph(inventory)
    closure = graph.block_closure(function.block_devices)
    mounts: list[MountHeld] = []
    seen: set[tuple[str, int]] = set()
    for name in closure:
        for m in graph.mounts_on(name):
            key = (m.mount_point, m.namespace)
            if key not in seen:
                seen.add(key)
                mounts.append(MountHeld(name, m.mount_point, m.fstype, m.namespace_pid))
    interfaces = []
    for name in function.net_interfaces:
        iface = inventory.interfaces.get(name)
        if iface is not None:
            interfaces.append(
                InterfaceHeld(
                    iface.name, iface.admin_up, iface.master, iface.uppers, tuple(str(a) for a in iface.addresses)
                )
            )
    reasons = tuple(ReasonHeld(r.code.value, r.detail, r.object, r.blocking) for r in verdict.reasons)
    return FunctionHolding(
        str(function.address),
        str(function.path),
        verdict.state.value,
        tuple(closure),
        tuple(mounts),
        tuple(interfaces),
        reasons,
    )


def _env_item(text: str) -> str:
    # One item of a newline-separated list: wire_text's escapes (\134 for a backslash, \ooo for
    # bytes that are not UTF-8) plus \012 for a newline, so a mount point cannot split the list.
    return wire_text(text).replace("\n", "\\012")


def hook_environment(h: FunctionHolding, *, timeout: float) -> dict[str, str]:
    """A hook's whole environment. Lists are newline-separated, items escaped (_env_item);
    kernel names (block devices, interfaces) and reason codes never need it."""
    return {
        "PATH": HOOK_PATH,
        "LANG": "C.UTF-8",
        "UNPLUGD_FUNCTION": h.address,
        "UNPLUGD_PCI_PATH": h.pci_path,
        "UNPLUGD_STATE": h.state,
        "UNPLUGD_BLOCK_DEVICES": "\n".join(h.block_devices),
        "UNPLUGD_MOUNT_POINTS": "\n".join(_env_item(m.mount_point) for m in h.mounts),
        "UNPLUGD_INTERFACES": "\n".join(i.name for i in h.interfaces),
        "UNPLUGD_REASONS": "\n".join(sorted({r.code for r in h.reasons if r.blocking})),
        "UNPLUGD_HOOK_TIMEOUT": f"{timeout:g}",
    }


def hook_input(h: FunctionHolding) -> bytes:
    """The JSON a hook reads on stdin: everything in its environment, with detail. Strings are
    guest text as on the wire (wire_text: \\ooo for bytes that are not UTF-8, \\134 a backslash)."""
    doc = {
        "function": h.address,
        "pciPath": h.pci_path,
        "state": h.state,
        "blockDevices": list(h.block_devices),
        "mounts": [
            {
                "device": m.device,
                "mountPoint": wire_text(m.mount_point),
                "fstype": wire_text(m.fstype),
                "namespacePid": m.namespace_pid,
            }
            for m in h.mounts
        ],
        "interfaces": [
            {
                "name": i.name,
                "adminUp": i.admin_up,
                "master": i.master,
                "uppers": list(i.uppers),
                "addresses": list(i.addresses),
            }
            for i in h.interfaces
        ],
        "reasons": [
            {"code": r.code, "detail": wire_text(r.detail), "object": wire_text(r.object), "blocking": r.blocking}
            for r in h.reasons
        ],
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def hook_names(names: Sequence[str]) -> list[str]:
    """The names in a hooks directory that are hooks, in the order they run: byte order, like
    run-parts in the C locale. Hidden files and leftovers (`name~`, `.dpkg-old`, `.disabled`, ...)
    are not hooks."""
    return sorted(
        (n for n in names if _NAME.fullmatch(n) and not n.endswith(_SKIPPED_SUFFIXES)),
        key=lambda n: n.encode("utf-8", "surrogateescape"),
    )


def unsafe(st: os.stat_result, *, directory: bool) -> str:
    """Why a hook (or the hooks directory) may not be trusted with root, or "" if it may."""
    mode = stat.S_IMODE(st.st_mode)
    if directory and not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if not directory and not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}, not root"
    if mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)
        return f"writable by {who} (mode {mode:04o})"
    if not directory and not mode & 0o100:
        return f"not executable by its owner (mode {mode:04o})"
    return ""


def outcome(final_state: str, *, had_hooks: bool) -> Outcome:
    """A function's answer: READY at the end is RELEASED whatever ran; else NO_HOOK when there was
    nothing to run, STILL_BUSY when hooks ran (or were refused) and it is still not READY."""
    if final_state == State.READY.value:
        return Outcome.RELEASED
    return Outcome.STILL_BUSY if had_hooks else Outcome.NO_HOOK


# ------------------------------------------------------------------------------------------ running


class _Bounded:
    """A stream's first `limit` bytes; what comes after is counted and dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
        if room > 0:
            self.data += chunk[:room]


def _open_hook(dirfd: int, name: str) -> tuple[int, str]:
    """The hook's descriptor once it passed the checks, or (-1, why not)."""
    try:
        # O_NONBLOCK: a FIFO put in its place must not stall the open; it is refused right after.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: O_NOFOLLOW met a symbolic link
            return -1, "a symbolic link (hooks must be regular files)"
        return -1, f"cannot open: {exc.strerror}"
    why = unsafe(os.fstat(fd), directory=False)
    if why:
        os.close(fd)
        return -1, why
    return fd, ""


def run_hook(
    dirfd: int, directory: Path, name: str, *, env: Mapping[str, str], stdin: bytes, timeout: float, max_output: int
) -> HookRun:
    """Check and run one hook of the directory open as `dirfd`."""
    start = time.monotonic()
    fd, why = _open_hook(dirfd, name)
    if fd < 0:
        log.warning("release hook refused", extra={"hook": str(directory / name), "error": why})
        return HookRun(name, HookStatus.REFUSED, detail=why)
    try:
        try:
            proc = subprocess.Popen(
                [str(directory / name)],
                executable=f"/proc/self/fd/{fd}",  # the inode just checked, as fexecve(3) runs it
                pass_fds=(fd,),  # kept open across exec: a script's interpreter reopens it
                env={k.encode(): v.encode("utf-8", "surrogateescape") for k, v in env.items()},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd="/",
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            return HookRun(
                name,
                HookStatus.FAILED_TO_START,
                detail=f"cannot execute: {exc.strerror}",
                seconds=time.monotonic() - start,
            )
    finally:
        os.close(fd)
    out, err = _Bounded(max_output), _Bounded(max_output)
    timed_out = _pump(proc, stdin, out, err, start + timeout)
    code = proc.wait()
    seconds = time.monotonic() - start
    if timed_out and code < 0:
        status, detail = HookStatus.TIMED_OUT, f"still running after {timeout:g} s: its process group was killed"
    elif code < 0:
        status, detail = HookStatus.KILLED, f"killed by signal {signal.Signals(-code).name}"
    else:
        status = HookStatus.EXITED
        detail = "" if not timed_out else "exited; what it left running past the timeout was killed"
    return HookRun(
        name,
        status,
        exit_code=max(code, 0),
        signal=max(-code, 0),
        stdout=bytes(out.data),
        stderr=bytes(err.data),
        stdout_truncated=out.truncated,
        stderr_truncated=err.truncated,
        detail=detail,
        seconds=seconds,
    )


def _pump(proc: subprocess.Popen[bytes], stdin: bytes, out: _Bounded, err: _Bounded, deadline: float) -> bool:
    """Feed stdin and collect stdout and stderr until the hook has exited and both pipes closed;
    True if the deadline came first. Either way its process group is killed: at the deadline, or
    the moment the hook exits (what it left running there goes with it). The hook is not reaped
    here, so its process group id cannot be reused by another group before that kill."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    pidfd = os.pidfd_open(proc.pid)  # readable once the hook exits; does not reap it
    sel = selectors.DefaultSelector()
    pending = memoryview(stdin)
    os.set_blocking(proc.stdin.fileno(), False)
    if pending:
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    sel.register(pidfd, selectors.EVENT_READ, None)
    readers, exited = 2, False
    try:
        while readers or not exited:
            left = deadline - time.monotonic()
            if left <= 0:
                _kill_group(proc)
                return True
            for key, _ in sel.select(left):
                if key.fileobj == pidfd:
                    exited = True
                    sel.unregister(pidfd)
                    _kill_group(proc)
                elif key.fileobj is proc.stdin:
                    try:
                        pending = pending[os.write(proc.stdin.fileno(), pending) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = pending[:0]  # the hook does not read its stdin: fine
                    if not pending:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                else:
                    sink: _Bounded = key.data
                    chunk = os.read(key.fd, _CHUNK)
                    if chunk:
                        sink.add(chunk)
                    else:
                        sel.unregister(key.fileobj)
                        readers -= 1
        return False
    finally:
        sel.close()
        os.close(pidfd)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if not pipe.closed:
                pipe.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # Only while the hook is unreaped (running or a zombie): its pid, which names the group, is
    # still taken then.
    with contextlib.suppress(ProcessLookupError, PermissionError):  # nothing left in the group
        os.killpg(proc.pid, signal.SIGKILL)


def run_hooks(
    directory: Path, h: FunctionHolding, *, timeout: float, max_output: int, deadline: float
) -> tuple[list[HookRun], bool]:
    """Every hook of `directory` for one function, in order; and whether the directory has any.

    A directory that is missing has no hooks; one that fails the checks is one REFUSED result
    named after it (none of its hooks runs). Each hook gets `timeout` seconds, less when the
    call's `deadline` (time.monotonic) comes first; past it the rest are SKIPPED.
    """
    try:
        dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return [], False
    except OSError as exc:
        return [HookRun(str(directory), HookStatus.REFUSED, detail=f"cannot open the directory: {exc.strerror}")], True
    try:
        why = unsafe(os.fstat(dirfd), directory=True)
        if why:
            log.warning("release hooks directory refused", extra={"hook": str(directory), "error": why})
            return [HookRun(str(directory), HookStatus.REFUSED, detail=f"the hooks directory is {why}")], True
        names = hook_names(os.listdir(dirfd))
        runs = []
        env = hook_environment(h, timeout=timeout)
        data = hook_input(h)
        for name in names:
            left = deadline - time.monotonic()
            if left <= 0:
                runs.append(HookRun(name, HookStatus.SKIPPED, detail="the call's deadline had passed"))
                continue
            run = run_hook(
                dirfd, directory, name, env=env, stdin=data, timeout=min(timeout, left), max_output=max_output
            )
            log.info(
                "release hook ran",
                extra={"hook": name, "function": h.address, "status": run.status.value, "code": run.exit_code},
            )
            runs.append(run)
        return runs, bool(names)
    finally:
        os.close(dirfd)


# ------------------------------------------------------------------------------------------ the call


@dataclass(frozen=True)
class FunctionState:
    """A function as the last report showed it: state name and its reasons (protobuf, as sent)."""

    state: str
    reasons: tuple[object, ...] = ()


# Next report from the watch, waiting at most `timeout` seconds: {BDF: FunctionState} of the
# functions in it; raises TimeoutError, or returns None once the stream ended.
NextStates = Callable[[float], Mapping[str, FunctionState] | None]


@dataclass
class Released:
    address: str
    pci_path: str
    outcome: Outcome
    state: FunctionState
    hooks: list[HookRun] = field(default_factory=list)


# The first report after the hooks is taken even when they used up the deadline: it is what
# the answer says of every function. A scan takes well under a second, even under TCG.
FIRST_REPORT_GRACE = 10.0


def wait_ready(
    next_states: NextStates,
    watched: Collection[str],
    wanted: Collection[str],
    deadline: float,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, FunctionState]:
    """The last state of each `watched` function seen on the stream, once every `wanted` one is
    READY (at once when none is wanted) or at the deadline. At least one report is taken."""
    last: dict[str, FunctionState] = {}
    first = True
    while True:
        left = deadline - clock()
        try:
            states = next_states(max(left, FIRST_REPORT_GRACE) if first else max(left, 0.0))
        except TimeoutError:
            return last
        first = False
        if states is None:
            return last
        last.update({a: s for a, s in states.items() if a in watched})
        if all(a in last and last[a].state == State.READY.value for a in wanted):
            return last
        if clock() >= deadline:
            return last


class Releaser:
    """RequestRelease: hooks for the functions that are not READY, then the wait."""

    def __init__(self, engine: EngineApi, roots: Roots, leases: LeaseManager, config: ReleaseConfig) -> None:
        self._engine = engine
        self._roots = roots
        self._leases = leases
        self._config = config
        self._running = threading.Lock()

    def deadline_seconds(self, asked: float) -> float:
        cap = self._config.max_wait_seconds
        return cap if not asked > 0 or asked > cap else asked  # NaN and 0 take the cap

    def release(
        self, names: Sequence[str], asked_seconds: float, watch: Callable[[], AbstractContextManager[NextStates]]
    ) -> list[Released]:
        """Run the hooks, then wait on `watch` (entered once the hooks are done, so its first
        report is taken after them) until the functions that had hooks (or were READY) are READY."""
        if not names:
            raise InvalidArgument("name at least one device to release")
        seconds = self.deadline_seconds(asked_seconds)
        deadline = time.monotonic() + seconds
        if not self._running.acquire(blocking=False):
            raise ReleaseInProgress("another RequestRelease is running its hooks; ask again when it is done")
        try:
            inventory = self._engine.scan(self._roots, own_claims=self._leases.own_claims())
            functions = self._engine.select(inventory, names)
            verdicts = {v.address: v for v in evaluate(inventory, self._leases.leased())}
            results: list[Released] = []
            had: dict[str, bool] = {}
            for f in functions:
                verdict = verdicts[f.address]
                r = Released(str(f.address), str(f.path), Outcome.RELEASED, FunctionState(verdict.state.value))
                results.append(r)
                if verdict.state is State.READY:
                    had[r.address] = True
                    continue
                held = holding(inventory, f, verdict)
                r.hooks, had[r.address] = run_hooks(
                    self._config.directory,
                    held,
                    timeout=self._config.hook_timeout_seconds,
                    max_output=self._config.max_output_bytes,
                    deadline=deadline,
                )
        finally:
            self._running.release()
        with watch() as next_states:
            final = wait_ready(
                next_states, {r.address for r in results}, [r.address for r in results if had[r.address]], deadline
            )
        for r in results:
            r.state = final.get(r.address, r.state)
            r.outcome = outcome(r.state.state, had_hooks=had[r.address])
        return results
