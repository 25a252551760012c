#!/usr/bin/env bash
# Run a command inside a throw-away QEMU guest with a SoftRoCE (rdma_rxe)
# device rxe0, for testing RDMA code on machines without RDMA hardware.
#
#   scripts/softroce/run-in-guest.sh [--timeout SECONDS] [--env NAME[=VALUE]]... -- COMMAND...
#
# The guest boots the host's Debian kernel under TCG (hardware KVM does not
# work on these machines), sees the host's root file system read-only over 9p,
# and this repository checkout writable at the same absolute path, so .venv and
# editable installs work unchanged.  COMMAND runs in the checkout; its output
# appears on stdout (serial console), and its exit code is this script's.
#
# Exit codes: COMMAND's own; 124 timeout; 77 skipped (no QEMU/kernel and
# cannot install them); 125 rig failure or usage error.
#
# Environment knobs: SOFTROCE_MEM (default 3G), SOFTROCE_SMP (2),
# SOFTROCE_KERNEL (kernel version, default: newest with rdma_rxe),
# SOFTROCE_CACHE (initramfs cache dir), SOFTROCE_NO_INSTALL=1 (never apt-get),
# SOFTROCE_VERBOSE=1 (log guest setup steps with timestamps),
# SOFTROCE_KARGS (extra kernel command-line arguments).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$HERE/../.." && pwd -P)

say() { echo "run-in-guest: $*" >&2; }
usage() {
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit "${1:-125}"
}
skip() { echo "run-in-guest: skipped: $*" >&2; exit 77; }

# ---- arguments --------------------------------------------------------------
TIMEOUT=900
PASS_ENV=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --timeout) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || usage; TIMEOUT=$2; shift 2 ;;
    --timeout=*) TIMEOUT=${1#*=}; [[ $TIMEOUT =~ ^[0-9]+$ ]] || usage; shift ;;
    --env) [[ $# -ge 2 ]] || usage
           if [[ $2 == *=* ]]; then PASS_ENV+=("$2")
           elif [[ -v $2 ]]; then PASS_ENV+=("$2=${!2}"); fi
           shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[[ $# -gt 0 ]] || usage
CMD=("$@")

# ---- prerequisites ----------------------------------------------------------
# The newest installed kernel that ships rdma_rxe (or SOFTROCE_KERNEL).
find_kernel() {
  local v
  if [[ -n ${SOFTROCE_KERNEL:-} ]]; then
    echo "$SOFTROCE_KERNEL"; return
  fi
  for v in $(ls /lib/modules 2>/dev/null | sort -rV); do
    if [[ -r /boot/vmlinuz-$v ]] && compgen -G "/lib/modules/$v/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko*" >/dev/null; then
      echo "$v"; return
    fi
  done
}

prereqs_ok() {
  KVER=$(find_kernel)
  [[ -n $KVER && -r /boot/vmlinuz-$KVER ]] || { MISSING="a kernel with rdma_rxe in /boot and /lib/modules"; return 1; }
  local t
  for t in qemu-system-x86_64 modprobe cpio gzip ibv_devinfo rdma; do
    command -v "$t" >/dev/null || { MISSING=$t; return 1; }
  done
  # The initramfs has no libc: busybox must be the static build.
  [[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1 || { MISSING="static /bin/busybox (busybox-static)"; return 1; }
}

MISSING=
if ! prereqs_ok; then
  if [[ ${SOFTROCE_NO_INSTALL:-0} != 1 && $(id -u) -eq 0 ]]; then
    say "missing $MISSING; running install-deps.sh"
    "$HERE/install-deps.sh" >&2 || skip "install-deps.sh failed; missing $MISSING"
    prereqs_ok || skip "still missing $MISSING after install-deps.sh"
  else
    skip "missing $MISSING (run scripts/softroce/install-deps.sh as root)"
  fi
fi

# ---- initramfs (cached) -----------------------------------------------------
CACHE=${SOFTROCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/asyncfabric-softroce}
mkdir -p "$CACHE"

# Modules needed before the root is mounted, in dependency order.
MODULES=()
for m in virtio_pci 9pnet_virtio 9p; do
  while read -r verb path _; do
    [[ $verb == insmod ]] || continue   # skip "builtin ..." lines
    [[ " ${MODULES[*]} " == *" $path "* ]] || MODULES+=("$path")
  done < <(modprobe -S "$KVER" --show-depends "$m")
done

# The cache key covers everything that goes into the image.
KEY=$( { echo "$KVER"; printf '%s\n' "${MODULES[@]}"; cat "$HERE/initramfs-init.sh";
         sha256sum /bin/busybox "${MODULES[@]}"; } | sha256sum | cut -c1-16)
INITRD=$CACHE/initramfs-$KVER-$KEY.cpio.gz

if [[ ! -s $INITRD ]]; then
  (
    # Several runs may start at once: build under a lock, publish atomically.
    exec 9>"$CACHE/.lock"
    flock 9
    [[ -s $INITRD ]] && exit 0
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage/bin" "$stage/lib/modules"
    cp /bin/busybox "$stage/bin/busybox"
    install -m 0755 "$HERE/initramfs-init.sh" "$stage/init"
    for ko in "${MODULES[@]}"; do
      base=$(basename "$ko")
      # busybox insmod cannot read compressed modules.
      case $ko in
        *.ko.xz)  xz -dc "$ko" > "$stage/lib/modules/${base%.xz}"; base=${base%.xz} ;;
        *.ko.zst) zstd -qdc "$ko" > "$stage/lib/modules/${base%.zst}"; base=${base%.zst} ;;
        *.ko.gz)  gzip -dc "$ko" > "$stage/lib/modules/${base%.gz}"; base=${base%.gz} ;;
        *)        cp "$ko" "$stage/lib/modules/$base" ;;
      esac
      echo "$base" >> "$stage/modules.order"
    done
    (cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$INITRD.tmp.$$"
    mv "$INITRD.tmp.$$" "$INITRD"
    # Drop images of older keys.
    find "$CACHE" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -name "$(basename "$INITRD")" -delete
  )
fi

# ---- per-run exchange directory ---------------------------------------------
# Shared writable into the guest at /run/softroce: carries the command in and
# the exit code out.
XCHG=$(mktemp -d "${TMPDIR:-/tmp}/softroce.XXXXXX")
trap 'rm -rf "$XCHG"' EXIT
printf '%s\n' "$REPO" > "$XCHG/repo"
INTERACTIVE=0
[[ -t 0 && -t 1 ]] && INTERACTIVE=1
{
  printf 'REPO=%q\n' "$REPO"
  printf 'SOFTROCE_INTERACTIVE=%q\n' "$INTERACTIVE"
  printf 'SOFTROCE_VERBOSE=%q\n' "${SOFTROCE_VERBOSE:-0}"
  printf 'SOFTROCE_HOST_PATH=%q\n' "$PATH"
  printf 'SOFTROCE_PYTHONPATH=%q\n' "${PYTHONPATH:-}"
  printf 'SOFTROCE_TERM=%q\n' "${TERM:-dumb}"
  printf 'CMD=('; printf ' %q' "${CMD[@]}"; printf ' )\n'
  printf 'SOFTROCE_ENV=('
  [[ ${#PASS_ENV[@]} -eq 0 ]] || printf ' %q' "${PASS_ENV[@]}"
  printf ' )\n'
} > "$XCHG/config.sh"

# ---- boot -------------------------------------------------------------------
# -no-reboot + panic=-1: if guest PID 1 dies, the kernel "reboots" and QEMU
# exits instead of hanging until the timeout.
# restrict=on: user networking only carries guest-internal traffic; nothing
# leaves the guest.  The guest talks RoCE to its own 10.0.2.15.
QEMU=(
  qemu-system-x86_64
  -accel tcg,thread=multi -cpu max
  -smp "${SOFTROCE_SMP:-2}" -m "${SOFTROCE_MEM:-3G}"
  -nodefaults -no-user-config -display none -no-reboot
  -serial stdio
  -kernel "/boot/vmlinuz-$KVER" -initrd "$INITRD"
  -append "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off rdinit=/init ${SOFTROCE_KARGS:-}"
  -netdev user,id=n0,restrict=on -device virtio-net-pci,netdev=n0
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
  -virtfs "local,path=$REPO,mount_tag=repo,security_model=none,multidevs=remap"
  -virtfs "local,path=$XCHG,mount_tag=xchg,security_model=none,multidevs=remap"
)

start=$SECONDS
# QEMU runs under timeout(1) in the background so that this script can forward
# INT/TERM/HUP to it: timeout puts itself in its own process group, so a signal
# aimed at the caller's process group would otherwise leave QEMU running.
if [[ $INTERACTIVE == 1 ]]; then
  # --foreground: stay in the terminal's process group so QEMU can read it.
  timeout --foreground -k 10 "$TIMEOUT" "${QEMU[@]}" <&0 &
else
  # Do not let QEMU eat the caller's stdin.
  timeout -k 10 "$TIMEOUT" "${QEMU[@]}" < /dev/null &
fi
QPID=$!
INTERRUPTED=
trap 'INTERRUPTED=1; kill -TERM "$QPID" 2>/dev/null' INT TERM HUP
set +e
while :; do
  wait "$QPID"; qrc=$?
  # wait returns >128 when a trapped signal interrupts it; QEMU may still run.
  kill -0 "$QPID" 2>/dev/null || break
done
set -e
trap - INT TERM HUP
elapsed=$((SECONDS - start))

if [[ -n $INTERRUPTED ]]; then
  say "interrupted; QEMU stopped after ${elapsed}s"
  exit 130
fi

if [[ $qrc -eq 124 || $qrc -eq 137 ]]; then
  say "timed out after ${TIMEOUT}s (QEMU killed); command: ${CMD[*]}"
  exit 124
fi
if [[ ! -s $XCHG/rc ]]; then
  say "rig failure: guest gave no exit code (QEMU exit status $qrc, ${elapsed}s)"
  exit 125
fi
rc=$(< "$XCHG/rc")
say "guest cycle ${elapsed}s, command exit code $rc"
exit "$rc"
