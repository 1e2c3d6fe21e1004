#!/bin/sh
# Build the RPMs (unplugd, unplugctl, python3-unplugd, and the source RPM) from the current work
# tree, committed or not, with rpmbuild and packaging/rpm/unplugd.spec.
#   packaging/rpm/build.sh [OUTDIR]      (default: dist/)   prints the path of each .rpm built
# Runs on Fedora/RHEL and on Debian (apt-get install rpm). Version: pyproject.toml's; release:
# 0.<commits>.git<rev>, so later commits upgrade earlier ones, plus .dirty<time> for a modified tree.
set -eu
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-$REPO/dist}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

. "$REPO/packaging/version.sh"
version=$UPSTREAM_VERSION
release="0.${GIT_COMMITS}.git${GIT_REV}${DIRTY}"
# What goes into the source tarball: everything the spec reads.
PATHS=$SOURCE_PATHS

TOP=$(mktemp -d)
trap 'rm -rf "$TOP"' EXIT INT TERM
mkdir -p "$TOP/SOURCES" "$TOP/SPECS"

# Source0: the files git knows or would add (tracked, and untracked but not ignored), as they are
# in the work tree now; a file deleted but not yet committed is left out.
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard -- $PATHS) |
        (cd "$REPO" && xargs -0 -r sh -c 'for f; do [ -f "$f" ] && printf "%s\0" "$f"; done' sh)
else
    # shellcheck disable=SC2086
    (cd "$REPO" && find $PATHS -name __pycache__ -prune -o -type f -print0)
fi | tar -C "$REPO" --null -T - --sort=name --owner=0 --group=0 --numeric-owner \
    --transform "s,^,unplugd-$version/," -czf "$TOP/SOURCES/unplugd-$version.tar.gz"

# The spec with this build's version and release written in, so the source RPM rebuilds alone.
sed -e "s/^%global upstream_version .*/%global upstream_version $version/" \
    -e "s/^%global snapshot .*/%global snapshot $release/" \
    "$REPO/packaging/rpm/unplugd.spec" >"$TOP/SPECS/unplugd.spec"
if ! grep -qx "%global upstream_version $version" "$TOP/SPECS/unplugd.spec" ||
    ! grep -qx "%global snapshot $release" "$TOP/SPECS/unplugd.spec"; then
    echo "build.sh: the spec lost its '%global upstream_version' or '%global snapshot' line" >&2
    exit 1
fi

# (SOURCE_DATE_EPOCH, from packaging/version.sh, dates the manual pages.)
set -- --define "_topdir $TOP"
# --nodeps only where dpkg owns the system: rpm's own database is empty there, so no BuildRequires
# could ever be met; on an rpm system they are checked as usual.
if [ -z "$(rpm -qa 2>/dev/null | head -n 1)" ]; then set -- "$@" --nodeps; fi
# Debian's rpm runs brp-compress, a bash script (`read -d`), through its #!/bin/sh line: under dash
# it fails on every file and the manual pages stay uncompressed. Fedora's /bin/sh is bash.
if [ "$(readlink -f /bin/sh)" != "$(readlink -f /bin/bash)" ]; then
    set -- "$@" --define "__brp_compress /bin/bash $(rpm --eval '%{__brp_compress}')"
fi
if ! rpmbuild -ba "$@" "$TOP/SPECS/unplugd.spec" >"$TOP/build.log" 2>&1; then
    cat "$TOP/build.log" >&2
    exit 1
fi

find "$TOP/RPMS" "$TOP/SRPMS" -type f -name '*.rpm' | sort | while read -r rpm; do
    cp "$rpm" "$OUT/"
    echo "$OUT/${rpm##*/}"
done
