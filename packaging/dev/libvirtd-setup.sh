#!/bin/sh
# Configure and start libvirtd on this (container-like, root) machine for the
# libvirt backend's tests: QEMU runs as root under TCG with no security
# driver, no cgroups and no mount namespaces. Idempotent: safe to run again;
# it starts only what is not running and never restarts a running daemon.
set -eu

# One setup at a time: `make test` runs two pytest workers, and both may ask at once.
mkdir -p /run/lock
exec 9>/run/lock/unplugd-libvirtd-setup.lock
flock 9

CONF=/etc/libvirt/qemu.conf
MARK="# unplugd dev settings (packaging/dev/libvirtd-setup.sh)"

mkdir -p /etc/libvirt
if ! grep -qF "$MARK" "$CONF" 2>/dev/null; then
    changed=1
    cat >>"$CONF" <<CONF
$MARK
user = "root"
group = "root"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
CONF
fi

# The qemu driver looks this user up even when told to run QEMU as root.
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu
fi
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt/qemu /run/libvirt

# By pid file, not by name: a test's private libvirtd (tests/integration/private_libvirtd.py) is
# also called libvirtd, and it is not the system's.
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# `9>&-`: a daemon that inherited the lock's descriptor would hold the lock for as long as it
# runs, and every later setup would wait on it forever.
running /run/virtlogd.pid || virtlogd -d 9>&-
if running /run/libvirtd.pid; then
    if [ "${changed:-0}" = 1 ]; then
        echo "libvirtd-setup: $CONF changed while libvirtd runs; restart libvirtd to apply it" >&2
    fi
else
    libvirtd -d 9>&-
fi

# Wait for the daemon to answer (up to 20 s).
i=0
until virsh -c qemu:///system version >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt 100 ]; then
        echo "libvirtd-setup: libvirtd does not answer on qemu:///system" >&2
        exit 1
    fi
    sleep 0.2
done
