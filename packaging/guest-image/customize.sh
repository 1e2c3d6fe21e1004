#!/bin/sh
# Runs inside the debootstrapped root (chroot) after files/ was copied over it.
set -eu
export DEBIAN_FRONTEND=noninteractive
passwd -d root >/dev/null
printf '127.0.0.1 localhost\n127.0.1.1 unplugd-guest\n::1 localhost ip6-localhost ip6-loopback\n' >/etc/hosts
systemctl set-default multi-user.target
# Timers and monitors that only cost CPU in a short-lived TCG guest.
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
         mdmonitor.service mdmonitor-oneshot.timer mdcheck_start.timer mdcheck_continue.timer \
         lvm2-monitor.service getty@tty1.service; do
    systemctl mask "$u" >/dev/null 2>&1 || true
done
# Each boot gets its own machine id (the root disk is a fresh overlay).
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id
update-initramfs -u -k all
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
