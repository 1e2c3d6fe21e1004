#!/bin/sh
# Builds, in the q35 guest of test_real_kernel_q35.py, every scenario the agent must explain on a real
# kernel. Devices are found by what the host gave them (virtio-blk serial, NIC MAC), never by the names
# the guest happened to pick. Pids and names the tests assert are written under /run/rk/.
# Only what a user would run: mkfs, lvm, cryptsetup, mdadm, losetup, ip; modules load on demand, except
# bonding (loaded without options it creates a bond0 of its own, so max_bonds=0 is asked explicitly)
# and loop (losetup -f does not load it).
set -eu

RK=/run/rk
W=/mnt/rk
mkdir -p "$RK" "$W"

disk() { readlink -f "/dev/disk/by-id/virtio-$1"; }

nic() {
    for d in /sys/class/net/*; do
        if [ "$(cat "$d/address")" = "$1" ]; then
            basename "$d"
            return 0
        fi
    done
    echo "no interface with MAC $1" >&2
    return 1
}

# An MBR partition table (the image has no sfdisk): mbr DEV MiB... ; 0 = the rest of the disk.
mbr() {
    python3 - "$@" <<'PY'
import os, struct, sys
dev, sizes = sys.argv[1], [int(s) for s in sys.argv[2:]]
fd = os.open(dev, os.O_RDWR)
total = os.lseek(fd, 0, os.SEEK_END) // 512
table, start = b"", 2048
for mib in sizes:
    count = mib * 2048 if mib else total - start
    table += struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start, count)
    start += count
sector = bytearray(512)
sector[446:446 + len(table)] = table
sector[510:512] = b"\x55\xaa"
os.pwrite(fd, bytes(sector), 0)
os.fsync(fd)
os.close(fd)
PY
    # udev probes the disk after the write (its close is a change event); the re-read fails with EBUSY
    # while that probe has it open, so wait for udev and retry a little.
    udevadm settle
    for _ in $(seq 50); do
        blockdev --rereadpt "$1" 2>/dev/null && break
        sleep 0.2
    done
    udevadm settle
    [ -b "${1}1" ]
}

# Start a long-lived holder in the background; its pid goes to $RK/NAME.pid (sh execs into sleep).
hold() {
    name=$1
    shift
    setsid -f sh -c 'echo $$ >"$0"; '"$*" "$RK/$name.pid" </dev/null >/dev/null 2>&1
    for _ in $(seq 100); do
        [ -s "$RK/$name.pid" ] && return 0
        sleep 0.1
    done
    echo "holder $name did not start" >&2
    return 1
}

witness() { echo "$2" >"$1/witness" && sync; }

udevadm settle
# A stock guest loads none of these at boot; unload what an image may have preloaded (nothing uses them
# yet) so that what follows proves they load on demand.
for m in bonding raid1 dm_crypt loop; do
    modprobe -r -q "$m" 2>/dev/null || true
done
modprobe -r -q md_mod dm_mod 2>/dev/null || true
lsmod | grep -E '^(bonding|raid1|md_mod|dm_crypt|dm_mod|loop) ' >&2 || true

# ---- storage

# a partition mounted, and a bind mount of a directory of it
D=$(disk dpart)
mbr "$D" 0
mkfs.ext4 -q "${D}1"
mkdir -p $W/part $W/bind
mount "${D}1" $W/part
mkdir $W/part/sub
witness $W/part dpart
mount --bind $W/part/sub $W/bind

# mounted only in another mount namespace (a process keeps the namespace)
D=$(disk dns)
mkfs.ext4 -q "$D"
mkdir -p $W/ns
hold ns "exec unshare -m --propagation private sh -c 'mount $D $W/ns && echo dns >$W/ns/witness && sync && exec sleep 100000'"
for _ in $(seq 100); do
    grep -q " $W/ns " "/proc/$(cat $RK/ns.pid)/mountinfo" 2>/dev/null && break
    sleep 0.1
done

# swap on a partition
D=$(disk dswap)
mbr "$D" 0
mkswap "${D}1" >/dev/null
swapon "${D}1"

# a swap file on a mounted filesystem
D=$(disk dswapf)
mkfs.ext4 -q "$D"
mkdir -p $W/swapf
mount "$D" $W/swapf
witness $W/swapf dswapf
dd if=/dev/zero of=$W/swapf/swapfile bs=1M count=16 status=none
chmod 600 $W/swapf/swapfile
mkswap $W/swapf/swapfile >/dev/null
swapon $W/swapf/swapfile

# LVM: a volume group over two disks, its logical volume (spanning both) mounted
A=$(disk dlvm1)
B=$(disk dlvm2)
pvcreate -q "$A" "$B"
vgcreate -q rkspan "$A" "$B"
lvcreate -q -y -n data -l 100%FREE rkspan
mkfs.ext4 -q /dev/rkspan/data
mkdir -p $W/lvm
mount /dev/rkspan/data $W/lvm
witness $W/lvm lvm

# LVM: an active volume group whose logical volume is not mounted
D=$(disk dlvmidle)
pvcreate -q "$D"
vgcreate -q rkidle "$D"
lvcreate -q -y -n idle -l 100%FREE rkidle

# dm-crypt LUKS with a filesystem mounted (pbkdf2: argon2 would take seconds under TCG)
printf 'rk-secret' >$RK/key
D=$(disk dluks)
cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file $RK/key "$D"
cryptsetup open --key-file $RK/key "$D" rkluks
mkfs.ext4 -q /dev/mapper/rkluks
mkdir -p $W/luks
mount /dev/mapper/rkluks $W/luks
witness $W/luks luks

# plain dm-crypt, no filesystem
head -c 64 /dev/urandom >$RK/plainkey
cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 --key-file $RK/plainkey "$(disk dplain)" rkplain

# dm-linear over a whole disk
D=$(disk dlinear)
dmsetup create rklinear --table "0 $(blockdev --getsz "$D") linear $D 0"

# md RAID1 across two slots, mounted
A=$(disk dmd1)
B=$(disk dmd2)
mdadm --create /dev/md/rkmd --level=1 --raid-devices=2 --metadata=1.2 --run --assume-clean --quiet "$A" "$B"
udevadm settle
mkfs.ext4 -q /dev/md/rkmd
mkdir -p $W/md
mount /dev/md/rkmd $W/md
witness $W/md md

# a loop device backed by a file on the disk's filesystem
D=$(disk dloop)
mkfs.ext4 -q "$D"
mkdir -p $W/loopfs
mount "$D" $W/loopfs
witness $W/loopfs loop
dd if=/dev/zero of=$W/loopfs/img bs=1M count=8 status=none
modprobe loop  # losetup -f does not load it: "cannot find an unused loop device"
losetup --show -f $W/loopfs/img >$RK/loop.dev

# a process holding the raw device
hold raw "exec 3<$(disk draw); exec sleep 100000"

# a filesystem detached from every mount table (umount -l) that an open file still holds
D=$(disk dlazy)
mkfs.ext4 -q "$D"
mkdir -p $W/lazy
mount "$D" $W/lazy
witness $W/lazy lazy
hold lazy "exec 3<$W/lazy/witness; exec sleep 100000"
umount -l $W/lazy

# a mount in a mount namespace no process lives in, pinned by a bind mount of its nsfs file
D=$(disk dexcl)
mkfs.ext4 -q "$D"
mkdir -p $RK/ns $W/excl
mount --bind $RK/ns $RK/ns
mount --make-private $RK/ns
touch $RK/ns/mnt
unshare --mount=$RK/ns/mnt --propagation private mount "$D" $W/excl

# a character device of a PCI function (a virtio-serial port) held open
hold vport "exec 3</dev/virtio-ports/org.unplugd.rk.0; exec sleep 100000"

# a disk for wait-ready: mounted now, unmounted by the test
D=$(disk dwait)
mkfs.ext4 -q "$D"
mkdir -p $W/wait
mount "$D" $W/wait

# a disk for the --prepare lease: an ext4 partition and a swap partition, nothing active
D=$(disk dprep)
mbr "$D" 32 0
mkfs.ext4 -q "${D}1"
mkswap "${D}2" >/dev/null
mkdir -p $W/prep

# ---- network

modprobe bonding max_bonds=0

# up, no address (IPv6 off on it, so not even a link-local one)
N=$(nic 52:54:00:5a:00:01)
sysctl -q -w "net.ipv6.conf.$N.disable_ipv6=1"
ip link set "$N" up

# IPv4 address and the IPv4 default route
N=$(nic 52:54:00:5a:00:02)
ip link set "$N" up
ip addr add 192.0.2.10/24 dev "$N"
ip route add default via 192.0.2.1 dev "$N"

# IPv6 address and the IPv6 default route
N=$(nic 52:54:00:5a:00:03)
ip link set "$N" up
ip -6 addr add 2001:db8:6::10/64 dev "$N" nodad
ip -6 route add default via 2001:db8:6::1 dev "$N"

# uppers: bond (slave, up), bridge (port, up), vlan and macvlan (lower left down: the upper alone blocks)
N=$(nic 52:54:00:5a:00:04)
ip link add rkbond type bond mode active-backup
ip link set "$N" master rkbond
ip link set rkbond up
N=$(nic 52:54:00:5a:00:05)
ip link add rkbr type bridge
ip link set "$N" master rkbr
ip link set rkbr up
ip link set "$N" up
N=$(nic 52:54:00:5a:00:06)
ip link add link "$N" name rkvlan type vlan id 100
N=$(nic 52:54:00:5a:00:07)
ip link add link "$N" name rkmv type macvlan mode bridge

# an established TCP connection over a NIC: its peer NIC (same QEMU hub) moved into the network namespace
# rkpeer, where a listener runs; the peer NIC is also the "interface moved into another namespace" case
C=$(nic 52:54:00:5a:00:0a)
P=$(nic 52:54:00:5a:00:0b)
echo "$C" >$RK/conn.if
echo "$P" >$RK/peer.if
ip netns add rkpeer
ip link set "$P" netns rkpeer
ip netns exec rkpeer ip link set lo up
ip netns exec rkpeer ip addr add 10.99.0.2/24 dev "$P"
ip netns exec rkpeer ip link set "$P" up
ip addr add 10.99.0.1/24 dev "$C"
ip link set "$C" up
hold listener "exec ip netns exec rkpeer python3 -c '
import socket, time
s = socket.create_server((\"10.99.0.2\", 7000))
c, _ = s.accept()
time.sleep(100000)
'"
hold client "exec python3 -c '
import socket, time
for _ in range(300):
    try:
        c = socket.create_connection((\"10.99.0.2\", 7000), timeout=2, source_address=(\"10.99.0.1\", 0))
        break
    except OSError:
        time.sleep(0.1)
time.sleep(100000)
'"
for _ in $(seq 300); do
    ss -Htn state established src 10.99.0.1 | grep -q 10.99.0.2:7000 && break
    sleep 0.1
done
ss -Htn state established src 10.99.0.1 | grep -q 10.99.0.2:7000

# down and idle: nothing to do for 52:54:00:5a:00:0c
echo done
