#!/bin/bash
# Stage 2 of the SoftRoCE guest: runs as PID 1 after initramfs-init.sh has
# switch_rooted into the host's root (read-only 9p).  It brings up rxe0 on eth0,
# runs the caller's command in the checkout, writes its exit code to the
# exchange share and powers the guest off.
#
# Not meant to be run on the host.  Reads /run/softroce/config.sh, written by
# run-in-guest.sh (CMD array, passed-through environment, REPO).
#
# No `set -e`: PID 1 must never just exit (that would panic the kernel);
# every failure goes through finish() so the host gets a clear message.
set -uo pipefail

XCHG=/run/softroce
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { echo "[softroce] $*"; }

uptime_s() { local u _; read -r u _ < /proc/uptime; echo "$u"; }

# Write the exit code where the host looks for it, flush, power off.
finish() {
  echo "$1" > "$XCHG/rc.tmp" && mv "$XCHG/rc.tmp" "$XCHG/rc"
  sync
  # Silence even the kernel's emergency-level "reboot: Power down" line.
  echo 0 > /proc/sys/kernel/printk
  busybox poweroff -f
  echo o > /proc/sysrq-trigger  # in case busybox is missing
  sleep 60
}

# Setup failures use 125 (the host also reports 125 for rig failures).
die() { log "guest setup failed: $*"; finish 125; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
ln -sf /proc/self/fd /dev/fd 2>/dev/null
ln -sf /proc/self/fd/0 /dev/stdin 2>/dev/null
ln -sf /proc/self/fd/1 /dev/stdout 2>/dev/null
ln -sf /proc/self/fd/2 /dev/stderr 2>/dev/null

# shellcheck source=/dev/null
source "$XCHG/config.sh" || die "cannot read $XCHG/config.sh"

# The host root is read-only: give the usual scratch places a tmpfs.  This
# hides the host's /tmp inside the guest; keep shared files in the checkout.
# A checkout that lives below such a place (CI clones into /tmp) is moved
# aside and back, so the tmpfs does not hide it.
scratch_tmpfs() {
  case "$REPO/" in
    "$1"/*)
      mkdir -p /run/softroce-repo
      mount --move "$REPO" /run/softroce-repo || die "move $REPO aside"
      mount -t tmpfs -o mode=1777 tmpfs "$1"
      mkdir -p "$REPO"
      mount --move /run/softroce-repo "$REPO" || die "move $REPO back"
      ;;
    *) mount -t tmpfs -o mode=1777 tmpfs "$1" ;;
  esac
}
scratch_tmpfs /tmp
scratch_tmpfs /var/tmp
vlog() { [[ ${SOFTROCE_VERBOSE:-0} != 1 ]] || log "$* (guest uptime $(uptime_s)s)"; }
vlog "stage 2 started"

# Console output: without this the tty turns every \n into \r\n in the host's
# logs.  Keep the translation for an interactive terminal.
if [[ ${SOFTROCE_INTERACTIVE:-0} != 1 ]]; then
  stty -onlcr < /dev/console 2>/dev/null
fi

# No udev here: load everything explicitly.  rdma_ucm gives /dev/infiniband/
# rdma_cm, which librdmacm (and libfabric's verbs provider) needs.
modprobe -a virtio_net rdma_rxe ib_uverbs rdma_ucm || die "modprobe"
vlog "modules loaded"

ip link set lo up || die "lo up"
for _ in $(seq 50); do [[ -e /sys/class/net/eth0 ]] && break; sleep 0.1; done
ip addr add 10.0.2.15/24 dev eth0 || die "eth0 address"
ip link set eth0 up || die "eth0 up"
rdma link add rxe0 type rxe netdev eth0 || die "rdma link add rxe0"
vlog "rxe0 added"

# Poll sysfs (cheap under TCG) until the port is ACTIVE, then confirm through
# libibverbs once, so a broken userspace provider is caught here.
state=
for _ in $(seq 300); do
  state=$(cat /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null)
  [[ $state == *ACTIVE* ]] && break
  sleep 0.1
done
[[ $state == *ACTIVE* ]] || die "rxe0 port not ACTIVE (state: ${state:-none})"
vlog "rxe0 port ACTIVE in sysfs"
ibv_devinfo -d rxe0 2>&1 | grep -q PORT_ACTIVE || die "ibv_devinfo does not show rxe0 PORT_ACTIVE"

# pyverbs from Debian's python3-pyverbs, importable from any Python 3.11:
# a directory holding only a symlink, so the rest of dist-packages stays out.
PYVERBS_DIR=/run/softroce-pyverbs
mkdir -p "$PYVERBS_DIR"
ln -s /usr/lib/python3/dist-packages/pyverbs "$PYVERBS_DIR/pyverbs"

mkdir -p /tmp/home
export HOME=/tmp/home TMPDIR=/tmp LANG=C.UTF-8 TERM=${SOFTROCE_TERM:-dumb}
export PATH="$PATH:${SOFTROCE_HOST_PATH:-}"
export PYTHONPATH="${SOFTROCE_PYTHONPATH:+$SOFTROCE_PYTHONPATH:}$PYVERBS_DIR"
ulimit -l unlimited  # registered memory; root bypasses it anyway
for kv in "${SOFTROCE_ENV[@]}"; do export "$kv"; done
unset SOFTROCE_HOST_PATH SOFTROCE_PYTHONPATH SOFTROCE_TERM SOFTROCE_ENV

log "rxe0 ACTIVE at guest uptime $(uptime_s)s; running: ${CMD[*]}"
cd "$REPO" || die "cd $REPO"
if [[ ${SOFTROCE_INTERACTIVE:-0} == 1 ]]; then
  "${CMD[@]}"
else
  "${CMD[@]}" < /dev/null
fi
rc=$?
log "command exited $rc at guest uptime $(uptime_s)s"
finish "$rc"
