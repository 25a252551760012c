#!/usr/bin/env bash
# Install the Debian packages the SoftRoCE guest rig needs (run-in-guest.sh).
#
# Idempotent: only packages that are not already installed are requested, and
# `apt-get update` runs only when something is missing and the package lists are
# absent or stale.  Must run as root (Debian 12).  Exits 0 when everything is
# present, non-zero if apt-get fails.
set -euo pipefail

PACKAGES=(
  qemu-system-x86      # qemu-system-x86_64 (TCG: hardware KVM does not work here)
  linux-image-amd64    # guest kernel 6.1 with rdma_rxe, ib_uverbs, 9p, virtio as modules
  kmod                 # modprobe / depmod, for the guest and for building the initramfs
  busybox-static       # the initramfs userland (statically linked, so no libs to copy)
  cpio                 # to pack the initramfs
  iproute2             # `ip` and `rdma link add` inside the guest
  rdma-core ibverbs-providers ibverbs-utils rdmacm-utils perftest
  python3-pyverbs      # Debian's pyverbs; importable from the pyenv Python via PYTHONPATH
  libfabric-bin libfabric-dev
)

if [[ $(id -u) -ne 0 ]]; then
  echo "install-deps.sh: must run as root" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  # dpkg-query prints "install ok installed" only for fully installed packages.
  if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) != "install ok installed" ]]; then
    missing+=("$p")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps.sh: all packages already installed"
  exit 0
fi

echo "install-deps.sh: installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# INITRD=No makes the kernel postinst skip update-initramfs: the rig builds its
# own tiny initramfs, and update-initramfs is most of the install time.
export INITRD=No

# Refresh package lists if there are none yet or they are older than a day.
lists=/var/lib/apt/lists
if ! compgen -G "$lists/*_Packages" >/dev/null \
   || [[ -n $(find "$lists" -maxdepth 1 -name '*_Packages' -mmin +1440 -print -quit) ]]; then
  apt-get update -qq
fi

apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  "${missing[@]}" >/dev/null
echo "install-deps.sh: done"
