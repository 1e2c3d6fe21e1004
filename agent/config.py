"""The agent's configuration: /etc/unplugd/config.toml, read with tomllib.

Every key has a default (packaging/config.toml documents them); a file only
states what differs. Unknown keys and wrong types are errors that name the
key, so a typo never silently leaves a default (say, mutations) in force.
"""

from __future__ import annotations

import os
import stat
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from unplugd.agent.errors import AgentError
from unplugd.agent.reportsock import REPORT_SOCKET_NAME

__all__ = [
    "DEFAULT_PATH",
    "Config",
    "ConfigError",
    "MutationsConfig",
    "ReleaseConfig",
    "ServerConfig",
    "TcpConfig",
    "TransportsConfig",
    "VirtioSerialConfig",
    "VsockConfig",
    "WatchConfig",
    "load_config",
    "parse_config",
]

DEFAULT_PATH = Path("/etc/unplugd/config.toml")
# Upper bound of [watch] max_namespace_fds: half the unit's LimitNOFILE (4096),
# so a config cannot let namespaces starve connections of descriptors.
MAX_NAMESPACE_FDS = 2048
# Upper bound of [server] max_queued_calls: each waiting call holds its
# connection's fd, and the unit's LimitNOFILE is 4096.
MAX_QUEUED_CALLS = 2048

# A lease covers one unplug: an hour is far longer than any device_del takes,
# and bounds how long a forgotten lease keeps a disk from being mounted.
MAX_LEASE_SECONDS = 3600
# Open fds have no event: past ten minutes a watch would show a stale holder
# for longer than any client waits for it.
MAX_RESCAN_SECONDS = 600.0
# A release hook stops services and unmounts: ten minutes is longer than any
# service's own stop timeout (systemd's default is 90 s), and bounds how long
# one RequestRelease can keep a worker.
MAX_HOOK_SECONDS = 600.0
# What is kept of each hook's stdout and stderr: enough for a screenful of
# diagnostics, small enough that a chatty or hostile hook costs little memory.
MAX_HOOK_OUTPUT_BYTES = 1024 * 1024
# The packaged file, every key with its comment, is ~6 KiB: a megabyte is no configuration file
# (`--config /dev/zero` would otherwise read until memory runs out).
MAX_CONFIG_BYTES = 1024 * 1024


class ConfigError(AgentError):
    """The configuration file is unreadable or states something invalid."""


@dataclass(frozen=True)
class ServerConfig:
    # The gRPC server always listens here; bridges connect to it.
    socket: Path = Path("/run/unplugd/agent.sock")
    # Root only: whoever reaches the socket can ask for leases.
    socket_mode: int = 0o600
    # Worker threads; each WatchReport stream holds one while it lasts.
    max_workers: int = 16
    max_watchers: int = 8
    # Calls that wait for a worker (GetReports arriving during a scan share
    # the next one); past this many more, RESOURCE_EXHAUSTED. A waiting call
    # costs grpc a few KiB.
    max_queued_calls: int = 512

    @property
    def report_socket(self) -> Path:
        """The report socket (`unplugd inspect` answered by the agent: agent/reportsock.py), beside
        the gRPC one, with its mode; not a key of its own: one directory to configure, one to find."""
        return self.socket.parent / REPORT_SOCKET_NAME


@dataclass(frozen=True)
class MutationsConfig:
    # PrepareUnplug / ReleaseUnplug are refused unless this is true.
    enabled: bool = False
    default_lease_seconds: int = 60
    max_lease_seconds: int = 900


@dataclass(frozen=True)
class ReleaseConfig:
    # RequestRelease runs the hooks in `directory`; refused unless this and
    # [mutations] enabled are both true.
    enabled: bool = False
    directory: Path = Path("/etc/unplugd/release.d")
    # Each hook is killed (its whole process group) after this many seconds.
    hook_timeout_seconds: float = 30.0
    # Bytes kept of each hook's stdout and of its stderr; the rest is read and dropped.
    max_output_bytes: int = 16384
    # The longest a RequestRelease may wait (hooks and the wait for READY), whatever it asks.
    max_wait_seconds: float = 600.0


@dataclass(frozen=True)
class ReadinessConfig:
    # Ask the kernel too: an O_EXCL open of each idle disk, closed at once,
    # fails with EBUSY when something unseen holds it. A mount of that disk in
    # the same microseconds fails with EBUSY; false trades that for blindness
    # to such claims.
    exclusive_probe: bool = True


@dataclass(frozen=True)
class WatchConfig:
    # Open file descriptors have no event: rescan them this often while
    # someone watches.
    fd_rescan_seconds: float = 5.0
    # Events within this window are answered by one scan.
    debounce_seconds: float = 0.1
    # Mount namespaces watched through an open /proc/PID/mountinfo (an event
    # the moment their mounts change). Any user can make namespaces by the
    # thousand, and each file costs an fd and pins its namespace: past this
    # many, the rest are read by the scans only (at least every
    # fd_rescan_seconds, or 4 scans' time if longer: watch.RESCAN_PER_SCAN).
    # 512 fds fit the unit's LimitNOFILE with room for connections, lease
    # claims and a scan's transient fds.
    max_namespace_fds: int = 512


@dataclass(frozen=True)
class VsockConfig:
    enabled: bool = False
    # Below 1024: only root may bind it in the guest.
    port: int = 1000
    # Peers allowed to connect; CID 2 is the host.
    allowed_cids: tuple[int, ...] = (2,)


@dataclass(frozen=True)
class VirtioSerialConfig:
    # On by default, as qemu-guest-agent's port is: the port exists only when the host gave the VM a
    # channel of this name, only the host can open its other end, and what it serves is read-only
    # unless [mutations] says otherwise. Until the port appears the bridge just waits for it.
    enabled: bool = True
    # /dev/virtio-ports/<name>
    name: str = "org.unplugd.agent.0"


@dataclass(frozen=True)
class TcpConfig:
    # Mutual TLS is required: enabling TCP without all three files is an error.
    enabled: bool = False
    listen: str = ""
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None


@dataclass(frozen=True)
class TransportsConfig:
    vsock: VsockConfig = field(default_factory=VsockConfig)
    virtio_serial: VirtioSerialConfig = field(default_factory=VirtioSerialConfig)
    tcp: TcpConfig = field(default_factory=TcpConfig)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    mutations: MutationsConfig = field(default_factory=MutationsConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    readiness: ReadinessConfig = field(default_factory=ReadinessConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    transports: TransportsConfig = field(default_factory=TransportsConfig)
    # Where the values came from, for log lines; not a key in the file.
    source: str = field(default="defaults", compare=False)

    def with_overrides(self, *, socket: Path | None = None, enable_mutations: bool = False) -> Config:
        """Apply command-line flags: they win over the file."""
        cfg = self
        if socket is not None:
            cfg = replace(cfg, server=replace(cfg.server, socket=socket))
        if enable_mutations:
            cfg = replace(cfg, mutations=replace(cfg.mutations, enabled=True))
        return cfg


_T = TypeVar("_T")


def load_config(path: Path | None = None, *, missing_ok: bool | None = None) -> Config:
    """Read a config file. Without a path the default one is read if present.

    An explicitly named file must exist (missing_ok defaults to False then).
    """
    explicit = path is not None
    target = path if path is not None else DEFAULT_PATH
    if missing_ok is None:
        missing_ok = not explicit
    try:
        raw = _read_bounded(target)
    except FileNotFoundError:
        if missing_ok:
            return Config()
        raise ConfigError(f"{target}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{target}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{target}: not valid TOML: {exc}") from exc
    return parse_config(data, source=str(target))


def _read_bounded(path: Path) -> bytes:
    """The file's bytes, at most MAX_CONFIG_BYTES. O_NONBLOCK: a FIFO named as the file must not
    stall the start; it is refused right after the open (a character device such as /dev/null
    reads as it is, and /dev/zero stops at the bound)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    with os.fdopen(fd, "rb") as f:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise ConfigError(f"{path}: a FIFO, not a configuration file")
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes, not a configuration file")
    return raw


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> Config:
    """Build a Config from parsed TOML; ConfigError names the offending key."""
    cfg = _build(Config, data, prefix="", source=source, skip={"source"})
    cfg = replace(cfg, source=source)
    _validate(cfg, source)
    return cfg


def _build(cls: type[_T], data: Mapping[str, Any], *, prefix: str, source: str, skip: set[str] = frozenset()) -> _T:  # type: ignore[assignment]
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: [{prefix.rstrip('.')}] must be a table")
    assert is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name not in skip}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]!s} (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for name in known:
        if name not in data:
            continue
        key = f"{prefix}{name}"
        hint = hints[name]
        if is_dataclass(hint):
            values[name] = _build(typing.cast(type[Any], hint), data[name], prefix=key + ".", source=source)
        else:
            values[name] = _convert(hint, data[name], key, source)
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, source: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key} must be {expected}, not {type(value).__name__} {value!r}")

    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        # Only `X | None` is used: TOML has no null, so the key is just X.
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner, value, key, source)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise bad("a non-empty path string")
        return Path(value)
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, list):
            raise bad("a list")
        return tuple(_convert(item, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    raise ConfigError(f"{source}: {key}: unsupported setting type {hint!r}")  # a bug in this module


def _validate(cfg: Config, source: str) -> None:
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key} {why}")

    srv, mut, watch, tr = cfg.server, cfg.mutations, cfg.watch, cfg.transports
    need(srv.socket.is_absolute(), "server.socket", "must be an absolute path")
    need(0 <= srv.socket_mode <= 0o777, "server.socket_mode", "must be a permission mode like 0o600")
    need(srv.socket_mode & 0o007 == 0, "server.socket_mode", "must not give access to others")
    need(1 <= srv.max_workers <= 256, "server.max_workers", "must be between 1 and 256")
    need(
        1 <= srv.max_watchers < srv.max_workers,
        "server.max_watchers",
        "must be at least 1 and leave workers for other calls",
    )
    need(
        0 <= srv.max_queued_calls <= MAX_QUEUED_CALLS,
        "server.max_queued_calls",
        f"must be between 0 and {MAX_QUEUED_CALLS}",
    )
    need(
        1 <= mut.default_lease_seconds <= MAX_LEASE_SECONDS,
        "mutations.default_lease_seconds",
        f"must be between 1 and {MAX_LEASE_SECONDS}",
    )
    need(
        mut.default_lease_seconds <= mut.max_lease_seconds <= MAX_LEASE_SECONDS,
        "mutations.max_lease_seconds",
        f"must be between default_lease_seconds and {MAX_LEASE_SECONDS}",
    )
    # NaN fails every comparison, so it is refused along with what is out of range.
    need(
        0.5 <= watch.fd_rescan_seconds <= MAX_RESCAN_SECONDS,
        "watch.fd_rescan_seconds",
        f"must be between 0.5 and {MAX_RESCAN_SECONDS}",
    )
    need(
        0 <= watch.debounce_seconds <= 0.5,
        "watch.debounce_seconds",
        "must be between 0 and 0.5 (changes must arrive within a second)",
    )
    need(
        1 <= watch.max_namespace_fds <= MAX_NAMESPACE_FDS,
        "watch.max_namespace_fds",
        f"must be between 1 and {MAX_NAMESPACE_FDS}",
    )
    rel = cfg.release
    need(rel.directory.is_absolute(), "release.directory", "must be an absolute path")
    need(
        0.1 <= rel.hook_timeout_seconds <= MAX_HOOK_SECONDS,
        "release.hook_timeout_seconds",
        f"must be between 0.1 and {MAX_HOOK_SECONDS}",
    )
    need(
        0 <= rel.max_output_bytes <= MAX_HOOK_OUTPUT_BYTES,
        "release.max_output_bytes",
        f"must be between 0 and {MAX_HOOK_OUTPUT_BYTES}",
    )
    need(
        1 <= rel.max_wait_seconds <= MAX_HOOK_SECONDS * 10,
        "release.max_wait_seconds",
        f"must be between 1 and {MAX_HOOK_SECONDS * 10:g}",
    )
    need(1 <= tr.vsock.port <= 0xFFFFFFFF - 1, "transports.vsock.port", "must be a vsock port number")
    need(
        all(0 <= c < 0xFFFFFFFF for c in tr.vsock.allowed_cids),
        "transports.vsock.allowed_cids",
        "must be CIDs (0 to 4294967294; -1/any is not a CID)",
    )
    name = tr.virtio_serial.name
    need(
        bool(name) and "/" not in name and name not in (".", ".."),
        "transports.virtio_serial.name",
        "must be a port name without '/'",
    )
    if tr.tcp.enabled:
        need(bool(tr.tcp.listen), "transports.tcp.listen", "is required when TCP is enabled (host:port)")
        for attr in ("cert", "key", "client_ca"):
            need(
                getattr(tr.tcp, attr) is not None,
                f"transports.tcp.{attr}",
                "is required when TCP is enabled: TCP is served only with mutual TLS",
            )
