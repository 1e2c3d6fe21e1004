#!/bin/sh
# Build a .deb of the agent from the current work tree (committed or not), for Debian 12 guests.
#   packaging/deb/build.sh [OUTDIR]      (default: dist/)   prints the path of the .deb
# No debhelper: the tree is laid out by hand in the installed package's layout and packed with
# dpkg-deb. Python files go to /usr/lib/python3/dist-packages/unplugd as pyproject.toml maps them
# (unplugd <- proto/unplugd, unplugd.agent <- agent/, unplugd.host <- host/); the dependencies are
# Debian's python3-* packages, so the guest needs no pip.
set -eu
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-$REPO/dist}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

upstream=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$REPO/pyproject.toml")
rev=$(git -C "$REPO" rev-parse --short=10 HEAD 2>/dev/null || echo unknown)
dirty=""
if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=normal -- agent host proto packaging 2>/dev/null)" ]; then
    dirty=".dirty$(date +%s)"
fi
VERSION="${upstream}+git.${rev}${dirty}"

STAGE=$(mktemp -d)
chmod 0755 "$STAGE"
trap 'rm -rf "$STAGE"' EXIT INT TERM
SITE="$STAGE/usr/lib/python3/dist-packages/unplugd"

# copy_py SRC DEST: the package's source files (.py, .pyi, .proto, py.typed), never caches.
copy_py() {
    (cd "$1" && find . -type d -name __pycache__ -prune -o -type f \
        \( -name '*.py' -o -name '*.pyi' -o -name '*.proto' -o -name py.typed \) -print) |
    while read -r f; do
        install -D -m 0644 "$1/$f" "$2/$f"
    done
}
copy_py "$REPO/proto/unplugd" "$SITE"
copy_py "$REPO/agent" "$SITE/agent"
copy_py "$REPO/host" "$SITE/host"

mkdir -p "$STAGE/usr/bin"
for tool in unplugd:agent unplugctl:host; do
    name=${tool%%:*}; pkg=${tool#*:}
    printf '#!/usr/bin/python3\nfrom unplugd.%s.cli import main\nraise SystemExit(main())\n' "$pkg" \
        >"$STAGE/usr/bin/$name"
    chmod 0755 "$STAGE/usr/bin/$name"
done

install -D -m 0644 "$REPO/packaging/systemd/unplugd.service" "$STAGE/lib/systemd/system/unplugd.service"

mkdir -p "$STAGE/DEBIAN"
if [ -f "$REPO/packaging/config.toml" ]; then
    install -D -m 0644 "$REPO/packaging/config.toml" "$STAGE/etc/unplugd/config.toml"
    echo /etc/unplugd/config.toml >"$STAGE/DEBIAN/conffiles"
fi

size=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat >"$STAGE/DEBIAN/control" <<CONTROL
Package: unplugd
Version: $VERSION
Architecture: all
Section: admin
Priority: optional
Maintainer: unplugd developers <unplugd@localhost>
Installed-Size: $size
Depends: python3 (>= 3.11), python3-grpcio, python3-protobuf, python3-psutil, python3-pyudev, python3-pyroute2
Description: guest agent that tells whether a PCI device may be hot-unplugged
 unplugd inspects mounts in every mount namespace, swap, holder chains (dm, LVM,
 md, loop), processes holding device nodes open and network link state, and reports
 each PCI function as READY, BUSY (with reasons) or UNKNOWN over gRPC.
CONTROL

cat >"$STAGE/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    python3 -m compileall -q /usr/lib/python3/dist-packages/unplugd >/dev/null || true
    # deb-systemd-helper makes the enable symlinks without the reload that systemctl enable does.
    deb-systemd-helper enable unplugd.service >/dev/null || true
    if [ -d /run/systemd/system ]; then
        # A first install needs no daemon-reload: systemd (>= 242) loads a unit file it has not
        # seen when asked to start it. An upgrade may change the unit, so it reloads. (The reload
        # costs seconds in a TCG guest that installs the package at every boot.)
        if [ -n "$2" ]; then systemctl daemon-reload; fi
        # --no-block: postinst may run from a unit during boot; the start is queued, not awaited.
        systemctl restart --no-block unplugd.service || true
    fi
fi
SCRIPT
cat >"$STAGE/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop unplugd.service || true
fi
find /usr/lib/python3/dist-packages/unplugd -type d -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null || true
SCRIPT
cat >"$STAGE/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = remove ] || [ "$1" = purge ]; then
    if [ "$1" = purge ]; then deb-systemd-helper purge unplugd.service >/dev/null || true; fi
    deb-systemd-helper disable unplugd.service >/dev/null 2>&1 || true
    if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
SCRIPT
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"

deb="$OUT/unplugd_${VERSION}_all.deb"
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$deb" >/dev/null
echo "$deb"
