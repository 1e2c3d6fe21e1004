#!/bin/sh
# Install the Debian packages that building, testing and the demo need.
# Idempotent: runs apt-get only when something is missing.
set -eu
PKGS="qemu-system-x86 qemu-utils debootstrap python3-protobuf python3-grpcio python3-psutil
python3-pyudev python3-pyroute2 qemu-guest-agent lsof psmisc iproute2 util-linux libvirt-dev
pkg-config libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients socat e2fsprogs
dosfstools fdisk kmod cpio"
# lintian: tests/unit/test_deb_packages.py checks the .debs of packaging/deb/build.sh with it;
# systemd: systemd-analyze for tests/unit/test_systemd_unit.py (there on any systemd Debian).
PKGS="$PKGS lintian systemd"
# rpm, rpmlint: packaging/rpm/build.sh builds the Fedora/RHEL packages, tests/integration/test_rpm_package.py lints them
PKGS="$PKGS rpm rpmlint"
# tests/unit/test_manpages.py: man -l renders the generated pages (groff-base comes with man-db,
# col -b with bsdextrautils); the completions run under bash-completion and pass shellcheck.
PKGS="$PKGS man-db groff-base bsdextrautils bash-completion shellcheck"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "system-deps: installing$missing"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
