#!/usr/bin/python3 -IS
"""unplugd-generator: let unplugd.service use IP only when its config enables the TCP transport.

Installed as /lib/systemd/system-generators/unplugd-generator. systemd runs it at boot and at every
`systemctl daemon-reload` with three directories (normal, early, late; systemd.generator(7)). The
unit allows no AF_INET/AF_INET6 and denies every IP address; when /etc/unplugd/config.toml says
`[transports.tcp] enabled = true` this writes NORMAL_DIR/unplugd.service.d/tcp.conf, which adds
both families and IPAddressAllow=any (allow lists in drop-ins add to the unit's).

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


def tcp_enabled(raw: bytes) -> bool:
    """True only when the file is valid TOML and [transports.tcp] enabled is the boolean true."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    tcp = data.get("transports", {})
    tcp = tcp.get("tcp", {}) if isinstance(tcp, dict) else {}
    return isinstance(tcp, dict) and tcp.get("enabled") is True


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: unplugd-generator NORMAL_DIR [EARLY_DIR LATE_DIR]", file=sys.stderr)
        return 0
    config = Path(os.environ.get("UNPLUGD_CONFIG") or CONFIG)
    try:
        if not tcp_enabled(config.read_bytes()):
            return 0
        target = Path(argv[1]) / DROPIN
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(TCP_DROPIN.format(config=config))
    except OSError as exc:
        # No config (the agent's defaults: no TCP), or a directory we cannot write: no drop-in.
        if not isinstance(exc, FileNotFoundError):
            print(f"unplugd-generator: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
