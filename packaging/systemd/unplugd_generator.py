#!/usr/bin/python3 -IS
"""unplugd-generator: relax unplugd.service's sandbox only for what its config enables.

TCP: the unit may use IP only when the config enables the TCP transport (tcp.conf).
Release hooks: only when `[mutations] enabled` and `[release] enabled` are both true, the unit
runs in the system's mount namespace with CAP_SYS_ADMIN (release.conf), so that its hooks can
unmount filesystems for everyone and stop units.

Installed as /lib/systemd/system-generators/unplugd-generator. systemd runs it at boot and at every
`systemctl daemon-reload` with three directories (normal, early, late; systemd.generator(7)). The
unit allows no AF_INET/AF_INET6 and denies every IP address; when /etc/unplugd/config.toml says
`[transports.tcp] enabled = true` this writes NORMAL_DIR/unplugd.service.d/tcp.conf, which adds
both families and IPAddressAllow=any (allow lists in drop-ins add to the unit's). Likewise
NORMAL_DIR/unplugd.service.d/release.conf for the release hooks (RELEASE_DROPIN says why each line).

A generator must never fail the boot and runs before most of the system is up: stdlib only
(python3 -IS: no site-packages, no user environment), and any trouble (no config, unreadable,
not TOML, enabled not a boolean) writes nothing and exits 0. The agent itself reports a broken
config when it starts. UNPLUGD_CONFIG names another config file (tests; systemd passes no
environment to generators).
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

CONFIG = Path("/etc/unplugd/config.toml")
DROPIN = "unplugd.service.d/tcp.conf"
TCP_DROPIN = """\
# Written by unplugd-generator: [transports.tcp] enabled = true in {config}.
[Service]
RestrictAddressFamilies=AF_INET AF_INET6
IPAddressAllow=any
"""

RELEASE_DROPIN_NAME = "unplugd.service.d/release.conf"
# A hook unmounts for the whole system and stops units: the unit must not have a mount namespace
# of its own (a umount there would change only the agent's view), so every setting that makes one
# is turned off; umount2 needs CAP_SYS_ADMIN and the @mount system calls; SecureBits= drops
# noroot, so that a hook run by root gets root's capabilities (within the bounding set) as any
# root program does. Nothing else changes: no new address families, devices or namespaces.
RELEASE_DROPIN = """\
# Written by unplugd-generator: [mutations] and [release] enabled = true in {config}.
# Release hooks unmount and stop units for the whole system: the agent runs in the system's
# mount namespace, with CAP_SYS_ADMIN and the mount system calls.
[Service]
ProtectSystem=no
ProtectHome=no
PrivateTmp=no
PrivateMounts=no
ProtectKernelTunables=no
ProtectKernelModules=no
ProtectKernelLogs=no
ProtectControlGroups=no
CapabilityBoundingSet=CAP_SYS_ADMIN
SecureBits=
SystemCallFilter=@mount
"""


def _flag(data: object, *keys: str) -> bool:
    """True only when data[keys[0]][keys[1]]... is the boolean true, every level a table."""
    for key in keys:
        if not isinstance(data, dict):
            return False
        data = data.get(key)
    return data is True


def _load(raw: bytes) -> dict[str, object]:
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}


def tcp_enabled(raw: bytes) -> bool:
    """True only when the file is valid TOML and [transports.tcp] enabled is the boolean true."""
    return _flag(_load(raw), "transports", "tcp", "enabled")


def release_enabled(raw: bytes) -> bool:
    """True only when the file is valid TOML and [mutations] and [release] enabled are both true."""
    data = _load(raw)
    return _flag(data, "mutations", "enabled") and _flag(data, "release", "enabled")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: unplugd-generator NORMAL_DIR [EARLY_DIR LATE_DIR]", file=sys.stderr)
        return 0
    config = Path(os.environ.get("UNPLUGD_CONFIG") or CONFIG)
    try:
        raw = config.read_bytes()
        for enabled, name, text in (
            (tcp_enabled, DROPIN, TCP_DROPIN),
            (release_enabled, RELEASE_DROPIN_NAME, RELEASE_DROPIN),
        ):
            if enabled(raw):
                target = Path(argv[1]) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text.format(config=config))
    except OSError as exc:
        # No config (the agent's defaults: no TCP), or a directory we cannot write: no drop-in.
        if not isinstance(exc, FileNotFoundError):
            print(f"unplugd-generator: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
