#!/bin/busybox sh
# Stage 1 of the SoftRoCE guest: runs as /init inside the tiny initramfs that
# run-in-guest.sh builds (busybox + the modules needed for 9p over virtio).
#
# It mounts the host's root read-only over 9p, puts a tmpfs on /run, mounts the
# per-run exchange share at /run/softroce and the repository checkout (writable)
# at the same absolute path it has on the host, then switch_roots into the host
# root and hands over to stage 2 (guest-init.sh in the checkout).
#
# Any failure powers the guest off without writing an exit code; the host side
# reports that as a rig failure.

/bin/busybox mkdir -p /proc /sys /dev /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s

fail() {
  echo "[softroce] stage 1 failed: $*" >&2
  poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# The modules are stored in dependency order (modprobe --show-depends order);
# there is no udev or modprobe in here, so insmod them one by one.
while read -r ko; do
  insmod "/lib/modules/$ko" 2>/dev/null || fail "insmod $ko"
done < /modules.order

# msize: bigger 9p messages make file reads much faster under TCG.
# cache=loose on the read-only root: the host does not change it under us in a
# way that matters, and it saves a round trip per lookup (Python imports!).
P9="trans=virtio,version=9p2000.L,msize=512000"
mount -t 9p -o "$P9,ro,cache=loose" hostroot /newroot || fail "mount host root"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fail "mount /run"
mkdir -p /newroot/run/softroce
mount -t 9p -o "$P9" xchg /newroot/run/softroce || fail "mount exchange share"

read -r REPO < /newroot/run/softroce/repo || fail "no repo path in exchange share"
# cache=mmap: writes go straight to the host, but shared writable mmap works.
mount -t 9p -o "$P9,cache=mmap" repo "/newroot$REPO" || fail "mount repo at $REPO"

# busybox switch_root does not carry /dev over; move it, drop the others
# (stage 2 mounts fresh proc/sys).
mount --move /dev /newroot/dev || fail "move /dev"
umount /sys /proc

exec switch_root /newroot /bin/bash "$REPO/scripts/softroce/guest-init.sh"
