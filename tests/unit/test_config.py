"""config.toml: documented defaults, overrides, and errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import REPO
from unplugd.agent.config import MAX_CONFIG_BYTES, Config, ConfigError, load_config, parse_config


def test_packaged_file_states_exactly_the_defaults() -> None:
    assert load_config(REPO / "packaging" / "config.toml") == Config()


def test_values_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nsocket = "/run/x/a.sock"\nsocket_mode = 0o660\n'
        "[mutations]\nenabled = true\nmax_lease_seconds = 120\n"
        "[watch]\nfd_rescan_seconds = 2\n"
        "[transports.vsock]\nenabled = true\nallowed_cids = [2, 3]\n"
        '[transports.tcp]\nenabled = true\nlisten = "[::]:7443"\n'
        'cert = "/c"\nkey = "/k"\nclient_ca = "/ca"\n'
    )
    cfg = load_config(path)
    assert cfg.server.socket == Path("/run/x/a.sock") and cfg.server.socket_mode == 0o660
    assert cfg.mutations.enabled and cfg.mutations.max_lease_seconds == 120
    assert cfg.watch.fd_rescan_seconds == 2.0 and isinstance(cfg.watch.fd_rescan_seconds, float)
    assert cfg.transports.vsock.allowed_cids == (2, 3)
    assert cfg.transports.tcp.client_ca == Path("/ca")
    assert cfg.source == str(path)
    flags = Config().with_overrides(socket=Path("/tmp/s"), enable_mutations=True)
    assert flags.server.socket == Path("/tmp/s") and flags.mutations.enabled


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[server]\nsockett = '/x'\n", "server.sockett"),
        ("[mutation]\nenabled = true\n", "mutation"),
        ("[transports.vsock]\nprot = 5\n", "transports.vsock.prot"),
        ("[mutations]\nenabled = 'yes'\n", "mutations.enabled"),
        ("[mutations]\nenabled = 1\n", "mutations.enabled"),
        ("[mutations]\ndefault_lease_seconds = true\n", "mutations.default_lease_seconds"),
        ("[mutations]\ndefault_lease_seconds = 1.5\n", "mutations.default_lease_seconds"),
        ("[mutations]\ndefault_lease_seconds = 0\n", "mutations.default_lease_seconds"),
        ("[mutations]\ndefault_lease_seconds = 100\nmax_lease_seconds = 10\n", "mutations.max_lease_seconds"),
        ("[server]\nsocket = 'relative.sock'\n", "server.socket"),
        ("[server]\nsocket = ''\n", "server.socket"),
        ("[server]\nsocket_mode = 0o666\n", "server.socket_mode"),
        ("[server]\nmax_watchers = 16\n", "server.max_watchers"),
        ("[server]\nmax_watchers = 0\n", "server.max_watchers"),
        ("[server]\nmax_workers = 0\n", "server.max_workers"),
        ("[server]\nmax_workers = 100000\n", "server.max_workers"),
        ("[server]\nsocket_mode = -1\n", "server.socket_mode"),
        ("[mutations]\ndefault_lease_seconds = -5\n", "mutations.default_lease_seconds"),
        ("[mutations]\ndefault_lease_seconds = 4000\nmax_lease_seconds = 4000\n", "mutations.default_lease_seconds"),
        ("[mutations]\nmax_lease_seconds = 99999999999999999\n", "mutations.max_lease_seconds"),
        ("[watch]\nfd_rescan_seconds = inf\n", "watch.fd_rescan_seconds"),
        ("[watch]\nfd_rescan_seconds = nan\n", "watch.fd_rescan_seconds"),
        ("[watch]\nfd_rescan_seconds = 100000\n", "watch.fd_rescan_seconds"),
        ("[watch]\ndebounce_seconds = -0.1\n", "watch.debounce_seconds"),
        ("[watch]\ndebounce_seconds = nan\n", "watch.debounce_seconds"),
        ("[transports.vsock]\nport = 0\n", "transports.vsock.port"),
        ("[transports.vsock]\nport = 4294967295\n", "transports.vsock.port"),
        ("[transports.vsock]\nallowed_cids = [2, -1]\n", "transports.vsock.allowed_cids"),
        ("[transports.vsock]\nallowed_cids = [4294967295]\n", "transports.vsock.allowed_cids"),
        ("[watch]\nfd_rescan_seconds = 0.01\n", "watch.fd_rescan_seconds"),
        ("[watch]\ndebounce_seconds = 2\n", "watch.debounce_seconds"),
        ("[watch]\nmax_namespace_fds = 0\n", "watch.max_namespace_fds"),
        ("[watch]\nmax_namespace_fds = 100000\n", "watch.max_namespace_fds"),
        ("[transports.vsock]\nallowed_cids = 2\n", "transports.vsock.allowed_cids"),
        ("[transports.vsock]\nallowed_cids = ['2']\n", "transports.vsock.allowed_cids[0]"),
        ("[transports.virtio_serial]\nname = '../x'\n", "transports.virtio_serial.name"),
        ("[transports.tcp]\nenabled = true\nlisten = ':1'\ncert = '/c'\nkey = '/k'\n", "transports.tcp.client_ca"),
        ("[transports.tcp]\nenabled = true\n", "transports.tcp.listen"),
        ("[release]\ndirectory = 'release.d'\n", "release.directory"),
        ("[release]\nhook_timeout_seconds = 0\n", "release.hook_timeout_seconds"),
        ("[release]\nhook_timeout_seconds = nan\n", "release.hook_timeout_seconds"),
        ("[release]\nhook_timeout_seconds = 601\n", "release.hook_timeout_seconds"),
        ("[release]\nmax_output_bytes = -1\n", "release.max_output_bytes"),
        ("[release]\nmax_output_bytes = 1048577\n", "release.max_output_bytes"),
        ("[release]\nmax_wait_seconds = 0.5\n", "release.max_wait_seconds"),
        ("[release]\nenabled = 'yes'\n", "release.enabled"),
        ("server = 5\n", "server"),
        ("source = 'x'\n", "source"),
    ],
)
def test_errors_name_the_key(text: str, names: str) -> None:
    import tomllib

    with pytest.raises(ConfigError) as err:
        parse_config(tomllib.loads(text), source="t.toml")
    assert names in str(err.value)
    assert str(err.value).startswith("t.toml: ")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")
    assert load_config(tmp_path / "absent.toml", missing_ok=True) == Config()
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(binary)
    with pytest.raises(ConfigError):
        load_config(tmp_path)  # a directory


def test_a_file_that_is_no_configuration_is_refused_not_read_forever(tmp_path: Path) -> None:
    """`--config /dev/zero` once read until memory ran out (a MemoryError traceback) and a FIFO
    with no writer stalled the start: each is now one error naming the file."""
    with pytest.raises(ConfigError, match=r"^/dev/zero: larger than \d+ bytes"):
        load_config(Path("/dev/zero"))
    big = tmp_path / "big.toml"
    big.write_bytes(b"# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="a FIFO, not a configuration file"):
        load_config(fifo)
    assert load_config(Path("/dev/null")) == Config(source="/dev/null")  # empty: every default
