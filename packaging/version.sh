# Sourced (`. packaging/version.sh`) by packaging/deb/build.sh and packaging/rpm/build.sh with REPO set
# to the work tree: what names this build, the same way for both.
#   UPSTREAM_VERSION  pyproject.toml's [project] version
#   GIT_REV           the commit, 10 hex digits ("unknown" outside git)
#   GIT_COMMITS       commits up to it (0 outside git): the RPM release grows with it
#   DIRTY             ".dirty<epoch>" when SOURCE_PATHS differ from the commit (new files too), else ""
#   SOURCE_PATHS      what the packages are built from (and the RPM's Source0 holds)
#   SOURCE_DATE_EPOCH the commit's time (exported): two builds of one commit give the same pages
# shellcheck shell=sh disable=SC2034  # the variables are for the scripts that source this
: "${REPO:?packaging/version.sh needs REPO}"
SOURCE_PATHS="agent host proto packaging pyproject.toml README.md"
UPSTREAM_VERSION=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$REPO/pyproject.toml")
GIT_REV=$(git -C "$REPO" rev-parse --short=10 HEAD 2>/dev/null || echo unknown)
GIT_COMMITS=$(git -C "$REPO" rev-list --count HEAD 2>/dev/null || echo 0)
DIRTY=""
# shellcheck disable=SC2086
if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=normal -- $SOURCE_PATHS 2>/dev/null)" ]; then
    DIRTY=".dirty$(date +%s)"
fi
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH
