#!/bin/sh
# Build the development venv: the project's dependencies from pyproject.toml,
# and the package itself importable live from the work tree through .dev/,
# a tree of symlinks that mirrors the installed layout (unplugd.agent <- agent/).
set -eu
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" - >"$VENV/requirements.txt" <<'PYEOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = p["optional-dependencies"]
print("\n".join(p["dependencies"] + extras["dev"] + extras["host"]))
PYEOF
# `venv.sh links` remakes only .dev/ (make does when proto/unplugd/ gains or loses an entry).
if [ "${1:-}" != links ]; then
    "$VENV/bin/pip" install -q -r "$VENV/requirements.txt"
fi
rm -rf .dev && mkdir -p .dev/unplugd
# Every entry of the root package (the contract: generated messages, PCI paths, framing).
for entry in proto/unplugd/*; do
    case "$entry" in */__pycache__) continue ;; esac
    ln -s "../../$entry" ".dev/unplugd/${entry##*/}"
done
ln -s ../../agent .dev/unplugd/agent
ln -s ../../host .dev/unplugd/host
touch .dev/.stamp
[ "${1:-}" != links ] || exit 0
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$(pwd)/.dev" >"$site/unplugd-dev.pth"
# pyproject.toml's [project.scripts], as the .deb writes them (unplugd's main is agent/entry.py's:
# `unplugd inspect` asks the running agent before the CLI is imported)
for tool in unplugd:agent.entry unplugctl:host.cli; do
    name=${tool%%:*}; module=${tool#*:}
    printf '#!%s\nfrom unplugd.%s import main\nraise SystemExit(main())\n' \
        "$(pwd)/$VENV/bin/python" "$module" >"$VENV/bin/$name"
    chmod +x "$VENV/bin/$name"
done
touch "$VENV/.stamp"
