#!/bin/sh
# Build the Debian 12 packages from the current work tree (committed or not):
#   python3-unplugd  the root package `unplugd` (unplugd.v1, pci, framing, splice): both sides' contract
#   unplugd          the guest agent (unplugd.agent), its unit, udev rule, generator and config
#   unplugctl        the host tool (unplugd.host)
# so that a guest carries no hypervisor code and a host no agent.
#
#   packaging/deb/build.sh [OUTDIR]      (default: dist/)   prints the path of every .deb, one a line
#   UNPLUGD_DEB_VERSION=V                 version of all three (default UPSTREAM+git.REV[.dirtyTIME]),
#                                         e.g. a higher one to test an upgrade
#
# No debhelper, on purpose: the packages are arch-independent Python and a few files, laid out by
# hand in their installed layout and packed with dpkg-deb, which every Debian system has. That keeps
# the build to a second, needs no debian/ source tree or build-dependencies (debhelper, dh-python
# and their ~40 MB), and works from any work tree. What debhelper would add is written here in its
# own idiom: the maintainer scripts are the snippets dh_installsystemd and dh_python3 generate
# (deb-systemd-helper / deb-systemd-invoke, py3compile / py3clean), plus md5sums, conffiles, a
# copyright file and a changelog, so lintian reports no errors (tests/unit/test_deb_packages.py).
# Python files go to /usr/lib/python3/dist-packages/unplugd as pyproject.toml maps them
# (unplugd <- proto/unplugd, unplugd.agent <- agent/, unplugd.host <- host/); the dependencies are
# Debian's python3-* packages, so neither side needs pip (except unplugctl --qmp: qemu.qmp).
set -eu
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-$REPO/dist}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

. "$REPO/packaging/version.sh"
rev=$GIT_REV dirty=$DIRTY
VERSION=${UNPLUGD_DEB_VERSION:-"${UPSTREAM_VERSION}+git.${rev}${dirty}"}
# The changelog's date: the commit's, so that two builds of one commit are the same.
DATE=$(git -C "$REPO" log -1 --format=%aD 2>/dev/null || date -R)
MAINTAINER="unplugd developers <unplugd@users.noreply.github.com>"
SITE=usr/lib/python3/dist-packages/unplugd

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT INT TERM

# Man pages and bash completions, generated from the argument parsers and the config's own
# documentation by packaging/docs/generate.py (stdlib only).
# (SOURCE_DATE_EPOCH, from packaging/version.sh, dates them.)
DOCS="$STAGE/docs"
(cd "$REPO" && python3 packaging/docs/generate.py "$DOCS") >/dev/null

# copy_py SRC DEST: the package's source files (.py, .pyi, .proto, py.typed), never caches.
copy_py() {
    (cd "$1" && find . -type d -name __pycache__ -prune -o -type f \
        \( -name '*.py' -o -name '*.pyi' -o -name '*.proto' -o -name py.typed \) -print) |
    while read -r f; do
        install -D -m 0644 "$1/$f" "$2/$f"
    done
}

# entry_point ROOT NAME MODULE: /usr/bin/NAME running unplugd.MODULE's main(), as pip's scripts do
# (pyproject.toml's [project.scripts]).
entry_point() {
    mkdir -p "$1/usr/bin"
    printf '#!/usr/bin/python3\nfrom unplugd.%s import main\nraise SystemExit(main())\n' "$3" >"$1/usr/bin/$2"
    chmod 0755 "$1/usr/bin/$2"
}

# man_page ROOT FILE SECTION: a generated page, gzipped as Debian policy wants (-n: reproducible).
man_page() {
    install -d "$1/usr/share/man/man$3"
    gzip -9n <"$DOCS/man/$2" >"$1/usr/share/man/man$3/$2.gz"
    chmod 0644 "$1/usr/share/man/man$3/$2.gz"
}

# completion ROOT NAME: the generated bash completion, loaded on demand by bash-completion.
completion() {
    install -D -m 0644 "$DOCS/bash-completion/$2" "$1/usr/share/bash-completion/completions/$2"
}

# doc_files ROOT PACKAGE: copyright (machine-readable, DEP-5) and changelog, as policy 12.5/12.7 ask.
doc_files() {
    d="$1/usr/share/doc/$2"
    install -d "$d"
    cat >"$d/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: unplugd
Source: https://github.com/unplugd/unplugd

Files: *
Copyright: $(date -d "$DATE" +%Y) unplugd developers
License: Apache-2.0

License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the "License"); you may not
 use this file except in compliance with the License. You may obtain a copy of
 the License at http://www.apache.org/licenses/LICENSE-2.0
 .
 Unless required by applicable law or agreed to in writing, software
 distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
 WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
 License for the specific language governing permissions and limitations under
 the License.
 .
 On Debian systems, the complete text of the Apache License, Version 2.0 can be
 found in "/usr/share/common-licenses/Apache-2.0".
COPYRIGHT
    # A native package (no Debian revision): its changelog is changelog.gz.
    printf '%s (%s) unstable; urgency=medium\n\n  * Built from git %s%s.\n\n -- %s  %s\n' \
        unplugd "$VERSION" "$rev" "${dirty:+ with uncommitted changes}" "$MAINTAINER" "$DATE" |
        gzip -9n >"$d/changelog.gz"
    chmod 0644 "$d/copyright" "$d/changelog.gz"
}

# script ROOT NAME: append stdin to the maintainer script NAME, started if it does not exist yet.
script() {
    if [ ! -f "$1/DEBIAN/$2" ]; then printf '#!/bin/sh\nset -e\n' >"$1/DEBIAN/$2"; fi
    cat >>"$1/DEBIAN/$2"
}

# py_compile ROOT PACKAGE / py_clean ROOT PACKAGE: byte-compile on install and clean on removal,
# as dh_python3 does.
py_compile() {
    script "$1" postinst <<SCRIPT
# Automatically added by dh_python3 (as generated; packaging/deb/build.sh)
if command -v py3compile >/dev/null 2>&1; then
	py3compile -p $2
fi
# End automatically added section
SCRIPT
}
py_clean() {
    script "$1" prerm <<SCRIPT
# Automatically added by dh_python3 (as generated; packaging/deb/build.sh)
if command -v py3clean >/dev/null 2>&1; then
	py3clean -p $2
else
	dpkg -L $2 | sed -En -e '/^(.*)\/(.+)\.py\$/s,,rm "\1/__pycache__/\2".*,e'
	find /usr/lib/python3/dist-packages/ -type d -name __pycache__ -empty -print0 | xargs --null --no-run-if-empty rmdir
fi
# End automatically added section
SCRIPT
}

# pack ROOT PACKAGE SECTION DEPENDS DESCRIPTION...: control, md5sums, then the .deb; prints its path.
pack() {
    root=$1 pkg=$2 section=$3 depends=$4
    shift 4
    doc_files "$root" "$pkg"
    find "$root" -path "$root/DEBIAN" -prune -o -type d -exec chmod 0755 {} +
    size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
    {
        printf 'Package: %s\nSource: unplugd\nVersion: %s\nArchitecture: all\n' "$pkg" "$VERSION"
        printf 'Maintainer: %s\nInstalled-Size: %s\nDepends: %s\n' "$MAINTAINER" "$size" "$depends"
        printf 'Section: %s\nPriority: optional\nHomepage: https://github.com/unplugd/unplugd\n' "$section"
        printf 'Description: %s\n' "$1"
        shift
        for line in "$@"; do printf ' %s\n' "$line"; done
    } >"$root/DEBIAN/control"
    (cd "$root" && find . -path ./DEBIAN -prune -o -type f -print | sed 's,^\./,,' | LC_ALL=C sort |
        xargs -r md5sum) >"$root/DEBIAN/md5sums"
    chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"
    for s in postinst prerm postrm; do
        if [ -f "$root/DEBIAN/$s" ]; then chmod 0755 "$root/DEBIAN/$s"; fi
    done
    deb="$OUT/${pkg}_${VERSION}_all.deb"
    dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
    echo "$deb"
}

PY_DEP="python3 (>= 3.11)"

# ---------------------------------------------------------------- python3-unplugd
R="$STAGE/python3-unplugd"
install -d "$R/DEBIAN"
copy_py "$REPO/proto/unplugd" "$R/$SITE"
py_compile "$R" python3-unplugd
py_clean "$R" python3-unplugd
pack "$R" python3-unplugd python "$PY_DEP, python3-grpcio, python3-protobuf" \
    "unplugd's shared Python package: gRPC contract and PCI addresses" \
    "The Python package unplugd that both the guest agent (package unplugd) and" \
    "the host tool (package unplugctl) import: the generated gRPC/protobuf code of" \
    "unplugd.v1, PCI addresses and paths, and the virtio-serial session framing."

# ---------------------------------------------------------------- unplugd (guest agent)
R="$STAGE/unplugd"
install -d "$R/DEBIAN"
copy_py "$REPO/agent" "$R/$SITE/agent"
entry_point "$R" unplugd agent.entry
install -D -m 0644 "$REPO/packaging/systemd/unplugd.service" "$R/lib/systemd/system/unplugd.service"
install -D -m 0755 "$REPO/packaging/systemd/unplugd_generator.py" "$R/lib/systemd/system-generators/unplugd-generator"
install -D -m 0644 "$REPO/packaging/udev/60-unplugd.rules" "$R/lib/udev/rules.d/60-unplugd.rules"
install -D -m 0644 "$REPO/packaging/config.toml" "$R/etc/unplugd/config.toml"
echo /etc/unplugd/config.toml >"$R/DEBIAN/conffiles"
# Release hooks: the directory (empty: none runs until an administrator puts one there) and the
# examples, enabled by copying them into it (README: "Release hooks").
install -d -m 0755 "$R/etc/unplugd/release.d"
for hook in "$REPO"/packaging/release.d/*; do
    install -D -m 0755 "$hook" "$R/usr/share/unplugd/examples/release.d/$(basename "$hook")"
done
chmod 0644 "$R/DEBIAN/conffiles"
man_page "$R" unplugd.8 8
man_page "$R" unplugd.conf.5 5
completion "$R" unplugd
py_compile "$R" unplugd
# The dh_installsystemd snippets (debhelper 13.11, Debian 12) for a unit enabled and started on
# install, restarted (not stopped and started) on upgrade, stopped on removal, forgotten on purge.
script "$R" postinst <<'SCRIPT'
# Automatically added by dh_installsystemd (as generated; packaging/deb/build.sh)
if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ] ; then
	# This will only remove masks created by d-s-h on package removal.
	deb-systemd-helper unmask 'unplugd.service' >/dev/null || true

	# was-enabled defaults to true, so new installations run enable.
	if deb-systemd-helper --quiet was-enabled 'unplugd.service'; then
		# Enables the unit on first installation, creates new
		# symlinks on upgrades if the unit file has changed.
		deb-systemd-helper enable 'unplugd.service' >/dev/null || true
	else
		# Update the statefile to add new symlinks (if any), which need to be
		# cleaned up on purge. Also remove old symlinks.
		deb-systemd-helper update-state 'unplugd.service' >/dev/null || true
	fi
fi
# End automatically added section
# Automatically added by dh_installsystemd (as generated; packaging/deb/build.sh)
if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ] ; then
	if [ -d /run/systemd/system ]; then
		# Also runs unplugd-generator: the TCP drop-in follows the config (kept or new).
		systemctl --system daemon-reload >/dev/null || true
		if [ -n "$2" ]; then
			_dh_action=restart
		else
			_dh_action=start
		fi
		deb-systemd-invoke $_dh_action 'unplugd.service' >/dev/null || true
	fi
fi
# End automatically added section
SCRIPT
script "$R" prerm <<'SCRIPT'
# Automatically added by dh_installsystemd (as generated; packaging/deb/build.sh)
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
	deb-systemd-invoke stop 'unplugd.service' >/dev/null || true
fi
# End automatically added section
SCRIPT
py_clean "$R" unplugd
# Stopped, the unit's RuntimeDirectory (/run/unplugd, the socket in it) is removed by systemd.
script "$R" postrm <<'SCRIPT'
# Automatically added by dh_installsystemd (as generated; packaging/deb/build.sh)
if [ "$1" = remove ] && [ -d /run/systemd/system ] ; then
	systemctl --system daemon-reload >/dev/null || true
fi
# End automatically added section
# Automatically added by dh_installsystemd (as generated; packaging/deb/build.sh)
if [ "$1" = "remove" ]; then
	if [ -x "/usr/bin/deb-systemd-helper" ]; then
		deb-systemd-helper mask 'unplugd.service' >/dev/null || true
	fi
fi

if [ "$1" = "purge" ]; then
	if [ -x "/usr/bin/deb-systemd-helper" ]; then
		deb-systemd-helper purge 'unplugd.service' >/dev/null || true
		deb-systemd-helper unmask 'unplugd.service' >/dev/null || true
	fi
fi
# End automatically added section
# dpkg removes the conffile /etc/unplugd/config.toml (and its .dpkg-* copies) on purge; the
# directory goes too unless it holds files the admin put there (TLS keys): those are not ours.
if [ "$1" = "purge" ]; then
	rmdir --ignore-fail-on-non-empty /etc/unplugd 2>/dev/null || true
fi
SCRIPT
pack "$R" unplugd admin \
    "$PY_DEP, python3-unplugd (= $VERSION), python3-psutil, python3-pyudev, python3-pyroute2" \
    "guest agent that tells whether a PCI device may be hot-unplugged" \
    "unplugd inspects mounts in every mount namespace, swap, holder chains (dm, LVM," \
    "md, loop), processes holding device nodes open and network link state, and" \
    "reports each PCI function as READY, BUSY (with reasons) or UNKNOWN over gRPC," \
    "on a root-only unix socket and, as /etc/unplugd/config.toml enables them," \
    "virtio-serial, vsock and TCP with mutual TLS." \
    "." \
    "Install it in the virtual machine; the host side is the package unplugctl."

# ---------------------------------------------------------------- unplugctl (host tool)
R="$STAGE/unplugctl"
install -d "$R/DEBIAN"
copy_py "$REPO/host" "$R/$SITE/host"
entry_point "$R" unplugctl host.cli
man_page "$R" unplugctl.1 1
completion "$R" unplugctl
install -d "$R/usr/share/doc/unplugctl"
cat >"$R/usr/share/doc/unplugctl/README.Debian" <<'README'
unplugctl for Debian
====================

unplugctl talks to libvirt through python3-libvirt, a dependency of this package.

`unplugctl --qmp SOCKET` talks to a QEMU process directly through QMP, with the Python
package qemu.qmp, which Debian 12 does not ship. Install it from PyPI:

    pip install qemu.qmp

(Debian 12's pip refuses to write to the system's Python without
--break-system-packages: `pip install --break-system-packages qemu.qmp` puts it
under /usr/local/lib/python3.11/dist-packages, where /usr/bin/unplugctl finds it.)
Without it, --qmp stops with one line saying so.
README
chmod 0644 "$R/usr/share/doc/unplugctl/README.Debian"
py_compile "$R" unplugctl
py_clean "$R" unplugctl
pack "$R" unplugctl admin "$PY_DEP, python3-unplugd (= $VERSION), python3-libvirt" \
    "host tool that hot-unplugs PCI devices from a VM only when safe" \
    "unplugctl reads a virtual machine's PCI topology from libvirt (or QEMU's QMP)," \
    "asks the unplugd agent in the guest whether each function may go, and" \
    "unplugs the slot only when the guest says READY (or when told to force it)." \
    "." \
    "--qmp needs the Python package qemu.qmp, which Debian 12 does not ship:" \
    "pip install qemu.qmp (see README.Debian)."
